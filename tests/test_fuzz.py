"""Hostile input: generated payloads of every kind a source may deliver, replay
lines nested too deeply, and values whose sums leave the range of a double.

Nothing raises; every invalid payload is dead-lettered exactly as it came; the
pipeline agrees with the reference (``tools/reference.py``) on every verdict,
every event's fields and every window's figures.
"""

from __future__ import annotations

import collections
import datetime
import fractions
import functools
import json
import random
import string
import sys
from typing import Callable, Dict, Iterator, List, Tuple, Union

import pytest
from hypothesis import given, settings, strategies as st
from apache_beam.testing import test_pipeline

from conftest import (
    MINUTE, T0, as_sent, data, letters, make_config, mark, payload, read_jsonl, run_replay,
    write_replay)
from pipeline.launch.build import build_bulk
from pipeline.readback.reconciliation import final_panes, reconcile
from test_replay_and_cli import cli
from tools import reference
from transforms.flow.aggregate import Stats
from transforms.rules.model import dead_letter_payload, payload_bytes
from transforms.flow.bulk import ReadReplayInChunks
from transforms.rules.payload import MAX_NESTING, MAX_PAYLOAD_BYTES, InvalidPayload, parse_payload
from transforms.rules.replay import ReplayError, compile_replay
from transforms.rules.replay_index import index_replay

Payload = Union[str, bytes]
MAX = sys.float_info.max
FIELDS = ('event_id', 'customer_id', 'key', 'value', 'event_time')
_MIN_MS, _MAX_MS = 946684800000, 4102444800000
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_CUSTOMER_CHARS = string.ascii_letters + string.digits + '_.-'
#: Quotes, escapes, brackets, non-ASCII letters and digits, an astral character.
_TEXT_CHARS = 'aZ09 _.-/:\\"\'\t\n{}[],\u00e9\u20ac\U0001f600\u0660\uff10\u200b'
_NON_ASCII_ZEROS = ('\u0660', '\u06f0', '\u0966', '\u09e6', '\uff10', '\U0001d7ce')
_NUMBERS = (
    '9' * 309, '9' * 400, '9' * 5000, '-' + '9' * 4500, '1e400', '-1e400', '1e99999999999',
    '1.7976931348623157e308', '1.7976931348623158e308', '1.797693134862316e308', '2e308',
    str(2**1024 - 2**970), str(2**1024 - 2**970 - 1), str(2**63), str(2**64), str(-2**63 - 1),
    '4.9e-324', '1e-400', '-0', '-0.0', '0e0', '1E+308', '1705543260000.0', '1.70554326e12',
    '1705543260000e0', '01', '1.', '.5', '+1', '-', '0x10', '1_000', 'NaN', '-Infinity')

_OVERFLOWING = ('1e308', '-1e308', '1.7976931348623157e308', '-1.7976931348623157e308',
                '1.7976931348623158e308', '1.797693134862316e308', '8.98846567431158e307')


# Generators: each takes a Random and returns a payload.

def _text(rng: random.Random, low: int, high: int) -> str:
  return ''.join(rng.choices(_TEXT_CHARS, k=rng.randint(low, high)))


def _value(rng: random.Random):
  return rng.choice((
      rng.uniform(-1e6, 1e6), rng.randint(-10**6, 10**6), rng.randint(-2**70, 2**70), 0.0,
      -0.0, 1e308, -1e308, MAX, -MAX, 5e-324, rng.random()))


def _rfc3339(rng: random.Random, millis: int) -> str:
  offset = rng.choice((0, 0, rng.randint(-(23 * 60 + 59), 23 * 60 + 59)))
  local = _EPOCH + datetime.timedelta(milliseconds=millis - millis % 1000, minutes=offset)
  digits = rng.randint(0, 9)
  fraction = (f'{millis % 1000:03d}' + ''.join(rng.choice(string.digits) for _ in range(6)))
  zone = rng.choice('Zz') if not offset and rng.random() < 0.7 else '%s%02d:%02d' % (
      ('-' if offset < 0 else '+',) + divmod(abs(offset), 60))
  text = local.strftime('%Y-%m-%dT%H:%M:%S') + (
      '.' + fraction[:digits] if digits else '') + zone
  return text.replace('T', 't') if rng.random() < 0.1 else text


