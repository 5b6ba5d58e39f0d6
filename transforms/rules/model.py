"""The records that flow between Tidemark's transforms, and window arithmetic.

Everything here is plain data: no Beam, no I/O. Times are epoch milliseconds
(``int``) unless a name says otherwise.
"""

from __future__ import annotations

import base64
import codecs
import datetime
import re
import zlib
from typing import Dict, Iterable, NamedTuple, Optional, Sequence, Tuple, TypeVar

import numpy as np

#: An instant in epoch ms, or a NumPy array of them.
Millis = TypeVar('Millis', int, np.ndarray)

#: Event times must lie in [2000-01-01T00:00:00Z, 2100-01-01T00:00:00Z) (ms).
MIN_EVENT_TIME = 946684800000
MAX_EVENT_TIME = 4102444800000

#: A customer id (contract section 1), the one rule that payloads, sinks,
#: customer files and template options apply: 1 to 64 of A-Z a-z 0-9 _ . -
CUSTOMER_ID_MAX_LENGTH = 64
CUSTOMER_ID_PATTERN = f'[A-Za-z0-9_.-]{{1,{CUSTOMER_ID_MAX_LENGTH}}}'
CUSTOMER_ID = re.compile(CUSTOMER_ID_PATTERN)


def is_customer_id(text: object) -> bool:
  """Whether all of ``text`` is a customer id (``fullmatch``: a trailing
  newline is refused too)."""
  return isinstance(text, str) and CUSTOMER_ID.fullmatch(text) is not None


#: The contract's dead-letter reasons.
INVALID = 'invalid'
TOO_LATE = 'too_late'

#: Accounting categories, in the order the contract checks them.
RECEIVED = 'received'
DUPLICATE = 'duplicate'
AGGREGATED = 'aggregated'
CATEGORIES = (RECEIVED, INVALID, TOO_LATE, DUPLICATE, AGGREGATED)


class RawMessage(NamedTuple):
  """A message as a source delivered it: who sent it and the untouched payload.

  ``arrival_watermark`` is the pipeline watermark (epoch ms) when the message
  arrived, for a source that knows it (a replay states it line by line); it is
  None for a live source, whose watermark only the runner knows.
  ``message_id`` is the message's identity at its source (``message_identity``),
  the same every time the source delivers that message again.
  """
  source: str
  data: str
  arrival_watermark: Optional[int] = None
  message_id: Optional[str] = None


class Event(NamedTuple):
  """A payload that passed contract section 1, with where it came from."""
  event_id: str
  customer_id: str
  key: str
  value: float
  event_time: int  # epoch ms
  source: str
  data: str  # the payload exactly as received, for dead letters
  arrival_watermark: Optional[int] = None  # as in RawMessage
  message_id: Optional[str] = None  # as in RawMessage


def _escaped_bytes(error: UnicodeError):
  """Encoding error handler: a lone surrogate U+DC80..U+DCFF is the byte it
  stands for (PEP 383, how ``decode_payload`` keeps an undecodable byte); any
  other lone surrogate is its 3-byte form (``surrogatepass``)."""
  if not isinstance(error, UnicodeEncodeError):
    raise error
  out = bytearray()
  for ch in error.object[error.start:error.end]:
    code = ord(ch)
    out += bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else ch.encode(
        'utf-8', 'surrogatepass')
  return bytes(out), error.end


codecs.register_error('tidemark.payload', _escaped_bytes)


def payload_bytes(data: str) -> bytes:
  """The payload's exact bytes: what a byte source (Kafka, Pub/Sub) delivered,
  and for a replay file's string its UTF-8 form, each lone surrogate escape as
  above. The simulator publishes these bytes, so a replay's dead letters carry
  the same bytes whether it is read directly or through a broker."""
  return data.encode('utf-8', 'tidemark.payload')


def dead_letter_payload(record: dict) -> bytes:
  """The exact payload bytes of a dead letter's JSON object (contract section
  5): ``data_base64`` when the payload is not valid UTF-8, else ``data``."""
  if 'data_base64' in record:
    return base64.b64decode(record['data_base64'], validate=True)
  return record['data'].encode('utf-8')


class DeadLetter(NamedTuple):
  """A message that is not aggregated, and why (contract section 4), with the
  message's identity at its source where the source gives one."""
  reason: str  # INVALID or TOO_LATE
  source: str
  data: str
  detail: str
  message_id: Optional[str] = None

  def to_json_dict(self) -> dict:
    """The contract's object. A payload that is not valid UTF-8 has ``data``
    as valid text (each undecodable byte U+FFFD) and ``data_base64``, its exact
    bytes, so every JSON reader and text column accepts it (contract section 5)."""
    record = {'reason': self.reason, 'source': self.source, 'data': self.data,
              'detail': self.detail}
    if not self.data.isascii():
      exact = payload_bytes(self.data)
      text = exact.decode('utf-8', 'replace')
      if text != self.data:  # not valid UTF-8: it held a lone surrogate
        record['data'] = text
        record['data_base64'] = base64.b64encode(exact).decode('ascii')
    if self.message_id is not None:
      record['message_id'] = self.message_id
    return record


