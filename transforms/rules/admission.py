"""Where an event goes once it parses: too late, duplicate, or admitted.

The contract's rules 2 to 4 (``docs/contract.md``, section 3) live here, once,
for every path: ``AdmissionRules`` decides one event from the watermark it
arrived under and the first accepted copy of its ``event_id``; the streaming
gate (``transforms.flow.gate.RouteAndDeduplicate``) and the bulk replay
(``transforms.flow.bulk``) both call it.

* **too late**: the watermark had reached the window's closing instant
  (``WindowSpec.closing``: strictly past ``end + allowed lateness``);
* **duplicate**: an earlier copy of the ``event_id`` was admitted and that first
  copy's window had not closed, whatever window this copy falls in; once the
  first copy's window closes its id is forgotten and a later copy is judged afresh;
* **admitted**: everything else; the copy becomes the id's first copy.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from transforms.rules.model import (
    AGGREGATED, DUPLICATE, TOO_LATE, DeadLetter, Event, WindowSpec, iso_millis)


class AdmissionRules(NamedTuple):
  """Rules 2-4 of the contract's section 3 for one window size and lateness.

  ``known`` is a lower bound of the pipeline watermark when the event arrived
  (epoch ms; None for the beginning of time); ``first_closing`` the closing
  instant (``WindowSpec.closing``) of the first admitted copy of its id, if any.
  """
  spec: WindowSpec

  def too_late(self, event_time: int, known: Optional[int]) -> bool:
    """Rule 2: the event's window had closed when it arrived."""
    return known is not None and known >= self.spec.closing(event_time)

  def past_end(self, event_time: int, known: Optional[int]) -> Optional[int]:
    """How far (ms) the watermark was past the event's window end when it
    arrived; None if it had not reached that end (or was unknown)."""
    if known is None:
      return None
    behind = known - self.spec.end(event_time)
    return behind if behind >= 0 else None

  def duplicate(self, first_closing: Optional[int], known: Optional[int]) -> bool:
    """Rule 3: the id's first copy was admitted and its window had not closed."""
    return first_closing is not None and (known is None or first_closing > known)

  def decide(self, event_time: int, known: Optional[int],
             first_closing: Optional[int]) -> str:
    """``TOO_LATE``, ``DUPLICATE`` or ``AGGREGATED`` (admitted), in the
    contract's order."""
    if self.too_late(event_time, known):
      return TOO_LATE
    if self.duplicate(first_closing, known):
      return DUPLICATE
    return AGGREGATED

  def too_late_letter(self, event: Event) -> DeadLetter:
    """The dead letter of an event whose window had closed when it arrived."""
    end = self.spec.end(event.event_time)
    detail = (
        f'event_time {iso_millis(event.event_time)} is in window '
        f'[{iso_millis(end - self.spec.size_ms)}, {iso_millis(end)}), which closed at '
        f'{iso_millis(end + self.spec.lateness_ms)} (allowed lateness '
        f'{self.spec.lateness_ms // 1000} s); the watermark had passed that when the '
        'message arrived')
    return DeadLetter(TOO_LATE, event.source, event.data, detail, event.message_id)

  def duplicate_record(self, event: Event, first_window_start: int) -> DeadLetter:
    """The record of a copy dropped as a duplicate (``reason: duplicate``)."""
    start = first_window_start
    detail = (
        f'event_id {event.event_id!r} was already aggregated in window '
        f'[{iso_millis(start)}, {iso_millis(start + self.spec.size_ms)}), which had not '
        'closed when this copy arrived')
    return DeadLetter(DUPLICATE, event.source, event.data, detail, event.message_id)


def later_bound(a: Optional[int], b: Optional[int]) -> Optional[int]:
  """The larger of two watermark lower bounds (None: the beginning of time)."""
  if a is None:
    return b
  if b is None:
    return a
  return max(a, b)
