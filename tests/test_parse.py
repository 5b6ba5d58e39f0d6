"""Contract section 1: which payloads are events, and why the others are not."""

import datetime
import json
import math
import string
import sys

import pytest
from hypothesis import given, settings, strategies as st

from tools import reference
from transforms.rules import payload as payload_module
from transforms.rules.payload import (
    MAX_NESTING, MAX_PAYLOAD_BYTES, InvalidPayload, nesting_depth, parse_payload, parse_payloads,
    parse_rfc3339_ms)

GOOD = {'event_id': 'e-1', 'customer_id': 'fin.serve_1-x', 'key': 'AAPL', 'value': 12.5,
        'event_time': 1705543260000}


def body(**changes) -> str:
  obj = {**GOOD, **changes}
  return json.dumps({k: v for k, v in obj.items() if v is not ...})


@pytest.mark.parametrize('event_time, millis', [
    (1705543260000, 1705543260000),
    ('2024-01-18T02:01:00.000Z', 1705543260000),
    ('2024-01-18T02:01:00Z', 1705543260000),
    ('2024-01-18t02:01:00.123456z', 1705543260123),  # sub-ms truncated
    ('2024-01-18T03:01:00.5+01:00', 1705543260500),
    ('2024-01-17T21:01:00-05:00', 1705543260000),
    (946684800000, 946684800000),  # the first instant allowed
])
def test_valid_event_times(event_time, millis):
  assert parse_payload(body(event_time=event_time)) == (
      'e-1', 'fin.serve_1-x', 'AAPL', 12.5, millis)


def test_integer_values_become_floats_and_unknown_fields_are_ignored():
  assert parse_payload(body(value=7, extra={'x': [1]}))[3] == 7.0


def test_bytes_payloads_are_accepted():
  assert parse_payload(body().encode())[0] == 'e-1'


@pytest.mark.parametrize('payload, words', [
    ('', 'not a JSON object'),
    ('not json', 'not a JSON object'),
    ('[1, 2]', 'object'),
    ('"a string"', 'object'),
    (body(event_id=...), 'event_id'),
    (body(event_id=''), 'event_id'),
    (body(event_id='x' * 129), 'event_id'),
    (body(event_id=5), 'event_id'),
    (body(customer_id='has space'), 'customer_id'),
    (body(customer_id='c' * 65), 'customer_id'),
    (body(customer_id='trailing\n'), 'customer_id'),
    (body(key=''), 'key'),
    (body(key='k' * 129), 'key'),
    (body(value=True), 'value'),
    (body(value='1.5'), 'value'),
    (body(value=None), 'value'),
    (body().replace('12.5', 'NaN'), 'JSON'),
    (body().replace('12.5', 'Infinity'), 'JSON'),
    (body().replace('12.5', '1e400'), ''),
    (body(value=10**400), 'value'),
    (body(event_time=1705543260000.0), 'event_time'),
    (body(event_time=True), 'event_time'),
    (body(event_time=946684799999), 'event_time'),
    (body(event_time=4102444800000), 'event_time'),
    (body(event_time='2024-01-18 02:01:00Z'), 'RFC 3339'),
    (body(event_time='2024-01-18T02:01:00'), 'RFC 3339'),
    (body(event_time='2024-02-30T00:00:00Z'), 'valid instant'),
    (body(event_time='2024-01-18T02:01:00+24:00'), 'valid instant'),
    (body(pad='p' * 65536), 'bytes'),
    (body() + '\ud800', 'UTF-8'),
    (b'\xff\xfe{}', 'not valid UTF-8'),
    (body() + ' trailing', 'not a JSON object'),
])
def test_invalid_payloads_say_why(payload, words):
  with pytest.raises(InvalidPayload) as e:
    parse_payload(payload)
  assert words in str(e.value)


_text = st.text(min_size=0, max_size=8)
_field_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**20, max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False), _text,
    st.sampled_from(['2024-01-18T02:01:00Z', '2024-13-01T00:00:00Z', '1999-12-31T23:59:59Z',
                     '2024-01-18T02:01:00.999+05:30']),
    st.integers(min_value=946684800000 - 5, max_value=946684800000 + 5),
    st.integers(min_value=4102444800000 - 5, max_value=4102444800000 + 5))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(
    st.sampled_from(['event_id', 'customer_id', 'key', 'value', 'event_time', 'other']),
    _field_values, max_size=6))
