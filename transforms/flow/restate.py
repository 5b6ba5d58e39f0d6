"""RestateWindows: the no-lateness truth of a closed range of windows, from history.

The batch flow of a restatement (``transforms.rules.restatement`` holds its
rule). The history arrives as chunks of raw copies, each ``(order, message_id,
source, data, watermark)``; the transform

* ``Parse``: contract section 1 (invalid stays invalid), each valid copy to
  its ``event_id``'s shard;
* ``JudgeCopies``: per shard, every copy of each id in the source's order: the
  first is counted, the rest are duplicates, beside the live run's decision;
* ``WindowTruth``: per ``(customer, key, window)`` of the range, the restated
  figures, the live run's reconstructed ones and the ids added or removed.

Only the shard's copies and one record per window cross a shuffle.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam import pvalue

from transforms.flow.aggregate import Stats
from transforms.rules.model import (
    AGGREGATED, DUPLICATE, INVALID, TOO_LATE, WindowSpec, stable_shard)
from transforms.rules.payload import InvalidPayload, parse_payload
from transforms.rules.restatement import (
    HistoryCopy, Judged, RestateRange, id_changes, judge_copies)

#: A copy as read from history: (order, message_id, source, payload bytes, live watermark
#: or None).
RawCopy = Tuple[tuple, str, str, bytes, Optional[int]]
#: Copies read but counted in a window outside the range.
OUTSIDE_RANGE = 'outside_range'
_COUNTS = 'counts'


class RestatedWindow(NamedTuple):
  """One window of the range: what the restatement counts and what the live
  run counted (reconstructed), with the ids that differ."""
  customer_id: str
  key: str
  window_start: int
  window_end: int
  #: (count, sum, min, max) restated; min and max None for no events
  after: tuple
  #: (count, sum, min, max) as the live run counted, reconstructed from history
  live: tuple
  added: List[tuple]  # IdChange
  removed: List[tuple]  # IdChange
  #: copies of the window's events the live run dead-lettered as too late
  too_late_live: int


def figures(values: Iterable[float]) -> tuple:
  """(count, sum, min, max) by the contract's sum rule; min and max None when empty."""
  stats = Stats()
  acc = stats.create_accumulator()
  for value in values:
    acc = stats.add_input(acc, value)
  count, total, low, high = stats.extract_output(acc)
  return (count, total, low, high) if count else (0, 0.0, None, None)


class _Sum(beam.CombineFn):
  """The sum of whole numbers."""

  def create_accumulator(self) -> int:
    return 0

  def add_input(self, total: int, n: int) -> int:
    return total + n

  def merge_accumulators(self, totals: Iterable[int]) -> int:
    return sum(totals)

  def extract_output(self, total: int) -> int:
    return total


class _ParseFn(beam.DoFn):

  def __init__(self, shards: int):
    self._shards = shards

  def process(self, chunk: List[RawCopy]) -> Iterable:
    by_shard: Dict[int, List[HistoryCopy]] = defaultdict(list)
    invalid = 0
    for order, message_id, _source, data, watermark in chunk:
      try:
        event_id, customer_id, key, value, event_time = parse_payload(data)
      except InvalidPayload:
        invalid += 1
        continue
      by_shard[stable_shard(event_id, self._shards)].append(HistoryCopy(
          tuple(order), message_id, event_id, customer_id, key, value, event_time, watermark))
    yield from by_shard.items()
    yield pvalue.TaggedOutput(_COUNTS, (INVALID, invalid))


class _JudgeFn(beam.DoFn):

  def __init__(self, spec: WindowSpec, span: RestateRange, too_late_live: FrozenSet[str]):
    self._spec = spec
    self._span = span
    self._too_late_live = too_late_live

  def process(self, element: Tuple[int, Iterable[List[HistoryCopy]]]) -> Iterable:
    _, chunks = element
    copies = [c for chunk in chunks for c in chunk]
    counts = {DUPLICATE: 0, AGGREGATED: 0, OUTSIDE_RANGE: 0}
    by_window: Dict[tuple, List[Judged]] = defaultdict(list)
    for judged in judge_copies(copies, self._spec, self._too_late_live):
      c = judged.copy
      start = self._spec.start(c.event_time)
      if judged.restated:
        counts[AGGREGATED if self._span.holds(judged.first_window) else OUTSIDE_RANGE] += 1
      else:
        counts[DUPLICATE] += 1
      if self._span.holds(start):
        by_window[(c.customer_id, c.key, start)].append(judged)
    yield from by_window.items()
    for name, n in counts.items():
      yield pvalue.TaggedOutput(_COUNTS, (name, n))


class _WindowTruthFn(beam.DoFn):

  def __init__(self, size_ms: int):
    self._size_ms = size_ms

  def process(self, element: Tuple[tuple, Iterable[List[Judged]]]) -> Iterable[RestatedWindow]:
    (customer_id, key, start), parts = element
    judged = [j for part in parts for j in part]
    added, removed = id_changes(judged)
    yield RestatedWindow(
        customer_id, key, start, start + self._size_ms,
        figures(j.copy.value for j in sorted(judged, key=lambda j: j.copy.order) if j.restated),
        figures(j.copy.value for j in sorted(judged, key=lambda j: j.copy.order)
                if j.live == AGGREGATED),
        [tuple(a) for a in added], [tuple(r) for r in removed],
        sum(1 for j in judged if j.live == TOO_LATE))


class Restated(NamedTuple):
  """What ``RestateWindows`` makes of the history."""
  windows: beam.PCollection  # RestatedWindow, one per (customer, key, window) of the range
  #: (category, count): ``invalid``, ``duplicate``, ``aggregated`` (in the range) and
  #: ``outside_range``; together they are every copy read
  counts: beam.PCollection


class RestateWindows(beam.PTransform):
  """The restated windows of ``span`` from chunks of raw copies (``RawCopy``).

  ``too_late_live``: the ``message_id`` of every copy the live run dead-lettered
  as too late, for the audit's reasons.
  """

  def __init__(self, window: WindowSpec, span: RestateRange,
               too_late_live: Iterable[str] = (), shards: int = 8):
    super().__init__()
    if not isinstance(window, WindowSpec):
      raise TypeError(f'window must be a WindowSpec (model.window_spec), got {window!r}')
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
      raise ValueError(f'shards must be a positive integer, got {shards!r}')
    self._window = window
    self._span = span.check(window)
    self._too_late_live = frozenset(too_late_live)
    self._shards = shards

  def expand(self, chunks: beam.PCollection) -> Restated:
    parsed = chunks | 'Parse' >> beam.ParDo(_ParseFn(self._shards)).with_outputs(
        _COUNTS, main='by_shard')
    judged = (
        parsed.by_shard
        | 'GroupByShard' >> beam.GroupByKey()
        | 'JudgeCopies' >> beam.ParDo(
            _JudgeFn(self._window, self._span, self._too_late_live)).with_outputs(
                _COUNTS, main='by_window'))
    windows = (
        judged.by_window
        | 'GroupByWindow' >> beam.GroupByKey()
        | 'WindowTruth' >> beam.ParDo(_WindowTruthFn(self._window.size_ms)))
    counts = (
        (parsed[_COUNTS], judged[_COUNTS])
        | 'AllCounts' >> beam.Flatten()
        | 'SumCounts' >> beam.CombinePerKey(_Sum()))
    return Restated(windows, counts)