#: A window of the outputs: ``(customer_id, key, window_start, window_end)``.
WindowKey = Tuple[str, str, int, int]


def final_panes_of(panes: Iterable[dict]) -> Dict[WindowKey, dict]:
  """Contract section 4: a window's final value is its pane with the highest
  ``pane_index``; ``panes`` are aggregates.jsonl objects, in any order."""
  finals: Dict[WindowKey, dict] = {}
  for pane in panes:
    window = (pane['customer_id'], pane['key'], pane['window_start'], pane['window_end'])
    if window not in finals or pane['pane_index'] > finals[window]['pane_index']:
      finals[window] = pane
  return finals


def message_identity(kind: str, *parts) -> str:
  """A message's identity at its source, as dead letters carry it:
  ``kafka:TOPIC/PARTITION/OFFSET``, ``pubsub:SUBSCRIPTION/MESSAGE_ID``,
  ``replay:DIGEST/N`` (the Nth message of the replay file whose sha256 begins
  with DIGEST). A source that delivers a message again gives it the same
  identity, so a sink keyed by it stores each dead letter once."""
  return f'{kind}:' + '/'.join(str(part) for part in parts)


class WindowAggregate(NamedTuple):
  """One emitted pane of one ``(customer_id, key, window)``."""
  customer_id: str
  key: str
  window_start: int
  window_end: int
  count: int  # type: ignore[assignment]  # the contract's name; shadows tuple.count
  sum: float
  min: float
  max: float
  pane_index: int
  timing: str  # EARLY, ON_TIME or LATE

  def to_json_dict(self) -> dict:
    return self._asdict()


class WindowSpec(NamedTuple):
  """Fixed windows of ``size_ms`` with ``lateness_ms`` of allowed lateness.

  A window is half-open ``[start, start + size)``: an event at exactly a
  boundary belongs to the window that starts there, and to no other.

  Its instants are arithmetic: of an event time, or of a NumPy array of them.
  """
  size_ms: int
  lateness_ms: int

  def start(self, event_time: Millis) -> Millis:
    return event_time - event_time % self.size_ms

  def end(self, event_time: Millis) -> Millis:
    return event_time - event_time % self.size_ms + self.size_ms

  def expiry(self, event_time: Millis) -> Millis:
    """The instant ``end + lateness``: once the watermark is past it, the
    window is closed and anything for it is too late."""
    return event_time - event_time % self.size_ms + self.size_ms + self.lateness_ms

  def closing(self, event_time: Millis) -> Millis:
    """The first millisecond at which the window counts as closed: the
    watermark strictly past ``end + lateness``.

    This is Beam Python's rule for the instant ``end + lateness`` itself, and
    Tidemark applies it on every runner (contract section 3 leaves it to the
    runner), so that Flink and the DirectRunner agree event for event.
    """
    return event_time - event_time % self.size_ms + self.size_ms + self.lateness_ms + 1


def window_spec(window_size_s: int, allowed_lateness_s: int) -> WindowSpec:
  """Checks window settings (whole seconds) and returns them in milliseconds."""
  if isinstance(window_size_s, bool) or not isinstance(window_size_s, int) or window_size_s <= 0:
    raise ValueError(f'window_size_s must be a positive integer, got {window_size_s!r}')
  if (isinstance(allowed_lateness_s, bool) or not isinstance(allowed_lateness_s, int) or
      allowed_lateness_s < 0):
    raise ValueError(
        f'allowed_lateness_s must be a non-negative integer, got {allowed_lateness_s!r}')
  return WindowSpec(window_size_s * 1000, allowed_lateness_s * 1000)


def check_early_firing(early_firing_s) -> None:
  """Early panes: None (off) or a positive whole number of seconds."""
  if early_firing_s is not None and (
      isinstance(early_firing_s, bool) or not isinstance(early_firing_s, int) or
      early_firing_s <= 0):
    raise ValueError(f'early_firing_s must be a positive integer, got {early_firing_s!r}')


_EPOCH = datetime.datetime(1970, 1, 1)


def iso_millis(millis: int) -> str:
  """An instant (epoch ms) in RFC 3339, UTC (as Beam's ``Timestamp.to_rfc3339``)."""
  return (_EPOCH + datetime.timedelta(milliseconds=millis)).isoformat() + 'Z'


def stable_shard(event_id: str, shards: int) -> int:
  """A shard for ``event_id`` that is the same in every process and run: the
  crc32 of its UTF-8 bytes, modulo ``shards``."""
  if shards == 1:
    return 0
  return zlib.crc32(event_id.encode('utf-8')) % shards


def stable_shards(event_ids: Sequence[str], shards: int) -> np.ndarray:
  """``stable_shard`` of each id, as an array, in one call."""
  if shards == 1:
    return np.zeros(len(event_ids), dtype=np.int64)
  crc32 = zlib.crc32
  return np.array([crc32(event_id.encode('utf-8')) for event_id in event_ids],
                  dtype=np.int64) % shards
