"""Exact too-late routing: the events a closed window would silently drop.

Beam Python has no late-data side output: a GroupByKey simply ignores an element
whose window expired (watermark past ``end + allowed lateness``). ``RouteTooLate``
takes that decision itself, before windowing, so that every such event reaches
the dead letter and nothing is dropped unseen.

When the source states the watermark each message arrived under (a replay:
``Event.arrival_watermark``), the decision is a comparison, with no state: the
event is too late if that watermark had reached the window's expiry instant.
Every step downstream sees the event before any later watermark, so the
windowing's own drop rule agrees on every runner.

A live source does not know the watermark; only the runner does. Then the
router **probes** it. A DoFn cannot read the watermark, but an event-time timer that
fires at T proves the watermark reached T. Events are keyed by
``(window start, shard)`` in the global window (where nothing is ever expired).
Per key:

* the first event of a window sets an **expiry** timer just past
  ``end + lateness`` and a **probe** timer at a lower bound of the watermark
  (the latest instant a timer of this DoFn fired; at first the beginning of
  time), and is buffered. The probe fires at once; its handler sets a **confirm** timer, which
  fires one timer round later. Any timer the watermark already allows fires in the
  first round, so when *confirm* fires the expiry timer has either fired (the
  window was closed when the event arrived: the buffer goes to the dead letter)
  or it has not (the window is open: the buffer is released downstream);
* later events of an open window pass straight through;
* when the expiry timer fires, the window's state is cleared. A straggler that
  comes after that starts the same probe again and finds the window closed.

A window counts as closed once the watermark is strictly past ``end + lateness``
(``WindowSpec.closing``, Beam Python's rule), on every runner: the expiry timer
sits at that millisecond, and the windowing downstream keeps each window 1 ms
longer still (see AggregateWindows), so it never drops what was routed on.
"""

from __future__ import annotations

from typing import Iterable, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import coders
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.userstate import TimerSpec
from apache_beam.transforms.userstate import on_timer
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp

from transforms.model import TOO_LATE, DeadLetter, Event, WindowSpec, stable_shard, window_spec
from transforms.parse import millis_to_timestamp

TOO_LATE_TAG = 'too_late'

WindowShardKey = Tuple[int, int]  # (window start ms, shard)

_PROBING = 1
_OPEN = 2


def key_by_window_shard(spec: WindowSpec, shards: int):
  """The ``(window start, shard)`` key shared by routing and dedup."""

  def key(event: Event) -> Tuple[WindowShardKey, Event]:
    return (spec.start(event.event_time), stable_shard(event.event_id, shards)), event

  return key


def _iso(millis: int) -> str:
  return millis_to_timestamp(millis).to_rfc3339()


def dead_letter_too_late(spec: WindowSpec, event: Event) -> DeadLetter:
  """The dead letter of an event whose window had closed when it arrived."""
  end = spec.end(event.event_time)
  closed = end + spec.lateness_ms
  detail = (
      f'event_time {_iso(event.event_time)} is in window '
      f'[{_iso(end - spec.size_ms)}, {_iso(end)}), which closed at '
      f'{_iso(closed)} (allowed lateness {spec.lateness_ms // 1000} s); '
      'the watermark had passed that when the message arrived')
  return DeadLetter(TOO_LATE, event.source, event.data, detail)


class _CompareArrivalWatermarkFn(beam.DoFn):
  """Decides with the watermark each event arrived under; stateless."""

  def __init__(self, spec: WindowSpec):
    self._spec = spec
    self.too_late = Metrics.counter('tidemark', 'too_late')

  def process(self, element: Tuple[WindowShardKey, Event]) -> Iterable:
    (window_start, _), event = element
    if event.arrival_watermark is None:
      raise ValueError(
          f'event {event.event_id!r} from source {event.source!r} carries no arrival '
          'watermark; route a live source with arrival_watermarks=False')
    if event.arrival_watermark >= self._spec.closing(window_start):
      self.too_late.inc()
      yield pvalue.TaggedOutput(TOO_LATE_TAG, dead_letter_too_late(self._spec, event))
    else:
      yield element


