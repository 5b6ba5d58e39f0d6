"""Contract section 1: which payloads are events, and why the others are not."""

import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from tools import reference
from transforms.parse import InvalidPayload, parse_payload

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
    (b'\xff\xfe{}', 'not a JSON object'),
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
