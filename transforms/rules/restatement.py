"""Restating closed windows from their complete history (contract section 7).

A live run judges each event by the watermark it arrived under, so an event
beyond the allowed lateness never reaches its window. A restatement reads the
raw history of a closed range of windows again and applies the no-lateness rule:

* a window's restated value counts every valid event whose event time falls in
  it, each ``event_id`` once: its first copy in the source's order (a replay's
  line order; Kafka's record time, then source, partition and offset);
* invalid payloads stay invalid; later copies are duplicates.

To say *why* a window changes, the live run's decisions are reconstructed copy
by copy in the same order: a copy the live run dead-lettered as too late (its
``message_id`` is among the live dead letters) was too late; any other is a
duplicate or admitted by ``AdmissionRules``, with the watermark it arrived under
when the history records it (a replay) and, when it does not (a broker), with
every admitted id remembered. Where that reconstruction does not give the
value the sinks hold, the audit says so (``explained: false``).
"""

from __future__ import annotations

from typing import Container, Dict, Iterable, Iterator, NamedTuple, Optional, Tuple

from transforms.rules.admission import AdmissionRules
from transforms.rules.model import AGGREGATED, DUPLICATE, TOO_LATE, WindowSpec, iso_millis

#: The ``timing`` of a row a restatement writes: it supersedes the live panes.
RESTATED = 'RESTATED'

#: Why an ``event_id`` enters a window's restated value: its live copy was too late.
ADDED_TOO_LATE = 'too_late_live'
#: Why an ``event_id`` leaves a window: live admitted this later copy (its first copy
#: was too late, or its first copy's window had closed); it counts once, in the
#: window of its first copy.
REMOVED_LATER_COPY = 'later_copy_counted_live'


class RestateRange(NamedTuple):
  """The windows ``[start_ms, end_ms)`` of one window size; both ends on a window boundary."""
  start_ms: int
  end_ms: int

  def check(self, spec: WindowSpec) -> 'RestateRange':
    """The range if it is not empty and both ends are window boundaries;
    ValueError naming the end otherwise."""
    if self.end_ms <= self.start_ms:
      raise ValueError(f'the range ends ({iso_millis(self.end_ms)}) at or before it starts '
                       f'({iso_millis(self.start_ms)})')
    for name, instant in (('start', self.start_ms), ('end', self.end_ms)):
      if instant % spec.size_ms:
        raise ValueError(
            f'the range {name} {iso_millis(instant)} is not a window boundary (windows of '
            f'{spec.size_ms // 1000} s start at multiples of it since 1970-01-01T00:00:00Z)')
    return self

  def holds(self, window_start: int) -> bool:
    return self.start_ms <= window_start < self.end_ms

  def windows(self, spec: WindowSpec) -> int:
    return (self.end_ms - self.start_ms) // spec.size_ms


class HistoryCopy(NamedTuple):
  """One valid copy of an event, as read again from the history."""
  order: tuple  # its place in the source's order
  message_id: str
  event_id: str
  customer_id: str
  key: str
  value: float
  event_time: int
  #: the pipeline watermark it arrived under live, if the history records it
  watermark: Optional[int]


class Judged(NamedTuple):
  """A copy with the restatement's and the live run's decision."""
  copy: HistoryCopy
  restated: bool  # the id's first copy: counted by the restatement
  live: str  # TOO_LATE, DUPLICATE or AGGREGATED, as the live run decided
  #: the window start of the id's first copy (where the restatement counts it)
  first_window: int


def judge_copies(copies: Iterable[HistoryCopy], spec: WindowSpec,
                 too_late_live: Container[str]) -> Iterator[Judged]:
  """Every copy of a set of ids (all the copies of each), in the source's order,
  with the restatement's decision and the live run's, reconstructed."""
  rules = AdmissionRules(spec)
  ordered = sorted(copies, key=lambda c: c.order)
  first_window: Dict[str, int] = {}
  for c in ordered:
    first_window.setdefault(c.event_id, spec.start(c.event_time))
  first_closing: Dict[str, int] = {}  # live: the closing of the id's first admitted copy
  restated = set()
  for c in ordered:
    if c.message_id in too_late_live:
      live = TOO_LATE
    elif rules.duplicate(first_closing.get(c.event_id), c.watermark):
      live = DUPLICATE
    else:
      live = AGGREGATED
      first_closing[c.event_id] = spec.closing(c.event_time)
    first = c.event_id not in restated
    restated.add(c.event_id)
    yield Judged(c, first, live, first_window[c.event_id])


class IdChange(NamedTuple):
  """An ``event_id`` a restatement adds to a window or removes from it, and why."""
  event_id: str
  message_id: str
  reason: str


def id_change(judged: Judged) -> Optional[Tuple[bool, IdChange]]:
  """``(True, change)`` if the restatement adds the copy's id to its window,
  ``(False, change)`` if it removes it, None if both count it or neither does."""
  c = judged.copy
  if judged.restated and judged.live == TOO_LATE:  # an id's first copy is never a live duplicate
    return True, IdChange(c.event_id, c.message_id, ADDED_TOO_LATE)
  if judged.live == AGGREGATED and not judged.restated:
    return False, IdChange(c.event_id, c.message_id, REMOVED_LATER_COPY)
  return None


Figures = Tuple[int, float, Optional[float], Optional[float]]


def same_figures(stored: Optional[dict], figures: Figures) -> bool:
  """Whether a stored row (``count``, ``sum``, ``min``, ``max``) holds ``figures``;
  no row holds the figures of an empty window."""
  if stored is None:
    return figures[0] == 0
  return (stored['count'], stored['sum'], stored['min'], stored['max']) == tuple(figures)