def test_the_pipeline_and_the_reference_agree_on_every_payload(fields):
  payload = json.dumps(fields)
  try:
    ours = parse_payload(payload)
  except InvalidPayload:
    ours = None
  assert ours == reference.validate(payload)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_text_never_crashes(text):
  try:
    event = parse_payload(text)
  except InvalidPayload:
    return
  assert math.isfinite(event[3])


# Nesting: decoding recurses once per level, so depth is bounded before decoding.

def nested(levels: int, inner: str = '1') -> str:
  """``levels`` arrays and objects, alternating, around ``inner``."""
  opening = ''.join('[' if i % 2 else '{"n":' for i in range(levels))
  closing = ''.join(']' if i % 2 else '}' for i in reversed(range(levels)))
  return opening + inner + closing


def with_raw(**raw: str) -> str:
  """The good payload with fields added (or replaced) as raw JSON text."""
  text = body(**{name: ... for name in raw})
  return text[:-1] + ''.join(
      f', {json.dumps(name)}: {value}' for name, value in raw.items()) + '}'


@pytest.mark.parametrize('payload, words', [
    (with_raw(pad=nested(1000)), 'nested 1001 levels deep'),  # ~6 KB, in an ignored field
    (with_raw(pad='[' * 1000 + ']' * 1000), 'nested 1001 levels deep'),  # 2 KB
    (with_raw(pad='[' * 30000 + ']' * 30000), 'nested 30001 levels deep'),
    (with_raw(pad=nested(MAX_NESTING)), 'nested 129 levels deep, over the limit of 128'),
    (with_raw(pad=nested(500)), 'nested 501 levels deep'),  # decodable, still too deep
    (body()[:-1] + ', "pad": ' + '[' * 5000, 'nested 5001 levels deep'),  # never closed
    (nested(1000), 'nested 1000 levels deep'),
    ('[' * 1000 + ']' * 1000, 'object'),  # the first problem found is named
    (with_raw(value='[' * 1000 + ']' * 1000), 'value'),
])
def test_a_deeply_nested_payload_is_invalid_not_a_crash(payload, words):
  with pytest.raises(InvalidPayload) as e:
    parse_payload(payload)
  assert words in str(e.value)
  assert reference.validate(payload) is None


@pytest.mark.parametrize('payload', [
    with_raw(pad=nested(MAX_NESTING - 1)),  # 128 levels with the event object
    with_raw(pad=json.dumps('[' * 5000 + '{' * 5000)),  # brackets in a string are text
    with_raw(**{'p"[': json.dumps('\\"[[[' * 100)}),
])
def test_nesting_up_to_the_limit_is_valid(payload):
  assert parse_payload(payload)[0] == 'e-1'
  assert reference.validate(payload) == parse_payload(payload)


@pytest.mark.parametrize('text, depth', [
    ('1', 0), ('[]', 1), ('{"a": [{}]}', 3), ('["]]]", "\\"[[["]', 1), ('[[[', 3),
    ('[]]]]', 1), ('"[[[', 0), ('["x\\', 1),
])
def test_nesting_depth_skips_strings(text, depth):
  assert nesting_depth(text.encode()) == depth


def _stack_depth() -> int:
  frame, depth = sys._getframe(), 0
  while frame is not None:
    frame, depth = frame.f_back, depth + 1
  return depth


def test_a_payload_within_the_limit_on_a_nearly_full_stack_is_invalid_not_a_crash():
  payload = with_raw(pad=nested(MAX_NESTING - 1))
  limit = sys.getrecursionlimit()
  sys.setrecursionlimit(_stack_depth() + 40)
  try:
    with pytest.raises(InvalidPayload) as e:
      parse_payload(payload)
  finally:
    sys.setrecursionlimit(limit)
  assert 'nested too deeply' in str(e.value)


# A field given twice has no one meaning (JSON leaves it to the reader).

