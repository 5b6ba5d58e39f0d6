"""The panes the streaming windows' trigger fires, evaluated along a replay's
timeline: the bulk replay's counterpart of ``aggregate.AggregateWindows``.

A replay states every step at which the watermark and the processing time
move, so the panes of one (customer, key, window) follow from its events'
arrival steps alone: ``fire_panes_along``. ``evaluated_early_firing`` reads the
declared trigger (``aggregate.pane_trigger``) and refuses any shape it does not
evaluate.
"""

from __future__ import annotations

import bisect
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from apache_beam.transforms import trigger

from transforms.flow.aggregate import Stats

#: ``(step, processing time s, values)``: the events of a known window and key
#: that arrived in one step.
Arrival = Tuple[int, float, List[float]]
#: No watermark yet (the beginning of time), in a column of watermarks.
NO_WATERMARK = np.iinfo(np.int64).min


def evaluated_early_firing(declared: trigger.TriggerFn,
                           accumulation=trigger.AccumulationMode.ACCUMULATING) -> Optional[int]:
  """The early firing delay of the declared trigger (``aggregate.pane_trigger``),
  the one parameter ``fire_panes_along`` evaluates it by. Raises ValueError for a
  trigger of any other shape: ``fire_panes_along`` evaluates accumulating
  ``AfterWatermark(early=AfterProcessingTime(s) or none, late=AfterCount(1))``."""
  early, late = (getattr(getattr(declared, part, None), 'underlying', None)
                 for part in ('early', 'late'))
  if (type(declared) is not trigger.AfterWatermark or late != trigger.AfterCount(1)
      or accumulation != trigger.AccumulationMode.ACCUMULATING
      or (early is not None and type(early) is not trigger.AfterProcessingTime)):
    raise ValueError(
        'the bulk replay evaluates accumulating AfterWatermark(early=AfterProcessingTime(s), '
        f'late=AfterCount(1)); the windows declare {declared!r}, {accumulation!r}')
  return None if early is None else early.delay


class StepClock(NamedTuple):
  """A replay's watermark and processing-time steps, arranged once for
  ``fire_panes_along`` (each window then finds its own steps by bisection)."""
  watermark_steps: Sequence[Tuple[int, Optional[int]]]
  #: each watermark step's watermark, infinity for the last (None)
  marks: List[float]
  processing_time_steps: Sequence[Tuple[int, float]]
  processing_steps: List[int]
  #: the watermark steps' numbers, and ``NO_WATERMARK`` then each step's
  #: watermark, for ``watermark_at``
  watermark_step_numbers: np.ndarray
  marks_after: np.ndarray

  @classmethod
  def of(cls, watermark_steps: Sequence[Tuple[int, Optional[int]]],
         processing_time_steps: Sequence[Tuple[int, float]]) -> 'StepClock':
    return cls(watermark_steps, [math.inf if m is None else m for _, m in watermark_steps],
               processing_time_steps, [s for s, _ in processing_time_steps],
               np.array([s for s, _ in watermark_steps], dtype=np.int64),
               np.array([NO_WATERMARK] + [NO_WATERMARK if m is None else m
                                          for _, m in watermark_steps], dtype=np.int64))

  def watermark_at(self, steps: np.ndarray) -> np.ndarray:
    """The pipeline watermark under which messages of ``steps`` arrived (the
    last watermark step before each), ``NO_WATERMARK`` before the first."""
    return self.marks_after[np.searchsorted(self.watermark_step_numbers, steps)]

  def processing_time_at(self, step: int) -> float:
    """The processing time (s) at which messages of ``step`` arrived."""
    at = bisect.bisect_left(self.processing_steps, step) - 1
    return self.processing_time_steps[at][1] if at >= 0 else 0.0


#: A window's values are compacted to a few doubles of the same exact sum once
#: a pane has summed more than this many: later panes sum only what came since.
_COMPACT_AFTER = 64


def fire_panes_along(arrivals: Sequence[Arrival], window_end: int, early_firing_s: Optional[int],
                     clock: StepClock) -> List[Tuple[str, tuple]]:
  """The panes the streaming trigger fires for one (customer, key, window):
  ``(timing, (count, sum, min, max))`` in pane order.

  ``arrivals`` are the window's accepted events for the key grouped by step, in
  step order; ``clock`` the replay's steps, arranged once. The on-time pane
  fires at the step where the watermark reaches the window end (if anything
  arrived before it); before that, an early pane fires at the first
  processing-time step ``early_firing_s`` after the first event since the last
  pane; after it, every step that brings events fires a late pane.
  """
  end_step = clock.watermark_steps[bisect.bisect_left(clock.marks, window_end)][0]
  panes: List[Tuple[str, tuple]] = []
  stats = Stats()
  # every value so far, the panes accumulating: how many, their min and max,
  # and their sum as a few doubles plus the values since the last pane
  count, low, high = 0, math.inf, -math.inf
  values: List[float] = []

  def summary() -> tuple:
    nonlocal values
    summarized = stats.extract_output((count, values, 0, low, high))
    if len(values) > _COMPACT_AFTER:
      values = stats.compact(values)
    return summarized

  on_time = [a for a in arrivals if a[0] < end_step]
  late = arrivals[len(on_time):]

  if on_time:
    # ticks before the first event fire nothing: the window's start from there to its end
    first = bisect.bisect_left(clock.processing_steps, on_time[0][0])
    last = bisect.bisect_left(clock.processing_steps, end_step)
    ticks = iter(clock.processing_time_steps[first:last] if early_firing_s else ())
    next_tick = next(ticks, None)
    timer = None
    for step, arrived_at, step_values in on_time:
      while next_tick is not None and next_tick[0] < step:
        if timer is not None and next_tick[1] >= timer:
          panes.append(('EARLY', summary()))
          timer = None
        next_tick = next(ticks, None)
      values.extend(step_values)
      count += len(step_values)
      low, high = min(low, min(step_values)), max(high, max(step_values))
      if early_firing_s and timer is None:
        timer = arrived_at + early_firing_s
    while next_tick is not None:
      if timer is not None and next_tick[1] >= timer:
        panes.append(('EARLY', summary()))
        timer = None
      next_tick = next(ticks, None)
    panes.append(('ON_TIME', summary()))

  for _, _, step_values in late:  # one pane per step that brings events
    values.extend(step_values)
    count += len(step_values)
    low, high = min(low, min(step_values)), max(high, max(step_values))
    panes.append(('LATE', summary()))
  return panes
