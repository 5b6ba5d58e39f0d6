"""Where every event went: the per-run accounting record, and progress.

The record is computed from the data itself (a combine over every outcome),
not from Beam's user counters, which the streaming DirectRunner undercounts.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from typing import Dict, Iterable, Optional, Tuple

import apache_beam as beam
from apache_beam.transforms import trigger
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from transforms.rules.model import CATEGORIES


class _CountInBundleFn(beam.DoFn):
  """Counts a bundle's elements and emits ``(category, count)`` once, at the
  end of the bundle: one element per bundle crosses to the combine, not one
  per message."""

  def __init__(self, category: str):
    self._category = category

  def start_bundle(self):
    self._count = 0

  def process(self, element) -> Iterable:
    self._count += 1
    return ()

  def finish_bundle(self) -> Iterable:
    if self._count:
      yield WindowedValue(
          (self._category, self._count), MIN_TIMESTAMP, (GlobalWindow(),))


class _SumCategories(beam.CombineFn):

  def create_accumulator(self) -> Dict[str, int]:
    return dict.fromkeys(CATEGORIES, 0)

  def add_input(self, acc, counted: Tuple[str, int]):
    category, n = counted
    acc[category] += n
    return acc

  def merge_accumulators(self, accumulators):
    merged = self.create_accumulator()
    for acc in accumulators:
      for category, n in acc.items():
        merged[category] += n
    return merged

  def extract_output(self, acc) -> Dict[str, int]:
    return dict(acc)


def accounting_progress(record: Dict[str, int]) -> int:
  """How far an accounting record has come: the sum of its counts. The
  records of a run accumulate (each counts everything the one before did, and
  more), so a later record never ranks below an earlier one."""
  return sum(record[category] for category in CATEGORIES)


class CountOutcomes(beam.PTransform):
  """``{category: PCollection}`` to a stream of accounting records.

  Categories are the contract's (``received``, ``invalid``, ``too_late``,
  ``duplicate``, ``aggregated``). One record is emitted when the input ends
  (watermark at infinity); with ``update_every_s`` an accumulating record is also
  emitted that often in processing time, for unbounded runs. Elements are
  counted where they are, per bundle; only the counts travel.
  """

  def __init__(self, update_every_s: Optional[int] = None):
    super().__init__()
    if update_every_s is not None and update_every_s <= 0:
      raise ValueError(f'update_every_s must be positive, got {update_every_s!r}')
    self._every = update_every_s

  def expand(self, outcomes: Dict[str, beam.PCollection]) -> beam.PCollection[Dict[str, int]]:
    unknown = set(outcomes) - set(CATEGORIES)
    if unknown:
      raise ValueError(f'unknown accounting categories: {sorted(unknown)}')
    counted = [
        pcoll | f'Count_{category}' >> beam.ParDo(_CountInBundleFn(category))
        for category, pcoll in sorted(outcomes.items())
    ]
    early = trigger.AfterProcessingTime(self._every) if self._every else None
    return (
        counted
        | 'AllOutcomes' >> beam.Flatten()
        | 'WholeRun' >> beam.WindowInto(
            GlobalWindows(),
            trigger=trigger.AfterWatermark(early=early),
            accumulation_mode=trigger.AccumulationMode.ACCUMULATING)
        | 'Sum' >> beam.CombineGlobally(_SumCategories()).without_defaults())


class SumOutcomes(beam.PTransform):
  """The accounting of a bulk run, as one dict of every category: the sum of
  parts ``{category: messages}``, one PCollection per stage (``bulk.AdmitChunks``:
  each stage counts its outcomes in one output)."""

  def expand(self, parts: Tuple[beam.PCollection, ...]) -> beam.PCollection[Dict[str, int]]:
    return (
        parts
        | 'All' >> beam.Flatten()
        | 'Sum' >> beam.CombineGlobally(_SumParts()))


class _SumParts(beam.CombineFn):

  def create_accumulator(self) -> Dict[str, int]:
    return dict.fromkeys(CATEGORIES, 0)

  def add_input(self, acc, part: Dict[str, int]):
    for category, n in part.items():
      acc[category] += n
    return acc

  def merge_accumulators(self, accumulators):
    merged = self.create_accumulator()
    for acc in accumulators:
      self.add_input(merged, acc)
    return merged

  def extract_output(self, acc) -> Dict[str, int]:
    return acc


#: The launcher's pid, in the environment its worker processes inherit.
LAUNCHER_PID = 'TIDEMARK_LAUNCHER_PID'


#: Characters of the progress bar drawn on a terminal.
PROGRESS_BAR_WIDTH = 30


class _Progress:
  """Per-process progress; DoFn instances come and go (some runners make one
  per bundle), so the count lives here, keyed by the transform's id."""
  _lock = threading.Lock()
  _by_id: Dict[str, list] = {}

  @classmethod
  def tick(cls, progress_id: str, total: int, every_s: float, count: int = 1) -> None:
    now = time.monotonic()
    with cls._lock:
      state = cls._by_id.setdefault(progress_id, [0, now, now])
      state[0] += count
      seen, started, last = state
      if now - last < every_s and seen != total:
        return
      state[2] = now
    elapsed = now - started
    rate = f', {seen / elapsed:,.0f} msg/s' if elapsed >= 0.5 else ''
    share = f' ({100 * seen / total:.0f}%)' if total else ''
    # a worker process of a multi-process run counts its own share
    launcher = os.environ.get(LAUNCHER_PID)
    where = '' if launcher in (None, str(os.getpid())) else f' in worker {os.getpid()}'
    line = f'progress{where}: {seen:,}/{total:,} messages{share}{rate}'
    if where or not total or not sys.stderr.isatty():
      print(line, file=sys.stderr, flush=True)  # a log: plain lines
      return
    # a terminal: one bar, redrawn in place, ended at the last message
    done = min(seen, total) * PROGRESS_BAR_WIDTH // total
    bar = '#' * done + '.' * (PROGRESS_BAR_WIDTH - done)
    sys.stderr.write(f'\r[{bar}] {line}\033[K' + ('\n' if seen >= total else ''))
    sys.stderr.flush()


class _ProgressFn(beam.DoFn):

  def __init__(self, total: int, every_s: float, per_element: bool):
    self._total = total
    self._every = every_s
    self._per_element = per_element
    self._id = uuid.uuid4().hex

  def process(self, element) -> Iterable:
    _Progress.tick(self._id, self._total, self._every, 1 if self._per_element else len(element))
    yield element


class ReportProgress(beam.PTransform):
  """Passes elements through, printing a progress line to stderr every
  ``every_s`` seconds of wall time (per worker) and at the last message.
  Elements are messages, or with ``chunks`` lists of messages."""

  def __init__(self, total: int, every_s: float = 2.0, chunks: bool = False):
    super().__init__()
    if total < 0 or every_s <= 0:
      raise ValueError('total must be >= 0 and every_s > 0')
    self._total = total
    self._every = every_s
    self._chunks = chunks

  def expand(self, pcoll):
    # the elements keep their type, and so their coder
    return pcoll | 'Report' >> beam.ParDo(
        _ProgressFn(self._total, self._every, per_element=not self._chunks)).with_output_types(
            pcoll.element_type)