@pytest.mark.parametrize('payload, valid', [
    (with_raw(value='2.5'), True),  # replaced, not repeated
    (body()[:-1] + ', "value": 2.5}', False),
    (body()[:-1] + ', "value": "x"}', False),
    ('{"value": "x", ' + body()[1:], False),
    (body()[:-1] + ', "\\u0076alue": 2.5}', False),  # the same name, escaped
    (body()[:-1] + ', "event_time": "2024-01-18T02:01:00Z"}', False),
    (body()[:-1] + ', "pad": 1, "pad": 2}', True),  # other fields are ignored
    (body()[:-1] + ', "pad": {"value": 1, "value": 2}}', True),
    (body()[:-1] + ', "note": "\\"value\\": 2"}', True),
])
def test_an_event_field_given_twice_is_invalid(payload, valid):
  if valid:
    assert parse_payload(payload) == reference.validate(payload) is not None
    return
  with pytest.raises(InvalidPayload) as e:
    parse_payload(payload)
  assert 'given more than once' in str(e.value) or 'Expected' in str(e.value)
  assert reference.validate(payload) is None


@pytest.mark.parametrize('payload', [
    body().encode()[:-1] + b', "p\xc0\xaf": 1}',  # invalid UTF-8 in an ignored name
    body().encode()[:-1] + b', "pad": "\xed\xa0\x80"}',  # an encoded surrogate
    body()[:-1] + ', "pad": "\\ud800"}',  # an escaped lone surrogate
    body()[:-1] + ', "p\\udc00": 1}',
    body(key='\ud83d'),
])
def test_text_that_is_not_unicode_is_invalid_even_in_an_ignored_field(payload):
  with pytest.raises(InvalidPayload):
    parse_payload(payload)
  assert reference.validate(payload) is None


# Only ASCII digits are digits.

@pytest.mark.parametrize('event_time', [
    '\u0662\u0660\u0662\u0664-\u0660\u0661-\u0661\u0668T\u0660\u0662:\u0660\u0661:\u0660\u0660Z',
    '\uff12\uff10\uff12\uff14-01-18T02:01:00Z',  # fullwidth
    '2024-01-18T02:01:00.\u0967\u0968\u0969Z',  # Devanagari fraction
    '2024-01-18T03:01:00+\u0660\u0661:00',  # Arabic-Indic offset
    '2024-01-18T02:01:0\U0001d7ceZ',  # mathematical bold zero
])
def test_event_times_with_non_ascii_digits_are_invalid(event_time):
  payload = body(event_time=event_time)
  with pytest.raises(InvalidPayload) as e:
    parse_payload(payload)
  assert 'RFC 3339' in str(e.value)
  assert reference.validate(payload) is None
  assert reference.validate(body(event_time=event_time).encode()) is None


# The payload rules as properties: any event written to the contract is read
# back exactly, and breaking any one rule makes it invalid.

FIELDS = ('event_id', 'customer_id', 'key', 'value', 'event_time')
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MIN_MS, _MAX_MS = 946684800000, 4102444800000
_NO_SURROGATES = st.characters(blacklist_categories=('Cs',))
_IGNORED = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(_NO_SURROGATES, max_size=5) |
    st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(_NO_SURROGATES, max_size=5), inner, max_size=3),
    max_leaves=8)


def _rfc3339(millis: int, offset_minutes: int, digits: int, zulu: bool, sub_ms: str):
  """``millis`` as RFC 3339 text with ``digits`` fraction digits, and the
  instant it names (sub-millisecond digits are truncated)."""
  whole = millis - millis % 1000
  fraction = (f'{millis % 1000:03d}' + sub_ms)[:digits]
  local = _EPOCH + datetime.timedelta(milliseconds=whole, minutes=offset_minutes)
  if zulu and not offset_minutes:
    zone = 'Z'
  else:
    sign = '-' if offset_minutes < 0 else '+'
    zone = '%s%02d:%02d' % ((sign,) + divmod(abs(offset_minutes), 60))
  text = local.strftime('%Y-%m-%dT%H:%M:%S') + (f'.{fraction}' if fraction else '') + zone
  return text, whole + int((fraction + '000')[:3])