def _event_time(rng: random.Random):
  millis = rng.choice((
      rng.randint(_MIN_MS, _MAX_MS - 1), T0 + rng.randint(-MINUTE, 10 * MINUTE),
      rng.randint(_MIN_MS - 5, _MIN_MS + 5), rng.randint(_MAX_MS - 5, _MAX_MS + 5)))
  return millis if rng.random() < 0.5 else _rfc3339(rng, max(millis, 1000))


def _json_value(rng: random.Random, depth: int = 0):
  kind = rng.randrange(8 if depth < 3 else 6)
  if kind == 6:
    return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
  if kind == 7:
    return {_text(rng, 0, 4): _json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
  return (None, True, rng.randint(-10**20, 10**20), rng.uniform(-1e9, 1e9), _text(rng, 0, 6),
          rng.choice(FIELDS))[kind]


def _event(rng: random.Random) -> dict:
  """An event, mostly valid: the fields' lengths straddle their limits."""
  obj = {
      'event_id': _text(rng, 1, rng.choice((12, 12, 130))),
      'customer_id': ''.join(rng.choices(_CUSTOMER_CHARS, k=rng.choice(
          (rng.randint(1, 8), rng.randint(1, 8), rng.randint(60, 66))))),
      'key': rng.choice(('AAPL', 'MSFT', _text(rng, 0, rng.choice((8, 130))))),
      'value': _value(rng),
      'event_time': _event_time(rng),
  }
  for _ in range(rng.choice((0, 0, 1, 2))):
    obj[_text(rng, 0, 6)] = _json_value(rng)
  items = list(obj.items())
  rng.shuffle(items)
  return dict(items)


def _dumps(rng: random.Random, obj) -> str:
  return json.dumps(obj, ensure_ascii=rng.random() < 0.5,
                    separators=rng.choice(((',', ':'), (', ', ': '))))


def _with_raw(rng: random.Random, obj: dict, field: str, raw: str) -> str:
  """``obj`` as JSON with ``field`` (added or replaced) written as raw text."""
  return _dumps(rng, {**obj, field: '\x00@'}).replace('"\\u0000@"', raw)


def _nest(rng: random.Random, levels: int) -> str:
  """``levels`` arrays and objects, in a repeated random pattern, around a scalar."""
  pattern = [rng.choice((('[', ']'), ('{"k":', '}'))) for _ in range(min(levels, 16))]
  repeats, rest = divmod(levels, len(pattern) or 1)
  opening = ''.join(o for o, _ in pattern) * repeats + ''.join(o for o, _ in pattern[:rest])
  closing = ''.join(c for _, c in reversed(pattern[:rest])) + ''.join(
      c for _, c in reversed(pattern)) * repeats
  return opening + rng.choice(('1', '"x"', '[]', '{}')) + closing


def valid_events(rng: random.Random) -> Payload:
  return _dumps(rng, _event(rng))


def deep_nesting(rng: random.Random) -> Payload:
  levels = rng.choice((
      rng.randint(1, 40), rng.randint(MAX_NESTING - 3, MAX_NESTING + 3), rng.randint(900, 1100),
      rng.randint(5000, 30000)))
  obj = _event(rng)
  where = rng.randrange(5)
  if where == 0:  # in an ignored field: valid while the whole is within the limit
    return _with_raw(rng, obj, 'pad', _nest(rng, levels))
  if where == 1:
    return _nest(rng, levels)
  if where == 2:
    return _with_raw(rng, obj, rng.choice(FIELDS), _nest(rng, levels))
  if where == 3:  # never closed
    return _dumps(rng, obj)[:-1] + ', "pad": ' + '[' * levels
  return _with_raw(rng, obj, 'pad', json.dumps('[' * levels + '{' * levels))  # only text


def huge_numbers(rng: random.Random) -> Payload:
  field = rng.choice(('value', 'value', 'event_time', 'pad'))
  return _with_raw(rng, _event(rng), field, rng.choice(_NUMBERS))


def overflowing_values(rng: random.Random) -> Payload:
  return _with_raw(rng, _event(rng), 'value', rng.choice(_OVERFLOWING))


def non_ascii_digits(rng: random.Random) -> Payload:
  obj = _event(rng)
  field = rng.choice(('event_time', 'event_time', 'value', 'customer_id'))
  text = _rfc3339(rng, T0 + rng.randint(0, MINUTE)) if field == 'event_time' else str(
      obj[field])
  places = [i for i, c in enumerate(text) if c in string.digits]
  zero = rng.choice(_NON_ASCII_ZEROS)
  for i in rng.sample(places, rng.randint(1, len(places))) if places else ():
    text = text[:i] + chr(ord(zero) + int(text[i])) + text[i + 1:]
  if field == 'value' and rng.random() < 0.5:  # as a JSON number: not JSON
    return _with_raw(rng, obj, 'value', text)
  return _dumps(rng, {**obj, field: text})


def bad_unicode(rng: random.Random) -> Payload:
  obj = _event(rng)
  text = _dumps(rng, obj)
  kind = rng.randrange(4)
  i = rng.randrange(len(text) + 1)
  if kind == 0:  # invalid UTF-8
    raw = text.encode('utf-8')
    bad = rng.choice((b'\xff', b'\xc3', b'\xc0\xaf', b'\xed\xa0\x80', b'\xf4\x90\x80\x80'))
    return raw[:i] + bad + raw[i:]
  if kind == 1:  # a lone surrogate in the text
    return text[:i] + rng.choice(('\ud800', '\udfff', '\udcff')) + text[i:]
  # escapes: lone surrogates, a pair, a high surrogate followed by text, NUL
  escape = rng.choice(('\\ud800', '\\udc00', '\\ud83d\\ude00', '\\ud83dx', '\\u0000'))
  if kind == 2:
    return _with_raw(rng, obj, rng.choice(FIELDS[:3] + ('pad',)), f'"{escape}"')
  return text[:-1] + f', "p{escape}": 1}}'


def random_garbage(rng: random.Random) -> Payload:
  if rng.random() < 0.3:
    return rng.randbytes(rng.randint(0, 80))
  return ''.join(rng.choices('{}[]":,0123456789.eE+- \\tnrufalse_idkyv', k=rng.randint(0, 80)))


def _mutated(rng: random.Random, obj: dict) -> Payload:
  text = _dumps(rng, obj)
  kind = rng.randrange(12)
  if kind == 0:
    return text[:rng.randrange(len(text))]
  if kind == 1:  # one bit flipped; as bytes, or as text with lone surrogates
    raw = bytearray(text.encode('utf-8'))
    raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    return bytes(raw) if rng.random() < 0.5 else raw.decode('utf-8', 'surrogateescape')
  if kind == 2:
    a, b = rng.sample(FIELDS, 2)
    return _dumps(rng, {**obj, a: obj[b], b: obj[a]})
  if kind == 3:
    return _dumps(rng, {**obj, rng.choice(FIELDS): rng.choice(
        (None, True, False, [], {}, [1], {'a': 1}, '12.5', 0, 1.5, '1705543260000'))})
  if kind == 4:  # a field given twice, well or badly typed
    field = rng.choice(FIELDS)
    twin = rng.choice((_event(rng)[field], None, [], 'x', 7))
    extra = f'{json.dumps(field)}: {json.dumps(twin)}'
    return (text[:-1] + ', ' + extra + '}') if rng.random() < 0.5 else (
        '{' + extra + ', ' + text[1:])
  if kind == 5:
    missing = rng.choice(FIELDS)
    return _dumps(rng, {k: v for k, v in obj.items() if k != missing})
  if kind == 6:  # a field name spelt differently, or escaped (the same name)
    field = rng.choice(FIELDS)
    escaped = '\\u%04x' % ord(field[0]) + field[1:]
    return text.replace(f'"{field}"', f'"{rng.choice((field.upper(), field + " ", escaped))}"', 1)
  if kind == 7:
    return rng.choice(('\ufeff', ' \n\t', '\x0c', '\u00a0')) + text
  if kind == 8:
    return text + rng.choice((' ', '\n', ',', ' x', '}', '{}', '\x00'))
  if kind == 9:
    return text[:-1] + ',}'
  if kind == 10:
    return _dumps(rng, {**obj, 'pad': 'p' * (MAX_PAYLOAD_BYTES - len(text) + rng.randint(
        -20, 20))})
  return _dumps(rng, [obj])


def mutations(rng: random.Random) -> Payload:
  return _mutated(rng, _event(rng))


CLASSES: Dict[str, Callable[[random.Random], Payload]] = {
    f.__name__: f for f in (
        valid_events, deep_nesting, huge_numbers, overflowing_values, non_ascii_digits,
        bad_unicode, random_garbage, mutations)
}


def payloads(seed: int, n: int) -> Iterator[Tuple[str, Payload]]:
  """``n`` payloads, every class in turn."""
  rng = random.Random(seed)
  names = sorted(CLASSES)
  for i in range(n):
    name = names[i % len(names)]
    yield name, CLASSES[name](rng)


def _verdict(data: Payload):
  try:
    return parse_payload(data)
  except InvalidPayload:
    return None


def test_the_validator_agrees_with_the_reference_on_100000_hostile_payloads():
  problems: List[str] = []
  verdicts: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for name, body in payloads(seed=20240118, n=100_000):
    try:
      ours = _verdict(body)
      theirs = reference.validate(body)
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f'{name}: {type(e).__name__}: {e} on {body[:120]!r}')
      continue
    verdicts[name][ours is not None] += 1
    if ours != theirs:
      problems.append(f'{name}: pipeline {ours!r}, reference {theirs!r} on {body[:160]!r}')
  assert not problems, f'{len(problems)} disagreements:\n' + '\n'.join(problems[:20])
  assert set(verdicts) == set(CLASSES)
  assert all(verdicts[name][False] for name in CLASSES)
  for name in ('valid_events', 'deep_nesting', 'huge_numbers', 'overflowing_values', 'mutations'):
    assert verdicts[name][True], (name, verdicts[name])


