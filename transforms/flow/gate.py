"""The streaming gate: each parsed event too late, a duplicate, or admitted, as
``transforms.rules.admission.AdmissionRules`` decides, the moment it arrives.

How it works
------------
Events are keyed by a shard of their ``event_id`` (so every copy of an id meets
its first copy) and decided the moment they arrive: nothing is buffered, nothing
waits for a timer. What the gate needs is a lower bound of the watermark, and a
DoFn cannot read the watermark, only learn from its timers: an event-time timer
that fires at ``T`` proves the watermark reached ``T``. Each shard therefore
keeps one fact, ``closed``: the latest window (by index ``start / size``) whose
closing timer has fired. Closing instants lie on a grid, one per window, and the
shard keeps a timer armed at the next one; it also holds the gate's output
watermark there (Beam holds a DoFn's output watermark at its pending timers), so
the windowing downstream never drops what the gate admitted:

* an event whose window is at or before ``closed`` is too late (the watermark is
  provably past its closing);
* any other event is admitted or a duplicate at once. Its window's closing is at
  or after the next grid point, where the pending timer holds the watermark, so
  the GroupByKey downstream cannot have expired it.

Catching up after a jump of the watermark (a job start, a lagging source that
catches up, the end of a bounded read) would take one timer round per window
with a single timer, so the shard arms a *ladder*: rung ``j`` at the next grid
index that is a multiple of ``2**j``. Every rung the watermark has passed fires in
the same round, the highest one becomes ``closed``, and the gap to the
watermark halves with each round. The ladder stops at the last window an event
can fall in (event times end in 2100), so at the end of a bounded input every
shard's timers run out and the job finishes.

A shard's timers start with a **seed**: one element per shard, created with the
pipeline, that reaches the gate before the watermark leaves the beginning of
time. Until its seed arrives a shard knows the watermark is still there, so its
first events are admitted without waiting too.

A replay states the watermark each message arrived under
(``Event.arrival_watermark``); then the decision uses the larger of the two
bounds, which is the stated one (the gate cannot have learnt more than the
stream has shown it), and replays are exact on every runner.

State per shard: ``meta`` (``closed`` and a version token) and a journal of
``(window index, event_id)`` for the admitted first copies still open. The
journal is only appended to while events flow, and rewritten when a window
closes; lookups go to an index of the journal kept in the worker's memory, which
is trusted only while its token equals the token in ``meta`` (read once per key
and bundle), so a retried bundle, a restore from a checkpoint or a key handled by
another worker makes it be rebuilt from state. State and work per event are O(1).
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import coders
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.userstate import TimerSpec
from apache_beam.transforms.userstate import on_timer
from apache_beam.transforms.window import GlobalWindow, GlobalWindows, TimestampedValue
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.rules.admission import AdmissionRules, later_bound
from transforms.rules.model import (
    AGGREGATED, DUPLICATE, MAX_EVENT_TIME, MIN_EVENT_TIME, TOO_LATE, Event,
    WindowSpec, stable_shard)

TOO_LATE_TAG = TOO_LATE
DUPLICATE_TAG = DUPLICATE


class Grid(NamedTuple):
  """Windows by index (``start / size``) and the ladder of closing timers."""
  spec: WindowSpec

  @property
  def first(self) -> int:
    """The index of the first window an event can fall in (2000-01-01)."""
    return MIN_EVENT_TIME // self.spec.size_ms

  @property
  def last(self) -> int:
    """The index of the last window an event can fall in (before 2100-01-01)."""
    return (MAX_EVENT_TIME - 1) // self.spec.size_ms

  @property
  def rungs(self) -> int:
    """How many rungs reach from the first window to the last."""
    return (self.last - self.first).bit_length() + 1

  def closing(self, index: int) -> int:
    """The closing instant (ms) of window ``index``."""
    return self.spec.closing(index * self.spec.size_ms)

  def index_of_closing(self, closing_ms: int) -> int:
    return (closing_ms - self.spec.closing(0)) // self.spec.size_ms

  def rung(self, closed: int, j: int) -> int:
    """Rung ``j`` above ``closed``: the next window index that is a multiple of
    ``2**j``, no further than the last window."""
    return min(((closed >> j) + 1) << j, self.last)


class _Index:
  """A shard's admitted first copies, as in its journal, at ``token``."""
  __slots__ = ('token', 'closed', 'first', 'by_window', 'armed')

  def __init__(self, token: Optional[str], closed: Optional[int]):
    self.token = token
    self.closed = closed  # the latest window index known closed, or None
    self.first: Dict[str, int] = {}  # event_id -> window index of its first copy
    self.by_window: Dict[int, List[str]] = {}
    self.armed: Optional[List[Optional[int]]] = None  # rung -> window index (unknown: None)

  def add(self, event_id: str, window: int) -> None:
    self.first[event_id] = window
    self.by_window.setdefault(window, []).append(event_id)

  def expire(self, closed: int) -> bool:
    """Forgets the ids of windows up to ``closed``; returns whether any went."""
    gone = [w for w in self.by_window if w <= closed]
    for w in gone:
      for event_id in self.by_window.pop(w):
        if self.first.get(event_id) == w:
          del self.first[event_id]
    return bool(gone)

  def entries(self) -> Iterable[Tuple[int, str]]:
    for w, ids in self.by_window.items():
      for event_id in ids:
        if self.first.get(event_id) == w:
          yield w, event_id