class _RouteTooLateFn(beam.DoFn):
  STATUS = ReadModifyWriteStateSpec('status', coders.VarIntCoder())
  BUFFER = BagStateSpec('buffer', coders.PickleCoder())
  EXPIRY = TimerSpec('expiry', TimeDomain.WATERMARK)
  PROBE = TimerSpec('probe', TimeDomain.WATERMARK)
  CONFIRM = TimerSpec('confirm', TimeDomain.WATERMARK)

  def __init__(self, spec: WindowSpec):
    self._spec = spec
    self.too_late = Metrics.counter('tidemark', 'too_late')
    self._floor = MIN_TIMESTAMP

  def setup(self):
    # A lower bound of the input watermark: the latest instant at which a timer
    # of this instance fired. Probes are set there rather than at the
    # beginning of time: they still fire in the very next timer round, and the
    # output watermark they hold while pending is not pulled back to the
    # beginning of time (on Flink a probe is pending until the next watermark
    # advance, and with steady traffic some probe always is).
    self._floor = MIN_TIMESTAMP

  def _fired(self, timestamp: Timestamp) -> None:
    if timestamp > self._floor:
      self._floor = timestamp

  def process(
      self,
      element: Tuple[WindowShardKey, Event],
      status=beam.DoFn.StateParam(STATUS),
      buffer=beam.DoFn.StateParam(BUFFER),
      expiry=beam.DoFn.TimerParam(EXPIRY),
      probe=beam.DoFn.TimerParam(PROBE)) -> Iterable:
    state = status.read()
    if state == _OPEN:
      yield element
      return
    buffer.add(element)
    if state is None:
      status.write(_PROBING)
      window_start = element[0][0]
      expiry.set(Timestamp(micros=self._spec.closing(window_start) * 1000))
      probe.set(self._floor)

  @on_timer(PROBE)
  def on_probe(
      self,
      timestamp=beam.DoFn.TimestampParam,
      confirm=beam.DoFn.TimerParam(CONFIRM)):
    self._fired(timestamp)
    confirm.set(self._floor)

  @on_timer(CONFIRM)
  def on_confirm(
      self,
      timestamp=beam.DoFn.TimestampParam,
      status=beam.DoFn.StateParam(STATUS),
      buffer=beam.DoFn.StateParam(BUFFER)) -> Iterable:
    self._fired(timestamp)
    if status.read() != _PROBING:
      return
    status.write(_OPEN)
    for key, event in buffer.read():
      yield beam.window.TimestampedValue(
          (key, event), millis_to_timestamp(event.event_time))
    buffer.clear()

  @on_timer(EXPIRY)
  def on_expiry(
      self,
      timestamp=beam.DoFn.TimestampParam,
      status=beam.DoFn.StateParam(STATUS),
      buffer=beam.DoFn.StateParam(BUFFER),
      confirm=beam.DoFn.TimerParam(CONFIRM)) -> Iterable:
    self._fired(timestamp)
    for _, event in buffer.read():
      self.too_late.inc()
      yield pvalue.TaggedOutput(TOO_LATE_TAG, dead_letter_too_late(self._spec, event))
    buffer.clear()
    status.clear()
    confirm.clear()


class RouteTooLate(beam.PTransform):
  """Splits events into those whose window is still open and those too late.

  With ``arrival_watermarks`` the events carry the watermark they arrived
  under and are routed by comparison; otherwise the runner's watermark is probed
  with timers. Either way a window counts as closed once the watermark is
  strictly past ``end + lateness`` (``WindowSpec.closing``), on every runner.

  Returns a DoOutputsTuple: ``on_time`` of ``((window start, shard), Event)``
  pairs, ready for dedup, and ``too_late`` of DeadLetter.
  """

  def __init__(
      self,
      window_size_s: int,
      allowed_lateness_s: int,
      shards: int = 1,
      arrival_watermarks: bool = False):
    super().__init__()
    self._spec = window_spec(window_size_s, allowed_lateness_s)
    if not isinstance(shards, int) or shards < 1:
      raise ValueError(f'shards must be a positive integer, got {shards!r}')
    self._shards = shards
    self._arrival_watermarks = arrival_watermarks

  def expand(self, events: beam.PCollection[Event]):
    route = (
        _CompareArrivalWatermarkFn(self._spec)
        if self._arrival_watermarks else _RouteTooLateFn(self._spec))
    return (
        events
        | 'InGlobalWindow' >> beam.WindowInto(beam.window.GlobalWindows())
        | 'KeyByWindowShard' >> beam.Map(key_by_window_shard(
            self._spec, self._shards)).with_output_types(Tuple[WindowShardKey, Event])
        | 'Route' >> beam.ParDo(route).with_output_types(
            Tuple[WindowShardKey, Event]).with_outputs(TOO_LATE_TAG, main='on_time'))