def test_hostile_payloads_through_the_bulk_pipeline_are_accounted_for(tmp_path):
  sample = list(payloads(seed=7, n=3200))
  assert {name for name, _ in sample} == set(CLASSES)
  # valid values whose window sums overflow a double
  sample += [('overflow', payload(f'o{i}', T0 + 11 * MINUTE, value=v, customer_id='ovf'))
             for i, v in enumerate((1e308, 1e308, -1e308, MAX, 1e308))]
  lines: List[dict] = []
  for i, (_, body) in enumerate(reversed(sample)):
    if isinstance(body, bytes):  # as a source would hand over undecodable bytes
      body = body.decode('utf-8', 'surrogateescape')
    lines.append(data('AB'[i % 2], body))
    if i % 400 == 399:  # watermarks move on, so some events arrive too late
      lines += [mark('A', T0 + i * 1000), mark('B', T0 + i * 1000)]
  replay = write_replay(tmp_path / 'replay.jsonl', lines)
  config = make_config(tmp_path, replay)
  with test_pipeline.TestPipeline(runner='DirectRunner', blocking=True) as p:  # bulk, in chunks
    build_bulk(p, config, ReadReplayInChunks(index_replay(replay, chunk_messages=400)))

  expected = reference.compute(replay, 60, 30)
  accounting = reconcile(config)  # received = the parts; aggregated = the final panes
  assert accounting == expected.accounting
  assert accounting['received'] == len(sample)
  assert 0 < accounting['invalid'] < len(sample) and accounting['too_late'] > 0
  dead = read_jsonl(config.dead_letter_path)
  invalid = [d for d in dead if d['reason'] == 'invalid']
  assert collections.Counter((d['source'], dead_letter_payload(d)) for d in invalid) == (
      collections.Counter((source, payload_bytes(body)) for source, body in expected.invalid))
  assert all(d['detail'] for d in invalid)
  assert letters(dead, 'too_late') == as_sent(expected.too_late)
  finals = final_panes(config.aggregates_path)
  assert {w: (p['count'], p['sum'], p['min'], p['max']) for w, p in finals.items()} == (
      expected.windows)
  assert any(abs(p['sum']) == MAX for p in finals.values())