class _Indexes:
  """The worker's indexes, per gate and shard: DoFn instances come and go
  (runners make them per concurrent bundle), the shards' indexes stay."""
  _lock = threading.Lock()
  _by_key: 'OrderedDict[Tuple[str, int], _Index]' = OrderedDict()
  _LIMIT = 4096

  @classmethod
  def get(cls, key: Tuple[str, int]) -> Optional[_Index]:
    with cls._lock:
      index = cls._by_key.get(key)
      if index is not None:
        cls._by_key.move_to_end(key)
      return index

  @classmethod
  def put(cls, key: Tuple[str, int], index: _Index) -> None:
    with cls._lock:
      cls._by_key[key] = index
      cls._by_key.move_to_end(key)
      while len(cls._by_key) > cls._LIMIT:
        cls._by_key.popitem(last=False)


#: A gate's input: (shard, the Events of one upstream bundle for that shard as
#: plain tuples, or None for the shard's seed). Batches make the keyed exchange,
#: and the state and timer machinery of a stateful DoFn, cost per bundle rather
#: than per event; plain tuples travel several times cheaper than named ones.
Batch = Tuple[int, Optional[List[tuple]]]


class _BatchByShardFn(beam.DoFn):
  """Events to one batch per shard per bundle, emitted when the bundle ends
  (before the stage's watermark moves on, so the gate still sees every event
  before any later watermark)."""

  def __init__(self, shards: int):
    self._shards = shards

  def start_bundle(self):
    self._batches: Dict[int, List[tuple]] = {}

  def process(self, event: Event) -> Iterable:
    shard = stable_shard(event.event_id, self._shards)
    batch = self._batches.get(shard)
    if batch is None:
      batch = self._batches[shard] = []
    batch.append(tuple(event))
    return ()

  def finish_bundle(self) -> Iterable:
    for shard, batch in self._batches.items():
      yield WindowedValue((shard, batch), MIN_TIMESTAMP, (GlobalWindow(),))
    self._batches = {}


