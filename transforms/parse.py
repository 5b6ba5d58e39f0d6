"""Contract section 1 in one place: a payload becomes an Event or a dead letter."""

from __future__ import annotations

import datetime
import math
import re
from typing import Annotated, Iterable, Union

import apache_beam as beam
import msgspec
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.utils.timestamp import Timestamp

from transforms.model import (
    INVALID, MAX_EVENT_TIME, MIN_EVENT_TIME, DeadLetter, Event, RawMessage)

MAX_PAYLOAD_BYTES = 64 * 1024

INVALID_TAG = 'invalid'


class _Payload(msgspec.Struct):
  """The wire shape; unknown fields are ignored."""
  event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
  customer_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]  # + _CUSTOMER_ID
  key: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
  value: Union[int, float]
  event_time: Union[int, str]


_DECODER = msgspec.json.Decoder(_Payload)
#: Checked after decoding: a pattern in msgspec.Meta costs twice as much.
_CUSTOMER_ID = re.compile(r'[A-Za-z0-9_.-]+')

_RFC3339 = re.compile(
    r'(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?'
    r'(?:([Zz])|([+-])(\d{2}):(\d{2}))')
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MS = datetime.timedelta(milliseconds=1)


class InvalidPayload(ValueError):
  """The payload breaks contract section 1; the message says how."""


def parse_rfc3339_ms(text: str) -> int:
  """Epoch milliseconds of an RFC 3339 timestamp with a zone (sub-ms truncated)."""
  match = _RFC3339.fullmatch(text)
  if match is None:
    raise InvalidPayload(
        f'event_time {text[:64]!r} is not an RFC 3339 timestamp with a zone')
  (year, month, day, hour, minute, second, fraction, zulu, sign, off_h,
   off_m) = match.groups()
  try:
    if zulu:
      zone = datetime.timezone.utc
    else:
      if int(off_h) > 23 or int(off_m) > 59:
        raise ValueError('zone offset out of range')
      offset = datetime.timedelta(hours=int(off_h), minutes=int(off_m))
      zone = datetime.timezone(-offset if sign == '-' else offset)
    instant = datetime.datetime(
        int(year), int(month), int(day), int(hour), int(minute), int(second),
        tzinfo=zone)
  except ValueError as e:
    raise InvalidPayload(f'event_time {text!r} is not a valid instant: {e}') from None
  millis = int((fraction or '0')[:3].ljust(3, '0'))
  return (instant - _EPOCH) // _MS + millis


def parse_payload(data: Union[str, bytes]) -> tuple:
  """Returns ``(event_id, customer_id, key, value, event_time_ms)``.

  Raises InvalidPayload with a readable reason naming the field.
  """
  if isinstance(data, str):
    try:
      raw = data.encode('utf-8')
    except UnicodeEncodeError:
      raise InvalidPayload('payload is not valid UTF-8 (lone surrogate)') from None
  else:
    raw = bytes(data)
  if len(raw) > MAX_PAYLOAD_BYTES:
    raise InvalidPayload(
        f'payload is {len(raw)} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit')
  try:
    payload = _DECODER.decode(raw)
  except msgspec.ValidationError as e:
    raise InvalidPayload(f'invalid field: {e}') from None
  except msgspec.DecodeError as e:
    raise InvalidPayload(f'not a JSON object: {e}') from None

  if _CUSTOMER_ID.fullmatch(payload.customer_id) is None:
    raise InvalidPayload(
        f'invalid field: customer_id {payload.customer_id[:64]!r} has characters outside '
        'A-Z a-z 0-9 _ . - - at `$.customer_id`')
  value = payload.value
  if isinstance(value, int):
    try:
      value = float(value)
    except OverflowError:
      raise InvalidPayload('value is out of the range of a double') from None
  if not math.isfinite(value):
    raise InvalidPayload('value is not a finite number')

  event_time = payload.event_time
  if isinstance(event_time, str):
    event_time = parse_rfc3339_ms(event_time)
  if not MIN_EVENT_TIME <= event_time < MAX_EVENT_TIME:
    raise InvalidPayload(
        f'event_time {event_time} ms is outside [2000-01-01T00:00:00Z, '
        '2100-01-01T00:00:00Z)')
  return (payload.event_id, payload.customer_id, payload.key, value, event_time)


def millis_to_timestamp(millis: int) -> Timestamp:
  return Timestamp(micros=millis * 1000)


class _ParseFn(beam.DoFn):

  def __init__(self):
    self.received = Metrics.counter('tidemark', 'received')
    self.invalid = Metrics.counter('tidemark', 'invalid')

  def process(self, message: RawMessage) -> Iterable:
    self.received.inc()
    try:
      fields = parse_payload(message.data)
    except InvalidPayload as e:
      self.invalid.inc()
      yield pvalue.TaggedOutput(
          INVALID_TAG, DeadLetter(INVALID, message.source, message.data, str(e)))
      return
    event = Event(*fields, message.source, message.data, message.arrival_watermark)
    yield beam.window.TimestampedValue(event, millis_to_timestamp(event.event_time))


class ParseEvents(beam.PTransform):
  """Payloads to timestamped Events; rule breakers to the ``invalid`` output.

  Returns a DoOutputsTuple with ``events`` (Event, stamped with its event
  time) and ``invalid`` (DeadLetter with reason ``invalid``).
  """

  def expand(self, messages: beam.PCollection[RawMessage]):
    outputs = messages | 'Validate' >> beam.ParDo(_ParseFn()).with_outputs(
        INVALID_TAG, main='events')
    return outputs
