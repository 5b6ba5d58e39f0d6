"""Exact too-late routing: the events a closed window would silently drop.

Beam Python has no late-data side output: a GroupByKey simply ignores an element
whose window expired (watermark past ``end + allowed lateness``). ``RouteTooLate``
takes that decision itself, before windowing, so that every such event reaches
the dead letter and nothing is dropped unseen.

How it is exact. A DoFn cannot read the watermark, but an event-time timer that
fires at T proves the watermark reached T. Events are keyed by
``(window start, shard)`` in the global window (where nothing is ever expired).
Per key:

* the first event of a window sets an **expiry** timer just past
  ``end + lateness`` and a **probe** timer at the beginning of time, and is
  buffered. The probe fires at once; its handler sets a **confirm** timer, which
  fires one timer round later. Any timer the watermark already allows fires in the
  first round, so when *confirm* fires the expiry timer has either fired (the
  window was closed when the event arrived: the buffer goes to the dead letter)
  or it has not (the window is open: the buffer is released downstream);
* later events of an open window pass straight through;
* when the expiry timer fires, the window's state is cleared. A straggler that
  comes after that starts the same probe again and finds the window closed.

The expiry instant follows the runner's own rule (``expiry_offset_micros``): the
Python runners drop an element once the watermark is strictly past
``end + lateness``, so the timer sits 1 microsecond after it.
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


class _RouteTooLateFn(beam.DoFn):
  STATUS = ReadModifyWriteStateSpec('status', coders.VarIntCoder())
  BUFFER = BagStateSpec('buffer', coders.PickleCoder())
  EXPIRY = TimerSpec('expiry', TimeDomain.WATERMARK)
  PROBE = TimerSpec('probe', TimeDomain.WATERMARK)
  CONFIRM = TimerSpec('confirm', TimeDomain.WATERMARK)

  def __init__(self, spec: WindowSpec, expiry_offset_micros: int):
    self._spec = spec
    self._offset = expiry_offset_micros
    self.too_late = Metrics.counter('tidemark', 'too_late')

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
      expiry.set(Timestamp(micros=self._spec.expiry(window_start) * 1000 + self._offset))
      probe.set(MIN_TIMESTAMP)

  @on_timer(PROBE)
  def on_probe(self, confirm=beam.DoFn.TimerParam(CONFIRM)):
    confirm.set(MIN_TIMESTAMP)

  @on_timer(CONFIRM)
  def on_confirm(
      self,
      status=beam.DoFn.StateParam(STATUS),
      buffer=beam.DoFn.StateParam(BUFFER)) -> Iterable:
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
      status=beam.DoFn.StateParam(STATUS),
      buffer=beam.DoFn.StateParam(BUFFER),
      confirm=beam.DoFn.TimerParam(CONFIRM)) -> Iterable:
    for _, event in buffer.read():
      self.too_late.inc()
      yield pvalue.TaggedOutput(TOO_LATE_TAG, self._dead_letter(event))
    buffer.clear()
    status.clear()
    confirm.clear()

  def _dead_letter(self, event: Event) -> DeadLetter:
    end = self._spec.end(event.event_time)
    closed = end + self._spec.lateness_ms
    detail = (
        f'event_time {_iso(event.event_time)} is in window '
        f'[{_iso(end - self._spec.size_ms)}, {_iso(end)}), which closed at '
        f'{_iso(closed)} (allowed lateness {self._spec.lateness_ms // 1000} s); '
        'the watermark had passed that when the message arrived')
    return DeadLetter(TOO_LATE, event.source, event.data, detail)


class RouteTooLate(beam.PTransform):
  """Splits events into those whose window is still open and those too late.

  Returns a DoOutputsTuple: ``on_time`` of ``((window start, shard), Event)``
  pairs, ready for dedup, and ``too_late`` of DeadLetter.
  """

  def __init__(
      self,
      window_size_s: int,
      allowed_lateness_s: int,
      shards: int = 1,
      expiry_offset_micros: int = 1):
    super().__init__()
    self._spec = window_spec(window_size_s, allowed_lateness_s)
    if not isinstance(shards, int) or shards < 1:
      raise ValueError(f'shards must be a positive integer, got {shards!r}')
    self._shards = shards
    self._offset = expiry_offset_micros

  def expand(self, events: beam.PCollection[Event]):
    return (
        events
        | 'InGlobalWindow' >> beam.WindowInto(beam.window.GlobalWindows())
        | 'KeyByWindowShard' >> beam.Map(key_by_window_shard(
            self._spec, self._shards)).with_output_types(Tuple[WindowShardKey, Event])
        | 'Route' >> beam.ParDo(_RouteTooLateFn(self._spec, self._offset)).with_output_types(
            Tuple[WindowShardKey, Event]).with_outputs(TOO_LATE_TAG, main='on_time'))