class _AdmitFn(beam.DoFn):
  META = ReadModifyWriteStateSpec('meta', coders.FastPrimitivesCoder())
  JOURNAL = BagStateSpec('journal', coders.FastPrimitivesCoder())
  RUNG = TimerSpec('rung', TimeDomain.WATERMARK)

  def __init__(self, spec: WindowSpec):
    self._rules = AdmissionRules(spec)
    self._grid = Grid(spec)
    self._uid = uuid.uuid4().hex
    self.too_late = Metrics.counter('tidemark', TOO_LATE)
    self.duplicate = Metrics.counter('tidemark', DUPLICATE)
    self.aggregated = Metrics.counter('tidemark', AGGREGATED)
    # the setting the watermark alert compares with, beside the job's counters
    self._lateness_s = spec.lateness_ms // 1000
    self.allowed_lateness = Metrics.gauge('tidemark', 'allowed_lateness_seconds')

  def start_bundle(self):
    self.allowed_lateness.set(self._lateness_s)
    self._token = uuid.uuid4().hex[:16]
    self._checked: Dict[int, _Index] = {}

  def _index(self, shard: int, meta, journal) -> _Index:
    """The shard's index, checked against its state once per bundle."""
    index = self._checked.get(shard)
    if index is not None:
      return index
    stored = meta.read()
    key = (self._uid, shard)
    index = _Indexes.get(key)
    if stored is None:
      if index is None or index.token is not None:
        index = _Index(None, None)
    else:
      closed, token = stored
      if index is None or index.token != token:
        index = _Index(token, closed)
        for window, event_id in journal.read():
          if closed is None or window > closed:
            if index.first.get(event_id, window - 1) < window:
              index.add(event_id, window)
    _Indexes.put(key, index)
    self._checked[shard] = index
    return index

  def _changed(self, index: _Index, meta) -> None:
    index.token = self._token
    meta.write((index.closed, self._token))

  def _arm(self, index: _Index, rung) -> None:
    """Arms every rung of the ladder above ``index.closed`` not armed there yet."""
    grid = self._grid
    if index.closed is None or index.closed >= grid.last:
      return
    if index.armed is None:
      index.armed = [None] * grid.rungs
    for j in range(grid.rungs):
      target = grid.rung(index.closed, j)
      if index.armed[j] != target:
        rung.set(Timestamp(micros=grid.closing(target) * 1000), dynamic_timer_tag=str(j))
        index.armed[j] = target

  def process(
      self,
      element: Batch,
      meta=beam.DoFn.StateParam(META),
      journal=beam.DoFn.StateParam(JOURNAL),
      rung=beam.DoFn.TimerParam(RUNG)) -> Iterable:
    shard, batch = element
    index = self._index(shard, meta, journal)
    if batch is None:  # the shard's seed: the watermark is still at the beginning
      if index.closed is None:
        index.closed = self._grid.first - 1
        index.armed = None
        self._arm(index, rung)
        self._changed(index, meta)
      return
    rules, grid = self._rules, self._grid
    size_ms = grid.spec.size_ms
    chain = None if index.closed is None else grid.closing(index.closed)
    first_of = index.first
    too_late = duplicates = admitted = 0
    for fields in batch:
      event = Event(*fields)
      known = later_bound(event.arrival_watermark, chain)
      first = first_of.get(event.event_id)
      outcome = rules.decide(
          event.event_time, known, None if first is None else grid.closing(first))
      if outcome == AGGREGATED:
        window = event.event_time // size_ms
        index.add(event.event_id, window)
        journal.add((window, event.event_id))
        admitted += 1
        yield TimestampedValue(event, Timestamp(micros=event.event_time * 1000))
      elif outcome == TOO_LATE:
        too_late += 1
        yield pvalue.TaggedOutput(TOO_LATE_TAG, rules.too_late_letter(event))
      else:
        duplicates += 1
        assert first is not None  # a duplicate has a first copy
        yield pvalue.TaggedOutput(
            DUPLICATE_TAG, rules.duplicate_record(event, first * size_ms))
    if admitted:
      self._changed(index, meta)
      self.aggregated.inc(admitted)
    if too_late:
      self.too_late.inc(too_late)
    if duplicates:
      self.duplicate.inc(duplicates)

  @on_timer(RUNG)
  def on_rung(
      self,
      shard=beam.DoFn.KeyParam,
      timestamp=beam.DoFn.TimestampParam,
      tag=beam.DoFn.DynamicTimerTagParam,
      meta=beam.DoFn.StateParam(META),
      journal=beam.DoFn.StateParam(JOURNAL),
      rung=beam.DoFn.TimerParam(RUNG)):
    index = self._index(shard, meta, journal)
    if index.armed is not None:
      index.armed[int(tag)] = None  # fired: no longer armed
    fired = self._grid.index_of_closing(timestamp.micros // 1000)
    if index.closed is not None and fired > index.closed:
      index.closed = fired
      if index.expire(fired):
        journal.clear()
        for entry in index.entries():
          journal.add(entry)
    self._arm(index, rung)
    self._changed(index, meta)


class AdmittedEvents(NamedTuple):
  """What ``RouteAndDeduplicate`` makes of the events."""
  #: Event: the first copies, admitted into their windows
  admitted: beam.PCollection
  #: DeadLetter with reason ``too_late``
  too_late: beam.PCollection
  #: DeadLetter with reason ``duplicate``: later copies of an admitted event_id
  duplicates: beam.PCollection


class RouteAndDeduplicate(beam.PTransform):
  """Events to ``AdmittedEvents``: too late, duplicate or admitted, at once.

  One keyed exchange by a shard of ``event_id`` serves both rules; see the
  module docstring for how a shard learns the watermark without waiting. Events
  that carry their arrival watermark (replays) are decided by it exactly.
  """

  def __init__(self, window: WindowSpec, shards: int = 4):
    super().__init__()
    if not isinstance(window, WindowSpec):
      raise TypeError(f'window must be a WindowSpec (model.window_spec), got {window!r}')
    self._spec = window
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
      raise ValueError(f'shards must be a positive integer, got {shards!r}')
    self._shards = shards

  def expand(self, events: beam.PCollection[Event]) -> AdmittedEvents:
    shards = self._shards
    if events.windowing.windowfn != GlobalWindows():
      events = events | 'InGlobalWindow' >> beam.WindowInto(GlobalWindows())
    batches = events | 'BatchByShard' >> beam.ParDo(
        _BatchByShardFn(shards)).with_output_types(Batch)
    seeds = (
        events.pipeline
        | 'Seeds' >> beam.Create([(shard, None) for shard in range(shards)]).with_output_types(
            Batch))
    gated = (
        (batches, seeds)
        | 'WithSeeds' >> beam.Flatten()
        | 'Admit' >> beam.ParDo(_AdmitFn(self._spec)).with_output_types(Event).with_outputs(
            TOO_LATE_TAG, DUPLICATE_TAG, main='admitted'))
    return AdmittedEvents(gated.admitted, gated[TOO_LATE_TAG], gated[DUPLICATE_TAG])