POISON = {
    'nested': payload('deep', T0)[:-1] + ', "pad": ' + '[' * 1000 + ']' * 1000 + '}',
    'RFC 3339': payload('digits', '\uff12\uff10\uff12\uff14-01-18T02:01:00Z'),
    'more than once': payload('twice', T0)[:-1] + ', "value": 2.0}',
    'UTF-8': payload('bytes', T0)[:-1] + ', "pad": "\udcff"}',
    'Number out of range': payload('huge', T0).replace('1.0', '1.797693134862316e308'),
}


def test_poison_payloads_are_dead_lettered_on_every_path(run):
  # streaming with the replay's watermark, as a live source, and in bulk
  outputs = run([data('A', body) for body in POISON.values()] + [
      data('A', payload('good', T0, value=1e308)), data('A', payload('good2', T0, value=1e308))])
  assert outputs.accounting == {
      'received': 7, 'invalid': 5, 'too_late': 0, 'duplicate': 0, 'aggregated': 2}
  details = {dead_letter_payload(d): d['detail'] for d in outputs.dead_letters
             if d['reason'] == 'invalid'}
  assert set(details) == {payload_bytes(body) for body in POISON.values()}
  for words, body in POISON.items():
    assert words in details[payload_bytes(body)], details[payload_bytes(body)]
  assert [a['sum'] for a in outputs.aggregates] == [MAX]


