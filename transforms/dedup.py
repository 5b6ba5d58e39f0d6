"""Redeliveries count once: deduplication by ``event_id`` with bounded state."""

from __future__ import annotations

from typing import Iterable, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import coders
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import SetStateSpec
from apache_beam.transforms.userstate import TimerSpec
from apache_beam.transforms.userstate import on_timer
from apache_beam.utils.timestamp import Timestamp

from transforms.lateness import WindowShardKey
from transforms.model import Event, WindowSpec, window_spec

DUPLICATE_TAG = 'duplicate'


class _DedupFn(beam.DoFn):
  SEEN = SetStateSpec('seen', coders.StrUtf8Coder())
  EXPIRY = TimerSpec('expiry', TimeDomain.WATERMARK)

  def __init__(self, spec: WindowSpec):
    self._spec = spec
    self.duplicate = Metrics.counter('tidemark', 'duplicate')
    self.aggregated = Metrics.counter('tidemark', 'aggregated')

  def process(
      self,
      element: Tuple[WindowShardKey, Event],
      seen=beam.DoFn.StateParam(SEEN),
      expiry=beam.DoFn.TimerParam(EXPIRY)) -> Iterable:
    (window_start, _), event = element
    ids = seen.read()
    if event.event_id in ids:
      self.duplicate.inc()
      yield pvalue.TaggedOutput(DUPLICATE_TAG, event)
      return
    if not ids:
      expiry.set(Timestamp(micros=self._spec.closing(window_start) * 1000))
    seen.add(event.event_id)
    self.aggregated.inc()
    yield event

  @on_timer(EXPIRY)
  def on_expiry(self, seen=beam.DoFn.StateParam(SEEN)):
    seen.clear()


class DeduplicateEvents(beam.PTransform):
  """Passes the first accepted copy of each ``event_id``; later copies go to
  the ``duplicate`` output. Takes the keyed output of RouteTooLate; the ids
  seen for a window are freed when the window expires.

  Returns a DoOutputsTuple: ``unique`` (Event) and ``duplicate`` (Event).
  """

  def __init__(self, window_size_s: int, allowed_lateness_s: int):
    super().__init__()
    self._spec = window_spec(window_size_s, allowed_lateness_s)

  def expand(self, keyed_events: beam.PCollection[Tuple[WindowShardKey, Event]]):
    return keyed_events | 'FirstCopyOnly' >> beam.ParDo(
        _DedupFn(self._spec)).with_outputs(DUPLICATE_TAG, main='unique')
