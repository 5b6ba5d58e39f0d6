"""Contract section 1 in one place: the rules a payload must pass to be an event
(plain Python; ``transforms.flow.parse.ParseEvents`` applies them in a pipeline)."""

from __future__ import annotations

import datetime
import json
import math
import re
from typing import Annotated, Dict, List, NamedTuple, Sequence, Tuple, Union

import msgspec
import numpy as np

from transforms.rules.model import (
    CUSTOMER_ID, CUSTOMER_ID_MAX_LENGTH, MAX_EVENT_TIME, MIN_EVENT_TIME)

MAX_PAYLOAD_BYTES = 64 * 1024
#: The deepest nesting of arrays and objects a payload may have (the event
#: object itself is level 1), ignored fields included.
MAX_NESTING = 128


class _Payload(msgspec.Struct):
  """The wire shape; unknown fields are ignored."""
  event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
  # its length checked here, its characters after decoding (CUSTOMER_ID: a
  # pattern in msgspec.Meta costs twice as much)
  customer_id: Annotated[str, msgspec.Meta(min_length=1, max_length=CUSTOMER_ID_MAX_LENGTH)]
  key: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
  value: Union[int, float]
  event_time: Union[int, str]


_DECODER = msgspec.json.Decoder(_Payload)

#: Only ASCII digits are digits (``\d`` and ``int()`` take any Unicode digit).
_RFC3339 = re.compile(
    r'([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?'
    r'(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))')
#: Per byte: +1 for an opening bracket, -1 for a closing one.
_BRACKET_STEPS = np.zeros(256, dtype=np.int8)
_BRACKET_STEPS[list(b'[{')] = 1
_BRACKET_STEPS[list(b']}')] = -1
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MS = datetime.timedelta(milliseconds=1)


class InvalidPayload(ValueError):
  """The payload breaks contract section 1; the message says how."""


#: Date and hour then zone -> epoch ms of that hour's start, for ``parse_rfc3339_ms``'s
#: common shape; cleared when it holds ``_HOURS_KEPT``.
_HOUR_STARTS: Dict[str, int] = {}
_HOURS_KEPT = 4096
_MINUTES = {f'{n:02d}': n for n in range(60)}
_MILLIS = {f'{n:03d}': n for n in range(1000)}


def parse_rfc3339_ms(text: str) -> int:
  """Epoch milliseconds of an RFC 3339 timestamp with a zone (sub-ms truncated)."""
  # The common shape, YYYY-MM-DDTHH:MM:SS.fff then Z or +HH:MM: the hour's start
  # with its zone parsed once (below), then minutes, seconds and milliseconds added.
  if len(text) in (24, 29) and text[13] == ':' and text[16] == ':' and text[19] == '.':
    minute, second = _MINUTES.get(text[14:16]), _MINUTES.get(text[17:19])
    millis = _MILLIS.get(text[20:23])
    if minute is not None and second is not None and millis is not None:
      hour = text[:13] + text[23:]
      start = _HOUR_STARTS.get(hour)
      if start is None:
        try:
          start = _parse_rfc3339_ms(f'{text[:13]}:00:00.000{text[23:]}')
        except InvalidPayload:
          return _parse_rfc3339_ms(text)  # which names the text
        if len(_HOUR_STARTS) >= _HOURS_KEPT:
          _HOUR_STARTS.clear()
        _HOUR_STARTS[hour] = start
      return start + minute * 60000 + second * 1000 + millis
  return _parse_rfc3339_ms(text)


def _parse_rfc3339_ms(text: str) -> int:
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


def nesting_depth(raw: bytes) -> int:
  """How deep arrays and objects nest in a JSON text (0 for a scalar),
  brackets inside strings aside; an unbalanced text counts its open brackets."""
  # Without its escaped backslashes and quotes, a text's strings are what lies
  # between the odd and the even quotes.
  text = np.frombuffer(raw.replace(b'\\\\', b'').replace(b'\\"', b''), dtype=np.uint8)
  steps = _BRACKET_STEPS[text]
  # (Counting quotes in a byte wraps around, which keeps the parity.)
  steps[(np.cumsum(text == ord('"'), dtype=np.uint8) & 1).view(bool)] = 0
  return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def _too_deep(depth: int) -> str:
  return f'payload is nested {depth} levels deep, over the limit of {MAX_NESTING}'


class _Names(list):
  """The member names of a JSON object, in order."""


def _names(pairs) -> _Names:
  return _Names(name for name, _ in pairs)


def _ignore(_) -> None:
  return None


def _check_fields_given_once(raw: bytes) -> None:
  # JSON leaves the meaning of a repeated name to the reader (msgspec checks
  # every copy and keeps the last), so a field given twice is invalid.
  try:
    names = json.loads(
        raw, object_pairs_hook=_names, parse_int=_ignore, parse_float=_ignore,
        parse_constant=_ignore)
  except (ValueError, RecursionError):
    return  # msgspec decoded it; its verdict stands
  for field in _Payload.__struct_fields__:
    if names.count(field) > 1:
      raise InvalidPayload(f'invalid field: {field} is given more than once')


