"""Bulk replay: a whole replay file through the pipeline on a batch runner.

A replay is a stream written down, so everything a streaming runner learns as
time passes is known in advance: the pipeline watermark and the processing time
at each message's arrival, and the steps at which the watermark and processing
time move. The bulk transforms apply the same rules as the streaming ones to
that timeline, in chunks of thousands of messages (per-element overhead is what
limits a Python runner), and emit the same outputs:

* ``ReadReplayInChunks``: the indexed file (``transforms.rules.replay.index_replay``)
  read chunk by chunk, in parallel;
* ``ParseChunks``: contract section 1, by ``transforms.rules.payload.parse_payload``;
* ``AdmitChunks``: too late, duplicate or admitted, by
  ``transforms.rules.admission.AdmissionRules`` with the watermark each message
  arrived under, every copy of an ``event_id`` walked in arrival order in its
  shard;
* ``AggregateWindowsInBulk``: per window, the panes the streaming windows'
  trigger fires along the replay's timeline (``transforms.flow.replay_panes``).

Elements are lists (one per chunk, shard or window); only the outputs are single
records.
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import coder_impl

from transforms.flow.gate import DUPLICATE_TAG, TOO_LATE_TAG
from transforms.rules.admission import AdmissionRules
from transforms.flow import aggregate
from transforms.rules.model import (
    AGGREGATED, INVALID, DeadLetter, Event, WindowAggregate, check_early_firing, message_identity,
    WindowSpec, stable_shard)
from transforms.flow.parse import INVALID_TAG
from transforms.flow.replay_panes import (
    Arrival, StepClock, evaluated_early_firing, fire_panes_along)
from transforms.rules.payload import InvalidPayload, parse_payload
from transforms.rules.replay import Arrivals, ReplayIndex, read_chunk


#: A message in a chunk: (arrival index, step, pipeline watermark ms at arrival
#: or None, processing time s at arrival, source, payload).
Message = Tuple[int, int, Optional[int], float, str, str]
#: An event in a chunk, a plain tuple (cheap to encode): arrival index, step,
#: processing time s at arrival, the event's fields, the watermark it arrived
#: under, then where it came from. Past the too-late check only the first
#: ``ADMITTED_FIELDS`` travel on (dedup and aggregation need no payload).
Row = tuple
SEQ, STEP, ARRIVED_AT = 0, 1, 2
EVENT_ID, CUSTOMER_ID, KEY, VALUE, EVENT_TIME, ARRIVAL_WATERMARK, SOURCE, DATA = range(3, 11)
ADMITTED_FIELDS = ARRIVAL_WATERMARK + 1
#: The values of a window's admitted events for one ``(customer_id, key)``
#: that arrived in one step (so at one processing time): ``(customer_id, key,
#: step, processing time s, values)``. Panes fire between steps, so these are
#: all the trigger needs.
Partial = Tuple[str, str, int, float, List[float]]


def row_event(row: Row, digest: str) -> Event:
  """The row's event; ``digest`` is its replay's (``replay.replay_digest``)."""
  return Event(row[EVENT_ID], row[CUSTOMER_ID], row[KEY], row[VALUE], row[EVENT_TIME],
               row[SOURCE], row[DATA], row[ARRIVAL_WATERMARK],
               message_identity('replay', digest, row[SEQ] + 1))


class Chunk(list):
  """A list of messages, rows or dead letters that travels as one element."""


class ChunkCoder(beam.coders.Coder):
  """Pickle: fast for large nested lists, and it keeps the lone surrogates an
  invalid payload may hold. Its size estimate is a guess from the length, as
  the runner estimates sizes of sampled elements on every step and encoding a
  whole chunk to measure it costs as much as shipping it."""

  def _create_impl(self):
    return coder_impl.CallbackCoderImpl(
        lambda chunk: pickle.dumps(chunk, pickle.HIGHEST_PROTOCOL), pickle.loads,
        lambda chunk: _ROW_SIZE_GUESS * len(chunk))

  def is_deterministic(self) -> bool:
    return False

  def to_type_hint(self):
    return Chunk

  def __eq__(self, other):
    return type(self) is type(other)

  def __hash__(self):
    return hash(type(self))


_ROW_SIZE_GUESS = 256
#: The tag of ``AdmittedChunks.late``.
LATE_TAG = 'late'

beam.coders.registry.register_coder(Chunk, ChunkCoder)


class ReadReplayInChunks(beam.PTransform):
  """The indexed replay as lists of messages, one per chunk, read in parallel."""

  def __init__(self, index: ReplayIndex):
    super().__init__()
    self.index = index

  def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[List[Message]]:
    path = self.index.path
    return (
        pbegin
        | 'Chunks' >> beam.Create(self.index.chunks)
        | 'Spread' >> beam.Reshuffle()
        | 'Read' >> beam.Map(lambda chunk: Chunk(read_chunk(path, chunk))).with_output_types(Chunk))


class _ParseChunkFn(beam.DoFn):

  def __init__(self, digest: str):
    self._digest = digest

  def process(self, messages: List[Message]) -> Iterable:
    rows: List[Row] = Chunk()
    invalid: List[DeadLetter] = Chunk()
    digest = self._digest
    for seq, step, watermark, processing_time, source, data in messages:
      try:
        fields = parse_payload(data)
      except InvalidPayload as e:
        invalid.append(DeadLetter(INVALID, source, data, str(e),
                                  message_identity('replay', digest, seq + 1)))
        continue
      rows.append((seq, step, processing_time, *fields, watermark, source, data))
    yield rows
    if invalid:
      yield pvalue.TaggedOutput(INVALID_TAG, invalid)


class ParseChunks(beam.PTransform):
  """Payloads to Events, a chunk at a time.

  Returns a DoOutputsTuple: ``events`` (lists of rows) and ``invalid`` (lists
  of DeadLetter with reason ``invalid``).
  """

  def __init__(self, digest: str = ''):
    super().__init__()
    self._digest = digest

  def expand(self, chunks: beam.PCollection[List[Message]]):
    return chunks | 'Validate' >> beam.ParDo(_ParseChunkFn(self._digest)).with_output_types(
        Chunk).with_outputs(INVALID_TAG, main='events')


class _TooLateOrShardFn(beam.DoFn):
  """Rule 2 needs nothing but the row, so it is decided before the shuffle,
  where the payload is still at hand; the rest go to their id's shard. Every
  event that arrived after its window's end is noted as ``(seconds the
  watermark was past that end, whether it was too late)``."""

  def __init__(self, rules: AdmissionRules, shards: int, digest: str):
    self._rules = rules
    self._shards = shards
    self._digest = digest

  def process(self, rows: List[Row]) -> Iterable:
    rules, shards = self._rules, self._shards
    by_shard: Dict[int, List[Row]] = defaultdict(Chunk)
    too_late: List[DeadLetter] = Chunk()
    late: List[Tuple[float, bool]] = Chunk()
    past_end = rules.past_end
    for row in rows:
      known = row[ARRIVAL_WATERMARK]
      late_by = None if known is None else past_end(row[EVENT_TIME], known)
      # only an event that arrived after its window's end can be too late
      dropped = late_by is not None and rules.too_late(row[EVENT_TIME], known)
      if dropped:
        too_late.append(rules.too_late_letter(row_event(row, self._digest)))
      else:
        by_shard[stable_shard(row[EVENT_ID], shards)].append(row[:ADMITTED_FIELDS])
      if late_by is not None:
        late.append((late_by / 1000, dropped))
    yield from by_shard.items()
    if too_late:
      yield pvalue.TaggedOutput(TOO_LATE_TAG, too_late)
    if late:
      yield pvalue.TaggedOutput(LATE_TAG, late)


class _AdmitShardFn(beam.DoFn):
  """Every copy of the shard's ids in arrival order, decided by the rules; the
  admitted events leave as ``Partial``s, so only their values cross the
  shuffle by window."""

  #: How often (rows) the ids of closed windows are forgotten.
  PRUNE_EVERY = 50000

  def __init__(self, rules: AdmissionRules):
    self._rules = rules

  def process(self, element: Tuple[int, Iterable[List[Row]]]) -> Iterable:
    rules = self._rules
    spec = rules.spec
    _, chunks = element
    # each chunk's rows are a run of arrivals in order, and runs do not overlap
    rows = [row for chunk in sorted(chunks, key=lambda c: c[0][SEQ]) for row in chunk]
    first: Dict[str, int] = {}  # event_id -> closing of its first admitted copy
    # window start -> (customer_id, key, step) -> (processing time, values)
    by_window: Dict[int, Dict[Tuple[str, str, int], Tuple[float, List[float]]]] = (
        defaultdict(dict))
    duplicates = 0
    duplicate, closing, window_start = rules.duplicate, spec.closing, spec.start
    prune_at = self.PRUNE_EVERY
    for n, (_, step, arrived_at, event_id, customer_id, key, value, event_time,
            known) in enumerate(rows, 1):
      if not duplicate(first.get(event_id), known):  # too late was decided before the shuffle
        first[event_id] = closing(event_time)
        partials = by_window[window_start(event_time)]
        slot = (customer_id, key, step)
        partial = partials.get(slot)
        if partial is None:
          partials[slot] = (arrived_at, [value])
        else:
          partial[1].append(value)
      else:
        duplicates += 1
      if n == prune_at:
        prune_at += self.PRUNE_EVERY
        if known is not None:
          first = {i: c for i, c in first.items() if c > known}
    for start, partials in by_window.items():
      yield start, Chunk((customer_id, key, step, arrived_at, values)
                         for (customer_id, key, step), (arrived_at, values) in partials.items())
    yield pvalue.TaggedOutput(AGGREGATED, len(rows) - duplicates)
    yield pvalue.TaggedOutput(DUPLICATE_TAG, duplicates)


class AdmittedChunks(NamedTuple):
  """What ``AdmitChunks`` makes of the rows."""
  #: ``(window start, Partials)`` of admitted events
  admitted: beam.PCollection
  #: lists of DeadLetter with reason ``too_late``
  too_late: beam.PCollection
  #: per shard, how many copies were duplicates
  duplicate: beam.PCollection
  #: per shard, how many events were admitted
  aggregated: beam.PCollection
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
  """Too late, duplicate or admitted, for every row of every chunk; returns
  ``AdmittedChunks``. ``digest`` identifies the replay in the too-late dead
  letters' message ids."""

  def __init__(self, window: WindowSpec, shards: int = 8, digest: str = ''):
    super().__init__()
    if not isinstance(window, WindowSpec):
      raise TypeError(f'window must be a WindowSpec (model.window_spec), got {window!r}')
    self._digest = digest
    self._rules = AdmissionRules(window)
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
      raise ValueError(f'shards must be a positive integer, got {shards!r}')
    self._shards = shards

  def expand(self, rows: beam.PCollection[List[Row]]) -> AdmittedChunks:
    routed = rows | 'TooLateOrShard' >> beam.ParDo(
        _TooLateOrShardFn(self._rules, self._shards, self._digest)).with_output_types(
            Tuple[int, Chunk]).with_outputs(TOO_LATE_TAG, LATE_TAG, main='by_shard')
    admitted = (
        routed.by_shard
        | 'GroupByShard' >> beam.GroupByKey()
        | 'FirstCopies' >> beam.ParDo(_AdmitShardFn(self._rules)).with_output_types(
            Tuple[int, Chunk]).with_outputs(DUPLICATE_TAG, AGGREGATED, main='admitted'))
    return AdmittedChunks(
        admitted.admitted, routed[TOO_LATE_TAG], admitted[DUPLICATE_TAG],
        admitted[AGGREGATED], routed[LATE_TAG])


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
    rows: Sequence[Row],
    window_end: int,
    early_firing_s: Optional[int],
    watermark_steps: Sequence[Tuple[int, Optional[int]]],
    processing_time_steps: Sequence[Tuple[int, float]]) -> List[Tuple[str, tuple]]:
  """``fire_panes_along`` of a window's accepted rows for one key, in arrival
  order, and the replay's steps as listed."""
  arrivals: List[Arrival] = []
  for row in rows:
    if arrivals and arrivals[-1][0] == row[STEP]:
      arrivals[-1][2].append(row[VALUE])
    else:
      arrivals.append((row[STEP], row[ARRIVED_AT], [row[VALUE]]))
  return fire_panes_along(arrivals, window_end, early_firing_s,
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

  def process(self, element: Tuple[int, Iterable[List[Partial]]]) -> Iterable[WindowAggregate]:
    start, chunks = element
    # (customer_id, key) -> step -> (processing time, values): every shard's partials
    by_key: Dict[Tuple[str, str], Dict[int, Tuple[float, List[float]]]] = defaultdict(dict)
    for chunk in chunks:
      for customer_id, key, step, arrived_at, values in chunk:
        steps = by_key[(customer_id, key)]
        known = steps.get(step)
        if known is None:
          steps[step] = (arrived_at, values)
        else:
          known[1].extend(values)
    end = start + self._size_ms
    assert self._clock is not None  # made in setup
    for (customer_id, key), steps in by_key.items():
      arrivals = [(step, arrived_at, values)
                  for step, (arrived_at, values) in sorted(steps.items())]
      panes = fire_panes_along(arrivals, end, self._early, self._clock)
      for index, (timing, (count, total, low, high)) in enumerate(panes):
        yield WindowAggregate(
            customer_id, key, start, end, count, total, low, high, index, timing)


class AggregateWindowsInBulk(beam.PTransform):
  """The window aggregates of a whole replay, pane by pane.

  Takes ``(window start, Partials)`` of admitted events (AdmitChunks). Returns
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

  def expand(self, keyed_rows: beam.PCollection[Tuple[int, List[Row]]]):
    return (
        keyed_rows
        | 'GroupByWindow' >> beam.GroupByKey()
        | 'FirePanes' >> beam.ParDo(_AggregateWindowFn(
            self._size_ms, self._early, self._watermark_steps,
            self._processing_time_steps)).with_output_types(WindowAggregate))

