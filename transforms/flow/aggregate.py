"""Fixed event-time windows, accumulating triggers, and pane-aware aggregates."""

from __future__ import annotations

import math
import sys
from typing import Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.transforms import trigger
from apache_beam.transforms.window import FixedWindows, GlobalWindow
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from apache_beam.utils.windowed_value import PaneInfoTiming

from transforms.rules.model import Event, WindowAggregate, WindowSpec, check_early_firing


class Stats(beam.CombineFn):
  """count, sum, min and max of values.

  The sum is the exact sum of the values rounded once to the nearest double,
  so it does not depend on the order in which a runner combines values. An
  exact sum too large for a double (one that would round to infinity) is
  ``±sys.float_info.max``: every sum is a finite number.

  Partial sums are Shewchuk's non-overlapping partials (as in ``math.fsum``)
  while they stay within the range of a double; what would overflow them moves
  to an exact integer, in units of 2**-1074 (the smallest subnormal double,
  of which every double is a whole number).
  """

  def create_accumulator(self) -> Tuple[int, List[float], int, float, float]:
    return 0, [], 0, math.inf, -math.inf

  def add_input(self, acc, value: float):
    count, partials, spilled, low, high = acc
    spilled += _add_partial(partials, value)
    return count + 1, partials, spilled, min(low, value), max(high, value)

  def merge_accumulators(self, accumulators):
    count, partials, spilled, low, high = 0, [], 0, math.inf, -math.inf
    for c, p, s, lo, hi in accumulators:
      count += c
      spilled += s
      for x in p:
        spilled += _add_partial(partials, x)
      low, high = min(low, lo), max(high, hi)
    return count, partials, spilled, low, high

  @staticmethod
  def compact(values: List[float]) -> List[float]:
    """A few doubles whose exact sum is that of ``values``, for a caller that
    keeps adding to them (``values`` itself if that sum would overflow):
    ``math.fsum`` rounds the exact sum once, so what it leaves of it is again
    a sum of doubles, summed the same way until nothing is left."""
    try:
      partials = [math.fsum(values)]
      rest = values + [-partials[0]]
      while residual := math.fsum(rest):
        partials.append(residual)
        rest.append(-residual)
    except OverflowError:
      return values
    return partials

  def extract_output(self, acc) -> Tuple[int, float, float, float]:
    count, partials, spilled, low, high = acc
    if not spilled:
      try:
        return count, math.fsum(partials), low, high
      except OverflowError:  # the partials fit in a double, their rounded sum does not
        pass
    return count, _to_double(spilled + sum(map(_units, partials))), low, high


#: 2**-1074 is the smallest subnormal double; every double is a whole number of it.
_UNITS_PER_ONE = 1 << 1074


def _units(x: float) -> int:
  """``x`` in units of 2**-1074, exactly."""
  numerator, denominator = x.as_integer_ratio()
  return numerator << (1075 - denominator.bit_length())


def _to_double(units: int) -> float:
  """The double nearest to ``units * 2**-1074``, or ``±sys.float_info.max``
  beyond the range of a double."""
  try:
    return units / _UNITS_PER_ONE  # correctly rounded
  except OverflowError:
    return sys.float_info.max if units > 0 else -sys.float_info.max


def _add_partial(partials: List[float], x: float) -> int:
  """Adds ``x`` to a list of non-overlapping partial sums, in place.

  Returns 0, or, when a partial sum would overflow a double, the whole sum
  (``x`` and every partial, after which the list is empty) in units of
  2**-1074.
  """
  i = 0
  for j, y in enumerate(partials):
    if abs(x) < abs(y):
      x, y = y, x
    hi = x + y
    if math.isinf(hi):
      spilled = _units(x) + _units(y) + sum(map(_units, partials[:i])) + sum(
          map(_units, partials[j + 1:]))
      partials.clear()
      return spilled
    lo = y - (hi - x)
    if lo:
      partials[i] = lo
      i += 1
    x = hi
  partials[i:] = [x]
  return 0


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


def pane_trigger(early_firing_s: Optional[int]) -> trigger.AfterWatermark:
  """The trigger of every window, declared once: optional early panes
  ``early_firing_s`` of processing time after a pane's first event, the on-time
  pane when the watermark passes the window end, then one late pane per late
  firing. Panes accumulate (``PANE_ACCUMULATION``). The bulk replay evaluates
  this same declaration (``transforms.flow.replay_panes.fire_panes_along``) and refuses any other."""
  early = trigger.AfterProcessingTime(early_firing_s) if early_firing_s else None
  return trigger.AfterWatermark(early=early, late=trigger.AfterCount(1))


PANE_ACCUMULATION = trigger.AccumulationMode.ACCUMULATING


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

  def __init__(self, window: WindowSpec, early_firing_s: Optional[int] = None):
    super().__init__()
    if not isinstance(window, WindowSpec):
      raise TypeError(f'window must be a WindowSpec (model.window_spec), got {window!r}')
    check_early_firing(early_firing_s)
    self._window = window
    self._early = early_firing_s

  def expand(self, events: beam.PCollection[Event]) -> beam.PCollection[WindowAggregate]:
    return (
        events
        | 'Precombine' >> beam.ParDo(_PrecombineFn(self._window.size_ms))
        | 'FixedWindows' >> beam.WindowInto(
            FixedWindows(Duration(micros=self._window.size_ms * 1000)),
            trigger=pane_trigger(self._early),
            accumulation_mode=PANE_ACCUMULATION,
            allowed_lateness=Duration(micros=(self._window.lateness_ms + 1) * 1000))
        | 'CountSumMinMax' >> beam.CombinePerKey(MergeStats())
        | 'WithPaneInfo' >> beam.ParDo(_ToAggregateFn()))