# Replay lines nested too deeply are operator errors, named by line.

@pytest.mark.parametrize('line', [
    '{"source": "A", "data": "x", "pad": ' + '[' * 1000 + ']' * 1000 + '}',
    '{"source": "A", "data": ' + '[' * 1000 + ']' * 1000 + '}',
    '{"pad": ' + '{"a": ' * 1000 + '1' + '}' * 1000 + '}',
    '[' * 100000,
])
def test_a_deeply_nested_replay_line_is_refused_with_its_number(tmp_path, line):
  replay = write_replay(tmp_path / 'r.jsonl', [data('A', payload('e', T0)), line])
  for read in (compile_replay, index_replay):
    with pytest.raises(ReplayError) as e:
      read(replay)
    assert e.value.line == 2


def test_the_cli_stops_on_a_deeply_nested_replay_line_without_a_traceback(tmp_path):
  replay = write_replay(tmp_path / 'r.jsonl', [
      data('A', payload('e', T0)), '{"source": "A", "pad": ' + '[' * 5000 + ']' * 5000 + '}'])
  out = tmp_path / 'out'
  result = cli('run', '--source', f'replay:{replay}', '--output-dir', str(out))
  assert result.returncode == 2
  assert f'{replay}:2:' in result.stderr and 'Traceback' not in result.stderr
  assert not out.exists()


# Sums beyond the range of a double.

def _exactly(values: List[float]) -> float:
  """The definition: the exact sum rounded to the nearest double, within the
  range of a double."""
  exact = sum(map(fractions.Fraction, values), fractions.Fraction(0))
  return float(max(-fractions.Fraction(MAX), min(fractions.Fraction(MAX), exact)))


def _stats_sum(values: List[float], pieces: int) -> float:
  """The sum Stats gives when the values are combined in ``pieces`` accumulators."""
  stats = Stats()
  accumulators = [functools.reduce(stats.add_input, values[i::pieces], stats.create_accumulator())
                  for i in range(pieces)]
  return stats.extract_output(stats.merge_accumulators(accumulators))[1]


