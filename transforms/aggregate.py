"""Fixed event-time windows, accumulating triggers, and pane-aware aggregates."""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.transforms import trigger
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from apache_beam.utils.windowed_value import PaneInfoTiming

from transforms.model import Event, WindowAggregate, check_early_firing, window_spec


class Stats(beam.CombineFn):
  """count, sum, min and max of values.

  The sum is exactly rounded (Shewchuk's partials, as in ``math.fsum``), so
  it does not depend on the order in which a runner combines values.
  """

  def create_accumulator(self) -> Tuple[int, List[float], float, float]:
    return 0, [], math.inf, -math.inf

  def add_input(self, acc, value: float):
    count, partials, low, high = acc
    _add_partial(partials, value)
    return count + 1, partials, min(low, value), max(high, value)

  def merge_accumulators(self, accumulators):
    count, partials, low, high = 0, [], math.inf, -math.inf
    for c, p, lo, hi in accumulators:
      count += c
      for x in p:
        _add_partial(partials, x)
      low, high = min(low, lo), max(high, hi)
    return count, partials, low, high

  def extract_output(self, acc) -> Tuple[int, float, float, float]:
    count, partials, low, high = acc
    return count, math.fsum(partials), low, high


def _add_partial(partials: List[float], x: float) -> None:
  """Adds ``x`` to a list of non-overlapping partial sums, in place."""
  i = 0
  for y in partials:
    if abs(x) < abs(y):
      x, y = y, x
    hi = x + y
    lo = y - (hi - x)
    if lo:
      partials[i] = lo
      i += 1
    x = hi
  partials[i:] = [x]


class MergeStats(Stats):
  """Stats whose inputs are Stats accumulators (partial aggregates)."""

  def add_input(self, acc, partial):
    return self.merge_accumulators((acc, partial))


class _PrecombineFn(beam.DoFn):
  """Events to one partial Stats accumulator per ``(customer_id, key, window)``
  and bundle, emitted when the bundle ends, stamped inside its window.

  The Python SDK lifts no combiner in streaming, and a GroupByKey in
  accumulating mode hands every value of a window so far to each pane: a pane
  would cost the whole window again. Partials make a pane cost one accumulator
  per bundle that carried the window, and cross the exchange once per bundle.
  """

  def __init__(self, size_ms: int):
    self._size_ms = size_ms
    self._stats = Stats()

  def start_bundle(self):
    self._partials: Dict[Tuple[str, str, int], tuple] = {}

  def process(self, event: Event) -> Iterable:
    start = event.event_time - event.event_time % self._size_ms
    window = (event.customer_id, event.key, start)
    partials = self._partials
    acc = partials.get(window)
    if acc is None:
      acc = self._stats.create_accumulator()
    partials[window] = self._stats.add_input(acc, event.value)
    return ()

  def finish_bundle(self) -> Iterable:
    for (customer_id, key, start), acc in self._partials.items():
      yield WindowedValue(
          ((customer_id, key), acc),
          Timestamp(micros=(start + self._size_ms) * 1000 - 1), (GlobalWindow(),))
    self._partials = {}


class _ToAggregateFn(beam.DoFn):

  def process(
      self,
      element,
      window=beam.DoFn.WindowParam,
      pane=beam.DoFn.PaneInfoParam) -> Iterable[WindowAggregate]:
    (customer_id, key), (count, total, low, high) = element
    # An empty pane (Java runners may fire one when a window expires) carries nothing.
    if count:
      start = window.start.micros // 1000
      end = window.end.micros // 1000
      yield WindowAggregate(
          customer_id, key, start, end, count, total, low, high, pane.index,
          PaneInfoTiming.to_string(pane.timing))


class AggregateWindows(beam.PTransform):
  """Per ``(customer_id, key)`` and fixed window: count, sum, min, max.

  Takes Events; windows follow their ``event_time``.

  Windows are half-open ``[start, start + size)``. The trigger is accumulating
  ``AfterWatermark(early=AfterProcessingTime(early_firing_s), late=AfterCount(1))``:
  optional early panes, one on-time pane when the watermark passes the window
  end, then one late pane per late event within the allowed lateness. Every
  pane carries the whole window so far; the one with the highest
  ``pane_index`` is final.

  RouteAndDeduplicate decides what is too late. The windowing keeps each window 1 ms
  past ``end + lateness``, so that neither Beam Python's drop rule (strictly
  past) nor Beam Java's (at or past, in milliseconds) can drop an event that
  the router accepted.
  """

  def __init__(
      self,
      window_size_s: int,
      allowed_lateness_s: int,
      early_firing_s: Optional[int] = None):
    super().__init__()
    window_spec(window_size_s, allowed_lateness_s)  # validates
    check_early_firing(early_firing_s)
    self._size = window_size_s
    self._lateness = allowed_lateness_s
    self._early = early_firing_s

  def expand(self, events: beam.PCollection[Event]) -> beam.PCollection[WindowAggregate]:
    early = trigger.AfterProcessingTime(self._early) if self._early else None
    return (
        events
        | 'Precombine' >> beam.ParDo(_PrecombineFn(self._size * 1000))
        | 'FixedWindows' >> beam.WindowInto(
            beam.window.FixedWindows(self._size),
            trigger=trigger.AfterWatermark(early=early, late=trigger.AfterCount(1)),
            accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
            allowed_lateness=Duration(micros=(self._lateness * 1000 + 1) * 1000))
        | 'CountSumMinMax' >> beam.CombinePerKey(MergeStats())
        | 'WithPaneInfo' >> beam.ParDo(_ToAggregateFn()))
