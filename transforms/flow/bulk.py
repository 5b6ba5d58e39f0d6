"""Bulk replay: a whole replay file through the pipeline on a batch runner.

A replay is a stream written down, so everything a streaming runner learns as
time passes is known in advance: the pipeline watermark and the processing time
at each message's arrival, and the steps at which the watermark and processing
time move. The bulk transforms apply the same rules as the streaming ones to
that timeline, in chunks of thousands of messages (per-element overhead is what
limits a Python runner), and emit the same outputs:

* ``ReadReplayInChunks``: the indexed file (``transforms.rules.replay.index_replay``)
  read chunk by chunk, in parallel (``transforms.rules.replay_chunks``);
* ``ParseChunks``: contract section 1, by ``transforms.rules.payload.parse_payloads``;
* ``AdmitChunks``: too late, duplicate or admitted, by
  ``transforms.rules.admission.AdmissionRules`` with the watermark each message
  arrived under, every copy of an ``event_id`` walked in arrival order in its
  shard;
* ``AggregateWindowsInBulk``: per window, the panes the streaming windows'
  trigger fires along the replay's timeline (``transforms.flow.replay_panes``).

Elements are chunks, one per chunk of the file, shard or window, their events
column by column (``transforms.flow.chunks``); only the outputs are single records.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam import pvalue

from transforms.rules.admission import AdmissionRules
from transforms.flow import aggregate
from transforms.flow.chunks import Chunk, ParsedChunk, Rows
from transforms.rules.model import (
    AGGREGATED, DUPLICATE, INVALID, RECEIVED, TOO_LATE, DeadLetter, Event, WindowAggregate, check_early_firing, message_identity,
    WindowSpec, stable_shards)
from transforms.flow.replay_panes import (
    NO_WATERMARK, Arrival, StepClock, evaluated_early_firing, fire_panes_along)
from transforms.rules.payload import parse_payloads
from transforms.rules.replay import Arrivals
from transforms.rules.replay_index import ChunkColumns, ReplayIndex, read_chunk_columns


#: The tags of ``AdmittedChunks.late``, ``dead_letters`` and ``counts``.
LATE_TAG = 'late'
DEAD_LETTER_TAG = 'dead_letters'
COUNTS_TAG = 'counts'


class ReadReplayInChunks(beam.PTransform):
  """The indexed replay as chunks of messages (``ChunkColumns``), read in parallel."""

  def __init__(self, index: ReplayIndex):
    super().__init__()
    self.index = index

  def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[ChunkColumns]:
    path = self.index.path
    return (
        pbegin
        | 'Chunks' >> beam.Create(self.index.chunks)
        | 'Spread' >> beam.Reshuffle()
        | 'Read' >> beam.Map(lambda chunk: read_chunk_columns(path, chunk)).with_output_types(
            ChunkColumns))


class _ParseChunkFn(beam.DoFn):

  def __init__(self, digest: str):
    self._digest = digest

  def process(self, chunk: ChunkColumns) -> Iterable[ParsedChunk]:
    parsed = parse_payloads(chunk.data)
    first, sources, datas = chunk.first, chunk.source, chunk.data
    at = parsed.position
    pairs: Dict[Tuple[str, str], int] = {}
    pair = np.array([pairs.setdefault(p, len(pairs))
                     for p in zip(parsed.customer_id, parsed.key)], dtype=np.int32)
    yield ParsedChunk(
        Rows(first, np.array(chunk.step, dtype=np.int64)[at], pair, list(pairs),
             np.array(parsed.value, dtype=np.float64),
             np.array(parsed.event_time, dtype=np.int64), parsed.event_id),
        at, sources, datas,
        [DeadLetter(INVALID, sources[i], datas[i], reason,
                    message_identity('replay', self._digest, first + i + 1))
         for i, reason in parsed.invalid])


class ParseChunks(beam.PTransform):
  """Payloads to events, a chunk at a time: ``ParsedChunk``s, each with its
  invalid payloads' dead letters (reason ``invalid``)."""

  def __init__(self, digest: str = ''):
    super().__init__()
    self._digest = digest

  def expand(self, chunks: beam.PCollection[ChunkColumns]) -> beam.PCollection[ParsedChunk]:
    return chunks | 'Validate' >> beam.ParDo(_ParseChunkFn(self._digest)).with_output_types(
        ParsedChunk)


