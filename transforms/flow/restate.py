"""RestateWindows: the no-lateness truth of a closed range of windows, from history.

The batch flow of a restatement (``transforms.rules.restatement`` holds its
rule). The history arrives as chunks of raw copies, each ``(order, message_id,
source, data, watermark)``; the transform

* ``Parse``: contract section 1 (invalid stays invalid), each valid copy to
  its ``event_id``'s shard;
* ``JudgeCopies``: per shard, every copy of each id in the source's order: the
  first is counted, the rest are duplicates, beside the live run's decision;
* ``MergeWindows``: per ``(customer, key, window)`` of the range, the restated
  figures, the live run's rebuilt ones and the ids added or removed, each shard's
  partial merged (``WindowTruth`` makes them a ``RestatedWindow``).

The copies cross one shuffle, to their id's shard (as lists, pickled: ``chunks.Chunk``);
after it only one partial per window and shard.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam import pvalue

from transforms.flow.aggregate import Stats
from transforms.flow.chunks import Chunk
from transforms.rules.model import (
    AGGREGATED, DUPLICATE, INVALID, TOO_LATE, WindowSpec, stable_shard)
from transforms.rules.payload import InvalidPayload, parse_payload
from transforms.rules.restatement import HistoryCopy, RestateRange, id_change, judge_copies

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
    by_shard: Dict[int, List[HistoryCopy]] = defaultdict(Chunk)
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


#: A window's figures from one shard: (restated Stats accumulator, live Stats
#: accumulator, added IdChanges, removed IdChanges, copies too late live).
Partial = tuple
_STATS = Stats()


def _empty_partial() -> list:
  return [_STATS.create_accumulator(), _STATS.create_accumulator(), [], [], 0]


class _JudgeFn(beam.DoFn):
  """Every copy of the shard's ids judged; per window of the range, one partial."""

  def __init__(self, spec: WindowSpec, span: RestateRange, too_late_live: FrozenSet[str]):
    self._spec = spec
    self._span = span
    self._too_late_live = too_late_live

  def process(self, element: Tuple[int, Iterable[List[HistoryCopy]]]) -> Iterable:
    _, chunks = element
    copies = [c for chunk in chunks for c in chunk]
    counts = {DUPLICATE: 0, AGGREGATED: 0, OUTSIDE_RANGE: 0}
    partials: Dict[tuple, list] = {}
    for judged in judge_copies(copies, self._spec, self._too_late_live):
      c = judged.copy
      if judged.restated:
        counts[AGGREGATED if self._span.holds(judged.first_window) else OUTSIDE_RANGE] += 1
      else:
        counts[DUPLICATE] += 1
      start = self._spec.start(c.event_time)
      if not self._span.holds(start):
        continue
      partial = partials.get((c.customer_id, c.key, start))
      if partial is None:
        partial = partials[(c.customer_id, c.key, start)] = _empty_partial()
      if judged.restated:
        partial[0] = _STATS.add_input(partial[0], c.value)
      if judged.live == AGGREGATED:
        partial[1] = _STATS.add_input(partial[1], c.value)
      elif judged.live == TOO_LATE:
        partial[4] += 1
      change = id_change(judged)
      if change is not None:
        partial[2 if change[0] else 3].append(tuple(change[1]))
    for window, partial in partials.items():
      yield window, tuple(partial)
    for name, n in counts.items():
      yield pvalue.TaggedOutput(_COUNTS, (name, n))


class _MergeWindow(beam.CombineFn):
  """A window's partials from every shard, merged."""

  def create_accumulator(self) -> Partial:
    return tuple(_empty_partial())

  def add_input(self, acc: Partial, partial: Partial) -> Partial:
    return self.merge_accumulators([acc, partial])

  def merge_accumulators(self, accumulators: Iterable[Partial]) -> Partial:
    parts = list(accumulators)
    return (_STATS.merge_accumulators([p[0] for p in parts]),
            _STATS.merge_accumulators([p[1] for p in parts]),
            [a for p in parts for a in p[2]], [r for p in parts for r in p[3]],
            sum(p[4] for p in parts))

  def extract_output(self, acc: Partial) -> Partial:
    return acc


def _figures(acc) -> tuple:
  count, total, low, high = _STATS.extract_output(acc)
  return (count, total, low, high) if count else (0, 0.0, None, None)


def _restated_window(element: Tuple[tuple, Partial], size_ms: int) -> RestatedWindow:
  (customer_id, key, start), (restated, live, added, removed, too_late) = element
  return RestatedWindow(customer_id, key, start, start + size_ms, _figures(restated),
                        _figures(live), sorted(added), sorted(removed), too_late)


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
    parsed = chunks | 'Parse' >> beam.ParDo(_ParseFn(self._shards)).with_output_types(
        Tuple[int, Chunk]).with_outputs(_COUNTS, main='by_shard')
    judged = (
        parsed.by_shard
        | 'GroupByShard' >> beam.GroupByKey()
        | 'JudgeCopies' >> beam.ParDo(
            _JudgeFn(self._window, self._span, self._too_late_live)).with_outputs(
                _COUNTS, main='by_window'))
    windows = (
        judged.by_window
        | 'MergeWindows' >> beam.CombinePerKey(_MergeWindow())
        | 'WindowTruth' >> beam.Map(_restated_window, self._window.size_ms))
    counts = (
        (parsed[_COUNTS], judged[_COUNTS])
        | 'AllCounts' >> beam.Flatten()
        | 'SumCounts' >> beam.CombinePerKey(_Sum()))
    return Restated(windows, counts)