@st.composite
def events(draw):
  """A payload written to the contract, as a dict, and the fields it must give."""
  event_id = draw(st.text(_NO_SURROGATES, min_size=1, max_size=128))
  customer_id = draw(st.text(
      st.sampled_from(string.ascii_letters + string.digits + '_.-'), min_size=1, max_size=64))
  key = draw(st.text(_NO_SURROGATES, min_size=1, max_size=128))
  value = draw(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**80, 2**80))
  millis = draw(st.integers(_MIN_MS + 86400000, _MAX_MS - 86400001) | st.sampled_from(
      [_MIN_MS, _MIN_MS + 1, _MAX_MS - 1]))
  if draw(st.booleans()):
    event_time, millis = _rfc3339(
        millis, draw(st.integers(-(23 * 60 + 59), 23 * 60 + 59) | st.just(0)),
        draw(st.integers(0, 9)), draw(st.booleans()),
        draw(st.text(st.sampled_from(string.digits), min_size=6, max_size=6)))
  else:
    event_time = millis
  obj = draw(st.dictionaries(
      st.text(_NO_SURROGATES, max_size=8).filter(lambda k: k not in FIELDS), _IGNORED,
      max_size=3))
  obj.update(event_id=event_id, customer_id=customer_id, key=key, value=value,
             event_time=event_time)
  return obj, (event_id, customer_id, key, float(value), millis)


def _text(obj: dict, ascii_only: bool) -> str:
  return json.dumps(obj, ensure_ascii=ascii_only)


@settings(max_examples=300, deadline=None)
@given(events(), st.booleans())
def test_every_payload_written_to_the_contract_is_read_back_exactly(event, ascii_only):
  obj, fields = event
  payload = _text(obj, ascii_only)
  assert parse_payload(payload) == fields
  assert parse_payload(payload.encode('utf-8')) == fields
  assert reference.validate(payload) == fields


def _without(obj: dict, field: str) -> str:
  return json.dumps({k: v for k, v in obj.items() if k != field})


def _non_ascii_digit(text: str, position: int, digit_zero: str) -> str:
  places = [i for i, c in enumerate(text) if c.isdigit()]
  i = places[position % len(places)]
  return text[:i] + chr(ord(digit_zero) + int(text[i])) + text[i + 1:]


#: Each breaks exactly one rule of contract section 1: (obj, draw) -> payload text.
_BREAKERS = {
    'missing field': lambda obj, d: _without(obj, d(st.sampled_from(FIELDS))),
    'empty event_id': lambda obj, d: json.dumps({**obj, 'event_id': ''}),
    'long event_id': lambda obj, d: json.dumps(
        {**obj, 'event_id': d(st.text(_NO_SURROGATES, min_size=129, max_size=140))}),
    'long customer_id': lambda obj, d: json.dumps({**obj, 'customer_id': 'c' * 65}),
    'customer_id character': lambda obj, d: json.dumps({**obj, 'customer_id': obj[
        'customer_id'] + d(st.sampled_from([' ', '/', 'é', '\n', '\u0663', '\uff11', '+']))}),
    'long key': lambda obj, d: json.dumps({**obj, 'key': 'k' * 129}),
    'wrong type': lambda obj, d: json.dumps({**obj, d(st.sampled_from(FIELDS)): d(
        st.sampled_from([None, [], {}, [1], {'a': 1}]))}),
    'value not a number': lambda obj, d: json.dumps(
        {**obj, 'value': d(st.sampled_from([True, False, '1.5', None]))}),
    'value not finite': lambda obj, d: json.dumps({**obj, 'value': '@'}).replace(
        '"@"', d(st.sampled_from(['NaN', 'Infinity', '-Infinity', '1e400', '-2e308']))),
    'event_time out of range': lambda obj, d: json.dumps({**obj, 'event_time': d(
        st.integers(max_value=_MIN_MS - 1) | st.integers(min_value=_MAX_MS))}),
    'event_time not an integer': lambda obj, d: json.dumps(
        {**obj, 'event_time': d(st.sampled_from([1705543260000.0, 1.7e12, True]))}),
    'event_time without zone': lambda obj, d: json.dumps(
        {**obj, 'event_time': '2024-01-18T02:01:00'}),
    'event_time non-ASCII digit': lambda obj, d: json.dumps({**obj, 'event_time': (
        _non_ascii_digit(_rfc3339(1705543260123, 60, 3, True, '')[0], d(st.integers(0, 99)),
                         d(st.sampled_from(['\u0660', '\u06f0', '\u0966', '\uff10']))))}),
    'too deep': lambda obj, d: json.dumps(obj)[:-1] + ', "deep": ' + nested(
        d(st.integers(MAX_NESTING, MAX_NESTING + 50))) + '}',
    'too large': lambda obj, d: json.dumps({**obj, 'pad': 'p' * MAX_PAYLOAD_BYTES}),
    'not an object': lambda obj, d: json.dumps([obj]),
    'truncated': lambda obj, d: json.dumps(obj)[:-1],
    'lone surrogate': lambda obj, d: json.dumps(obj, ensure_ascii=False)[:-1] + ', "s": "\ud800"}',
}