def _known(watermark: int) -> Optional[int]:
  return None if watermark == NO_WATERMARK else watermark


class _TooLateOrShardFn(beam.DoFn):
  """Rule 2 needs nothing but the row, so it is decided before the shuffle,
  where the payload is still at hand; the rest go to their id's shard. The
  chunk's dead letters (invalid, too late) leave in one output, and its counts
  in another: the multi-process DirectRunner lost elements of a Flatten of two
  outputs of one fused stage (whole chunks of dead letters, at a few million
  messages), so the bulk graph has none.
  Every event that arrived after its window's end is noted as ``(seconds the
  watermark was past that end, whether it was too late)``."""

  def __init__(self, rules: AdmissionRules, shards: int, digest: str, clock: StepClock):
    self._rules = rules
    self._shards = shards
    self._digest = digest
    self._clock = clock

  def process(self, parsed: ParsedChunk) -> Iterable:
    rules, rows = self._rules, parsed.rows
    assert rows.event_id is not None and rows.event_time is not None
    watermark = self._clock.watermark_at(rows.step)
    # only an event that arrived after its window's end can be too late: the
    # rules decide those, one by one
    after_end = np.flatnonzero(watermark >= rules.spec.end(rows.event_time))
    kept = np.ones(len(rows), dtype=bool)
    too_late: List[DeadLetter] = Chunk()
    late: List[Tuple[float, bool]] = Chunk()
    for i in after_end.tolist():
      event_time, known = int(rows.event_time[i]), _known(int(watermark[i]))
      late_by = rules.past_end(event_time, known)
      if late_by is None:
        continue
      dropped = rules.too_late(event_time, known)
      if dropped:
        kept[i] = False
        customer_id, key = rows.pairs[rows.pair[i]]
        at = parsed.position[i]
        too_late.append(rules.too_late_letter(Event(
            rows.event_id[i], customer_id, key, float(rows.value[i]), event_time,
            parsed.source[at], parsed.data[at], known,
            message_identity('replay', self._digest, rows.first + at + 1))))
      late.append((late_by / 1000, dropped))
    if parsed.invalid or too_late:
      yield pvalue.TaggedOutput(DEAD_LETTER_TAG, Chunk(parsed.invalid + too_late))
    yield pvalue.TaggedOutput(COUNTS_TAG, {
        RECEIVED: parsed.messages, INVALID: len(parsed.invalid), TOO_LATE: len(too_late)})
    if late:
      yield pvalue.TaggedOutput(LATE_TAG, late)
    if too_late:
      rows = rows.take(np.flatnonzero(kept))
    assert rows.event_id is not None
    yield from rows.split_by(stable_shards(rows.event_id, self._shards))


class _AdmitShardFn(beam.DoFn):
  """Every copy of the shard's ids in arrival order, decided by the rules: an
  id that arrived once is admitted (too late was decided before the shuffle),
  the copies of an id that arrived more than once are walked in order. The
  admitted events leave by window start, as their step, pair and value."""

  def __init__(self, rules: AdmissionRules, clock: StepClock):
    self._rules = rules
    self._clock = clock

  def process(self, element: Tuple[int, Iterable[Rows]]) -> Iterable:
    rules = self._rules
    spec = rules.spec
    _, parts = element
    # each part is a run of arrivals in order, and runs do not overlap
    rows = Rows.concatenate(sorted(parts, key=lambda part: part.first))
    assert rows.event_id is not None and rows.event_time is not None
    copies = Counter(rows.event_id)
    repeated = [] if len(copies) == len(rows) else np.flatnonzero(np.fromiter(
        map(copies.__getitem__, rows.event_id), dtype=np.int64, count=len(rows)) > 1).tolist()
    admitted = np.ones(len(rows), dtype=bool)
    first: Dict[str, int] = {}  # event_id -> closing of its first admitted copy
    duplicate, closing = rules.duplicate, spec.closing
    watermark = self._clock.watermark_at(rows.step[repeated]).tolist()
    for i, known in zip(repeated, watermark):
      event_id = rows.event_id[i]
      if duplicate(first.get(event_id), _known(known)):
        admitted[i] = False
      else:
        first[event_id] = closing(int(rows.event_time[i]))
    kept = np.flatnonzero(admitted)
    yield from rows.take(kept).split_by(spec.start(rows.event_time[kept]), events=False)
    yield pvalue.TaggedOutput(
        COUNTS_TAG, {AGGREGATED: len(kept), DUPLICATE: len(rows) - len(kept)})