SUMS = [
    ([1e308, 1e308], MAX),
    ([1e308, 1e308, -1e308], 1e308),
    ([-1e308, -1e308, -1e308], -MAX),
    ([MAX, MAX, -MAX, -MAX, 1.5], 1.5),
    ([MAX, 1e292], MAX),  # over half an ulp past the largest double
    ([MAX, 9e291], MAX),  # under half an ulp: rounds back to it
    ([MAX, -MAX, MAX, 5e-324], MAX),
    ([1e308, 1e308, -1e308, 1e-300, -1e308], 1e-300),
]


@pytest.mark.parametrize('values, total', SUMS)
def test_sums_whose_partials_overflow_are_exact_and_finite(values, total):
  rng = random.Random(3)
  for _ in range(20):
    order = rng.sample(values, len(values))
    for pieces in (1, 2, 3):
      assert _stats_sum(order, pieces) == total, (order, pieces)
  assert _exactly(values) == total
  assert reference.window_sum(values) == total


def test_random_sums_near_the_range_of_a_double_are_exactly_rounded():
  rng = random.Random(11)
  pool = (1e308, -1e308, MAX, -MAX, 8.98846567431158e307, 1.0, -1.0, 1e-300, 5e-324, 1e292)
  for _ in range(1000):
    values = [rng.choice(pool) * rng.choice((1, 1, 0.5, 0.75)) for _ in range(rng.randint(
        1, 12))]
    assert _stats_sum(values, rng.randint(1, 4)) == _exactly(values) == (
        reference.window_sum(values)), values


_DOUBLES = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from((1e308, -1e308, MAX, -MAX, 1e292, 5e-324, -5e-324, 0.0, -0.0, 1.0, 1e-300)))


@settings(max_examples=500, deadline=None)
@given(st.lists(_DOUBLES, max_size=80), st.lists(_DOUBLES, max_size=5))
def test_compacted_values_sum_as_the_values_themselves(values, more):
  # a bulk window's panes sum a compacted past plus what came since
  stats = Stats()

  def summed(partials):
    return repr(stats.extract_output((len(values) + len(more), partials + more, 0, 0.0, 0.0)))
  compacted = Stats.compact(values)
  assert summed(compacted) == summed(values)
  assert len(compacted) <= len(values) + 1


@pytest.mark.parametrize('bulk', [True, False], ids=['bulk', 'streaming'])
def test_windows_whose_sums_overflow_are_written_and_reconciled(tmp_path, bulk):
  windows = [values for values, _ in SUMS[:4]]
  lines: List[dict] = []
  for w, values in enumerate(windows):
    for i, value in enumerate(values):
      lines.append(data('A', payload(f'w{w}-{i}', T0 + w * MINUTE + i, value=value)))
  lines.append(mark('A', T0 + MINUTE + 10000))  # past the first window's end
  # a late event in the first window, within the lateness: one more pane, still finite
  lines.append(data('A', payload('late', T0 + 5, value=1e308)))
  outputs = run_replay(tmp_path, lines, bulk=bulk)
  replay = str(tmp_path / 'replay.jsonl')
  expected = reference.compute(replay, 60, 30)
  assert outputs.accounting == expected.accounting == {
      'received': 14, 'invalid': 0, 'too_late': 0, 'duplicate': 0, 'aggregated': 14}
  config = make_config(tmp_path, replay)
  assert reconcile(config) == expected.accounting
  finals = final_panes(config.aggregates_path)
  assert {w: (p['count'], p['sum'], p['min'], p['max']) for w, p in finals.items()} == (
      expected.windows)
  assert sorted(p['sum'] for p in finals.values()) == [-MAX, 1.5, 1e308, MAX]
  first = sorted((a['pane_index'], a['sum']) for a in outputs.aggregates
                 if a['window_start'] == T0)
  assert first == [(0, MAX), (1, MAX)]
