"""Diagnostics measured inside the pipeline, in event time."""

from __future__ import annotations

import os
from typing import Iterable, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.userstate import TimerSpec
from apache_beam.transforms.userstate import on_timer
from apache_beam.utils.timestamp import Timestamp

from transforms.rules.model import Event


class MemorySample(NamedTuple):
  """The worker's resident memory when the watermark reached ``event_time``."""
  event_time: int  # ms, a multiple of the sampling period
  rss_mib: float
  pid: int
  events: int  # events seen by the sampler so far

  def to_json_dict(self) -> dict:
    return self._asdict()


def resident_mib(pid: Optional[int] = None) -> float:
  """Current resident set size of a process (this one by default), in MiB."""
  with open(f'/proc/{pid or "self"}/status', encoding='ascii') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  raise RuntimeError('VmRSS not found')


class _SampleFn(beam.DoFn):
  NEXT = ReadModifyWriteStateSpec('next', coders.VarIntCoder())
  NEWEST = ReadModifyWriteStateSpec('newest', coders.VarIntCoder())
  SEEN = ReadModifyWriteStateSpec('seen', coders.VarIntCoder())
  TICK = TimerSpec('tick', TimeDomain.WATERMARK)

  def __init__(self, period_ms: int):
    self._period = period_ms

  def process(
      self,
      element: Tuple[int, int],
      pending=beam.DoFn.StateParam(NEXT),
      newest=beam.DoFn.StateParam(NEWEST),
      seen=beam.DoFn.StateParam(SEEN),
      tick=beam.DoFn.TimerParam(TICK)) -> Iterable:
    _, event_time = element
    seen.write((seen.read() or 0) + 1)
    newest.write(max(newest.read() or event_time, event_time))
    if pending.read() is None:
      boundary = event_time - event_time % self._period + self._period
      pending.write(boundary)
      tick.set(Timestamp(micros=boundary * 1000))
    return ()

  @on_timer(TICK)
  def on_tick(
      self,
      pending=beam.DoFn.StateParam(NEXT),
      newest=beam.DoFn.StateParam(NEWEST),
      seen=beam.DoFn.StateParam(SEEN),
      tick=beam.DoFn.TimerParam(TICK)) -> Iterable[MemorySample]:
    boundary = pending.read()
    yield MemorySample(boundary, round(resident_mib(), 1), os.getpid(), seen.read() or 0)
    # Keep ticking only while there is newer data: the chain ends with the
    # data, not at the end of time.
    if (newest.read() or 0) >= boundary:
      pending.write(boundary + self._period)
      tick.set(Timestamp(micros=(boundary + self._period) * 1000))
    else:
      pending.clear()


class SampleMemory(beam.PTransform):
  """One MemorySample each time the watermark passes a multiple of
  ``period_s`` of event time, for as long as events keep coming."""

  def __init__(self, period_s: int):
    super().__init__()
    if not isinstance(period_s, int) or period_s <= 0:
      raise ValueError(f'period_s must be a positive integer, got {period_s!r}')
    self._period_ms = period_s * 1000

  def expand(self, events: beam.PCollection[Event]) -> beam.PCollection[MemorySample]:
    return (
        events
        | 'EventTimes' >> beam.Map(lambda e: (0, e.event_time)).with_output_types(
            Tuple[int, int])
        | 'Sample' >> beam.ParDo(_SampleFn(self._period_ms)))