def _check_members(raw: bytes) -> None:
  """The nesting and repeated-field rules, for a payload with other members."""
  # Cheap tests first: a payload with few brackets cannot be deep, and one
  # without escapes that writes each name once gives each field once.
  count = raw.count
  if count(b'[') + count(b'{') > MAX_NESTING:
    depth = nesting_depth(raw)
    if depth > MAX_NESTING:
      raise InvalidPayload(_too_deep(depth))
  if (count(b'"event_') > 2 or count(b'"key"') > 1 or count(b'"value"') > 1 or
      count(b'"customer_id"') > 1 or b'\\' in raw):
    _check_fields_given_once(raw)


def parse_payload(data: Union[str, bytes]) -> Tuple[str, str, str, float, int]:
  """Returns ``(event_id, customer_id, key, value, event_time_ms)``.

  Raises InvalidPayload with a readable reason naming the field. Besides the
  fields' rules, a payload must be UTF-8 (no lone surrogates, escaped or not),
  nest arrays and objects at most ``MAX_NESTING`` levels deep, and give each
  event field once.
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
  if not isinstance(data, str):
    try:
      raw.decode('utf-8')  # msgspec skips ignored fields unchecked
    except UnicodeDecodeError as e:
      raise InvalidPayload(f'payload is not valid UTF-8 ({e.reason} at byte {e.start})') from None
  # Decoding recurses once per level: a payload nested deeper than the stack
  # allows raises RecursionError, and one the decoder took is checked after.
  try:
    payload = _DECODER.decode(raw)
  except msgspec.ValidationError as e:
    raise InvalidPayload(f'invalid field: {e}') from None
  except msgspec.DecodeError as e:
    raise InvalidPayload(f'not a JSON object: {e}') from None
  except RecursionError:
    depth = nesting_depth(raw)
    raise InvalidPayload(  # within the limit only where the stack was nearly full
        _too_deep(depth) if depth > MAX_NESTING else 'payload is nested too deeply to decode'
    ) from None
  # As many quotes as the five fields need (their names, and the strings among
  # their values) leave no room for another member: nothing nests or repeats.
  if raw.count(b'"') != (18 if isinstance(payload.event_time, str) else 16):
    _check_members(raw)

  if CUSTOMER_ID.fullmatch(payload.customer_id) is None:
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


class ParsedPayloads(NamedTuple):
  """Payloads parsed together: the events column by column, each with its
  payload's position in the input, and the invalid payloads' positions and reasons."""
  position: List[int]
  event_id: List[str]
  customer_id: List[str]
  key: List[str]
  value: List[float]
  event_time: List[int]
  invalid: List[Tuple[int, str]]


#: Customer ids that passed ``CUSTOMER_ID`` (a run sees a handful), for ``parse_payloads``.
_CUSTOMER_IDS_SEEN: Dict[str, None] = {}


def parse_payloads(payloads: Sequence[str]) -> ParsedPayloads:
  """``parse_payload`` of each payload, as columns.

  A payload of the usual shape (ASCII text with the five fields and nothing
  else, a float value, a customer id seen before) is decoded and checked here
  at once; any other goes to ``parse_payload``, which decides it.
  """
  parsed = ParsedPayloads([], [], [], [], [], [], [])
  position, event_ids, customer_ids, keys, values, event_times, invalid = parsed
  decode, seen = _DECODER.decode, _CUSTOMER_IDS_SEEN
  for i, data in enumerate(payloads):
    try:
      if type(data) is str and len(data) <= MAX_PAYLOAD_BYTES and data.isascii():
        payload = decode(data)
        value, event_time, customer_id = payload.value, payload.event_time, payload.customer_id
        if isinstance(event_time, int):
          usual = data.count('"') == 16
        else:
          usual = data.count('"') == 18
          event_time = parse_rfc3339_ms(event_time)
        if (usual and type(value) is float and value - value == 0.0 and customer_id in seen
            and MIN_EVENT_TIME <= event_time < MAX_EVENT_TIME):
          position.append(i)
          event_ids.append(payload.event_id)
          customer_ids.append(customer_id)
          keys.append(payload.key)
          values.append(value)
          event_times.append(event_time)
          continue
      fields = parse_payload(data)
    except (InvalidPayload, msgspec.ValidationError, msgspec.DecodeError, RecursionError):
      try:
        fields = parse_payload(data)
      except InvalidPayload as e:
        invalid.append((i, str(e)))
        continue
    if len(seen) < 1024:
      seen[fields[1]] = None
    position.append(i)
    event_ids.append(fields[0])
    customer_ids.append(fields[1])
    keys.append(fields[2])
    values.append(fields[3])
    event_times.append(fields[4])
  return parsed