class AdmittedChunks(NamedTuple):
  """What ``AdmitChunks`` makes of the rows."""
  #: ``(window start, Rows)`` of admitted events
  admitted: beam.PCollection
  #: lists of DeadLetter: the invalid payloads and the too-late events
  dead_letters: beam.PCollection
  #: ``{category: messages}`` of the outcomes, per chunk and per shard: the
  #: accounting's parts (``accounting.SumOutcomes``)
  counts: Tuple[beam.PCollection, beam.PCollection]
  #: lists of ``(seconds the watermark was past the window end, too late)``
  #: of the events that arrived after their window's end
  late: beam.PCollection


#: About how many rows a dedup shard may hold: its rows are one element.
ROWS_PER_SHARD = 50_000


def shards_for(messages: int) -> int:
  """Dedup shards for a replay of ``messages``: 8 (enough for every worker of a
  machine), more for a replay whose shards would hold over ``ROWS_PER_SHARD`` rows."""
  return max(8, -(-messages // ROWS_PER_SHARD))


class AdmitChunks(beam.PTransform):
  """Too late, duplicate or admitted, for every row of every chunk of the
  indexed replay (whose steps give each row's arrival watermark and whose
  digest identifies its messages in the too-late dead letters); returns
  ``AdmittedChunks``."""

  def __init__(self, window: WindowSpec, index: ReplayIndex, shards: Optional[int] = None):
    super().__init__()
    if not isinstance(window, WindowSpec):
      raise TypeError(f'window must be a WindowSpec (model.window_spec), got {window!r}')
    if shards is None:
      shards = shards_for(index.messages)
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
      raise ValueError(f'shards must be a positive integer, got {shards!r}')
    self._rules = AdmissionRules(window)
    self._shards = shards
    self._digest = index.digest
    self._clock = StepClock.of(index.watermark_steps, index.processing_time_steps)

  def expand(self, parsed: beam.PCollection[ParsedChunk]) -> AdmittedChunks:
    routed = parsed | 'TooLateOrShard' >> beam.ParDo(
        _TooLateOrShardFn(self._rules, self._shards, self._digest, self._clock)
    ).with_output_types(Tuple[int, Rows]).with_outputs(
        DEAD_LETTER_TAG, COUNTS_TAG, LATE_TAG, main='by_shard')
    admitted = (
        routed.by_shard
        | 'GroupByShard' >> beam.GroupByKey()
        | 'FirstCopies' >> beam.ParDo(_AdmitShardFn(self._rules, self._clock)).with_output_types(
            Tuple[int, Rows]).with_outputs(COUNTS_TAG, main='admitted'))
    return AdmittedChunks(
        admitted.admitted, routed[DEAD_LETTER_TAG], (routed[COUNTS_TAG], admitted[COUNTS_TAG]),
        routed[LATE_TAG])


class DescribeArrivals(beam.PTransform):
  """What the replay delivered (``Arrivals``, from its index) and how late its
  late events were (``AdmittedChunks.late``), as one record: ``{"received":
  {source: messages}, "watermarks": {source: [[messages so far, watermark ms],
  ...]}, "late": [[seconds past the window end, too late], ...]}``."""

  def __init__(self, arrivals: Arrivals):
    super().__init__()
    if not isinstance(arrivals, Arrivals):
      raise TypeError(f'arrivals must be the index\'s Arrivals, got {arrivals!r}')
    self._delivered = arrivals.to_json_dict()

  def expand(self, late: beam.PCollection[List[Tuple[float, bool]]]) -> beam.PCollection[dict]:
    delivered = self._delivered
    return (
        late
        | 'AllLate' >> beam.combiners.ToList()
        | 'Describe' >> beam.Map(lambda chunks: {
            **delivered, 'late': sorted([behind, too_late] for chunk in chunks
                                        for behind, too_late in chunk)}))


def fire_panes(
    arrivals: Sequence[Tuple[int, float, float]],
    window_end: int,
    early_firing_s: Optional[int],
    watermark_steps: Sequence[Tuple[int, Optional[int]]],
    processing_time_steps: Sequence[Tuple[int, float]]) -> List[Tuple[str, tuple]]:
  """``fire_panes_along`` of a window's accepted events for one key, each as
  ``(step, processing time s, value)`` in arrival order, and the replay's
  steps as listed."""
  grouped: List[Arrival] = []
  for step, arrived_at, value in arrivals:
    if grouped and grouped[-1][0] == step:
      grouped[-1][2].append(value)
    else:
      grouped.append((step, arrived_at, [value]))
  return fire_panes_along(grouped, window_end, early_firing_s,
                          StepClock.of(watermark_steps, processing_time_steps))


class _AggregateWindowFn(beam.DoFn):

  def __init__(self, size_ms: int, early_firing_s: Optional[int],
               watermark_steps, processing_time_steps):
    self._size_ms = size_ms
    self._early = early_firing_s
    self._watermark_steps = watermark_steps
    self._processing_time_steps = processing_time_steps
    self._clock: Optional[StepClock] = None

  def setup(self):
    self._clock = StepClock.of(self._watermark_steps, self._processing_time_steps)

  def process(self, element: Tuple[int, Iterable[Rows]]) -> Iterable[WindowAggregate]:
    start, parts = element
    rows = Rows.concatenate(list(parts))
    clock = self._clock
    assert clock is not None  # made in setup
    # the window's events by (customer_id, key), then by step
    order = np.lexsort((rows.step, rows.pair))
    pair, steps = rows.pair[order], rows.step[order]
    cuts = np.flatnonzero((np.diff(pair) != 0) | (np.diff(steps) != 0)) + 1
    heads = np.concatenate(([0], cuts)).tolist()
    by_pair: Dict[int, List[Arrival]] = defaultdict(list)
    for head, values in zip(heads, np.split(rows.value[order], cuts)):
      step = int(steps[head])
      by_pair[int(pair[head])].append((step, clock.processing_time_at(step), values.tolist()))
    end = start + self._size_ms
    for number, arrivals in by_pair.items():
      customer_id, key = rows.pairs[number]
      panes = fire_panes_along(arrivals, end, self._early, clock)
      for index, (timing, (count, total, low, high)) in enumerate(panes):
        yield WindowAggregate(
            customer_id, key, start, end, count, total, low, high, index, timing)


class AggregateWindowsInBulk(beam.PTransform):
  """The window aggregates of a whole replay, pane by pane.

  Takes ``(window start, Rows)`` of admitted events (AdmitChunks). Returns
  WindowAggregate, every pane.
  """

  def __init__(self, window: WindowSpec, early_firing_s: Optional[int], index: ReplayIndex):
    super().__init__()
    if not isinstance(window, WindowSpec):
      raise TypeError(f'window must be a WindowSpec (model.window_spec), got {window!r}')
    check_early_firing(early_firing_s)
    self._size_ms = window.size_ms
    # the streaming windows' own trigger, evaluated along the replay's timeline
    self._early = evaluated_early_firing(
        aggregate.pane_trigger(early_firing_s), aggregate.PANE_ACCUMULATION)
    self._watermark_steps = index.watermark_steps
    self._processing_time_steps = index.processing_time_steps

  def expand(self, keyed_rows: beam.PCollection[Tuple[int, Rows]]):
    return (
        keyed_rows
        | 'GroupByWindow' >> beam.GroupByKey()
        | 'FirePanes' >> beam.ParDo(_AggregateWindowFn(
            self._size_ms, self._early, self._watermark_steps,
            self._processing_time_steps)).with_output_types(WindowAggregate))