@settings(max_examples=400, deadline=None)
@given(events(), st.sampled_from(sorted(_BREAKERS)), st.data())
def test_breaking_any_one_rule_makes_a_payload_invalid(event, rule, data):
  obj, _ = event
  payload = _BREAKERS[rule](obj, data.draw)
  with pytest.raises(InvalidPayload):
    parse_payload(payload)
  assert reference.validate(payload) is None


# Payloads parsed together (the bulk replay) and the common shape of a
# timestamp: the same decisions and reasons as one by one.

def _one_by_one(payload):
  try:
    return parse_payload(payload)
  except InvalidPayload as e:
    return str(e)


def _together(payloads):
  parsed = parse_payloads(payloads)
  decided = {i: fields for i, *fields in zip(
      parsed.position, parsed.event_id, parsed.customer_id, parsed.key, parsed.value,
      parsed.event_time)}
  decided.update(dict(parsed.invalid))
  return [tuple(decided[i]) if isinstance(decided[i], list) else decided[i]
          for i in range(len(payloads))]


_TIMES = [
    '2024-01-18T02:01:00.000Z', '2024-01-18T03:01:00.123+01:00', '2024-01-17T21:01:59.999-05:00',
    '2024-01-18T02:60:00.000Z', '2024-01-18T02:01:60.000Z', '2024-13-18T02:01:00.000Z',
    '2024-01-18T24:01:00.000Z', '2024-01-18T02:01:00.000+24:00', '2024-01-18T02:01:00.000+05:60',
    '2024-01-18t02:01:00.000z', '2024-01-18T02:01:00.0001', '2024-01-18T02:01:00.00012345Z',
    '2024-02-30T00:00:00.000Z', '1999-12-31T23:59:59.999Z', '2099-12-31T23:59:59.999-01:00',
    '2024-01-18T02:0a:00.000Z', '2024-01-18T02:01:00,000Z', '2024-01-18 02:01:00.000Z',
    '2024-01-18T02:01:00.000X', '2024-01-18T02:01:00.\u0661\u0662\u0663Z',
]


@pytest.mark.parametrize('event_time', _TIMES)
def test_the_common_timestamp_shape_is_read_as_the_full_rule_reads_it(event_time):
  expected = _one_by_one(body(event_time=event_time))
  assert _together([body(event_time=event_time)] * 2) == [expected, expected]
  try:
    fast = parse_rfc3339_ms(event_time)
  except InvalidPayload as e:
    fast = str(e)
  try:
    full = payload_module._parse_rfc3339_ms(event_time)
  except InvalidPayload as e:
    full = str(e)
  assert fast == full


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.dictionaries(
        st.sampled_from(['event_id', 'customer_id', 'key', 'value', 'event_time', 'other']),
        _field_values, max_size=6).map(json.dumps),
    st.sampled_from(_TIMES).map(lambda t: body(event_time=t)),
    st.builds(lambda v, c: body(value=v, customer_id=c),
              st.one_of(st.floats(allow_nan=False), st.integers()), st.sampled_from(
                  ['finserve', 'a b', 'x' * 65, ''])),
    st.text(max_size=30)), max_size=12))
def test_payloads_parsed_together_are_decided_as_one_by_one(payloads):
  assert _together(payloads) == [_one_by_one(p) for p in payloads]
