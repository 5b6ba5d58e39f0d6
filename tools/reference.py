"""A plain-Python reading of the contract's rules, written independently of
the Beam transforms: the oracle for end-to-end tests and the baseline for
benchmarks. It shares no code with ``transforms/``.
"""

from __future__ import annotations

import datetime
import fractions
import json
import math
import re
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

_MIN_T = 946684800000
_MAX_T = 4102444800000
#: Arrays and objects may nest 128 levels deep, the event object included.
_MAX_DEPTH = 128
_FIELDS = ('event_id', 'customer_id', 'key', 'value', 'event_time')
_QUOTED_FIELDS = tuple(f'"{name}"' for name in _FIELDS)
_CUSTOMER = re.compile(r'[A-Za-z0-9_.\-]+')
_TS = re.compile(
    r'(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)',
    re.ASCII)


def _reject(_):
  raise ValueError('non-finite literal')


def _integer(text: str):
  # More digits than any double or event time has: too large to matter, and
  # int() would refuse them (sys.get_int_max_str_digits).
  return int(text) if len(text) <= 400 else float(text)


class _Object(dict):
  """A decoded JSON object that knows which names it was given more than once."""

  def __init__(self, pairs):
    super().__init__(pairs)
    names = [name for name, _ in pairs]
    self.repeated = () if len(names) == len(self) else {n for n in names if names.count(n) > 1}


def _depth(obj) -> int:
  """How deep lists and dicts nest in a decoded value (0 for a scalar)."""
  deepest = 0
  pending = [(obj, 1)]
  while pending:
    value, level = pending.pop()
    if isinstance(value, dict):
      value = list(value.values())
    if isinstance(value, list):
      deepest = max(deepest, level)
      pending.extend((v, level + 1) for v in value)
  return deepest


def _strings(obj):
  """Every string in a decoded value, member names included."""
  pending = [obj]
  while pending:
    value = pending.pop()
    if isinstance(value, str):
      yield value
    elif isinstance(value, dict):
      pending.extend(value)
      pending.extend(value.values())
    elif isinstance(value, list):
      pending.extend(value)


def _is_unicode(text: str) -> bool:
  try:
    text.encode('utf-8')
  except UnicodeEncodeError:  # a lone surrogate, from a \u escape
    return False
  return True


def _event_time(raw) -> Optional[int]:
  if isinstance(raw, bool):
    return None
  if isinstance(raw, int):
    return raw
  if not isinstance(raw, str):
    return None
  m = _TS.fullmatch(raw)
  if not m:
    return None
  y, mo, d, h, mi, s, frac, zone = m.groups()
  try:
    if zone in ('Z', 'z'):
      tz = datetime.timezone.utc
    else:
      hh, mm = int(zone[1:3]), int(zone[4:6])
      if hh > 23 or mm > 59:
        return None
      delta = datetime.timedelta(hours=hh, minutes=mm)
      tz = datetime.timezone(delta if zone[0] == '+' else -delta)
    dt = datetime.datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=tz)
  except ValueError:
    return None
  epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
  seconds = (dt - epoch).days * 86400 + (dt - epoch).seconds
  ms = int(((frac or '.0')[1:] + '000')[:3])
  return seconds * 1000 + ms


def validate(data: Union[str, bytes]):
  """``(event_id, customer_id, key, value, event_time)``, or None if the
  payload is invalid: not UTF-8 (a lone surrogate, escaped or not, included),
  over 64 KiB, not a JSON object, nested more than 128 levels deep, giving an
  event field twice, or breaking a field's rule."""
  try:
    raw = data.encode('utf-8') if isinstance(data, str) else bytes(data)
    text = raw.decode('utf-8')
  except UnicodeError:
    return None
  if len(raw) > 65536:
    return None
  # Each check below is needed only where the text could break it: nesting
  # deeper than it has brackets, a field named twice, or an escaped surrogate.
  escaped = '\\' in text
  named_twice = escaped or any(text.count(name) > 1 for name in _QUOTED_FIELDS)
  try:
    obj = json.loads(text, parse_constant=_reject, parse_int=_integer,
                     object_pairs_hook=_Object if named_twice else None)
  except (ValueError, RecursionError):
    return None
  if not isinstance(obj, dict):
    return None
  if text.count('[') + text.count('{') > _MAX_DEPTH and _depth(obj) > _MAX_DEPTH:
    return None
  # A field given twice has no one meaning; text that is not Unicode is not UTF-8.
  if named_twice and any(name in obj.repeated for name in _FIELDS):
    return None
  if escaped and not all(_is_unicode(s) for s in _strings(obj)):
    return None
  eid, cust, key, value = (obj.get('event_id'), obj.get('customer_id'), obj.get('key'),
                           obj.get('value'))
  if not (isinstance(eid, str) and 0 < len(eid) <= 128):
    return None
  if not (isinstance(cust, str) and 0 < len(cust) <= 64 and _CUSTOMER.fullmatch(cust)):
    return None
  if not (isinstance(key, str) and 0 < len(key) <= 128):
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  try:
    value = float(value)
  except OverflowError:
    return None
  if not math.isfinite(value):
    return None
  t = _event_time(obj.get('event_time'))
  if t is None or not _MIN_T <= t < _MAX_T:
    return None
  return eid, cust, key, value, t


def window_sum(values: List[float]) -> float:
  """The exact sum rounded to the nearest double; beyond the range of a
  double, the largest double of its sign."""
  try:
    return math.fsum(values)
  except OverflowError:  # a partial sum overflowed; the sum itself may not
    exact = sum(map(fractions.Fraction, values), fractions.Fraction(0))
  try:
    return float(exact)
  except OverflowError:
    return sys.float_info.max if exact > 0 else -sys.float_info.max


#: An aggregated event: (event_id, customer_id, key, event_time, value)
Accepted = Tuple[str, str, str, int, float]


class Outcome(NamedTuple):
  accounting: Dict[str, int]
  #: (customer_id, key, window_start, window_end) -> (count, sum, min, max)
  windows: Dict[Tuple[str, str, int, int], Tuple[int, float, float, float]]
  too_late: List[Tuple[str, str]]  # (source, data)
  invalid: List[Tuple[str, str]]
  accepted: List[Accepted] = []


def compute(path: str, window_size_s: int, allowed_lateness_s: int) -> Outcome:
  """Applies contract section 3 to a replay file, line by line."""
  size, lateness = window_size_s * 1000, allowed_lateness_s * 1000
  marks: Dict[str, Optional[int]] = {}
  lines = []
  with open(path, encoding='utf-8') as f:
    for text in f:
      if text.strip():
        line = json.loads(text)
        lines.append(line)
        if 'source' in line:
          marks.setdefault(line['source'], None)
  counts = dict(received=0, invalid=0, too_late=0, duplicate=0, aggregated=0)
  values: Dict[Tuple[str, str, int, int], List[float]] = {}
  #: event_id -> end + lateness of the window of its first accepted copy
  accepted: Dict[str, int] = {}
  aggregated: List[Accepted] = []
  too_late: List[Tuple[str, str]] = []
  invalid: List[Tuple[str, str]] = []
  for line in lines:
    if 'watermark' in line:
      marks[line['source']] = line['watermark']
      continue
    if 'data' not in line:
      continue
    counts['received'] += 1
    event = validate(line['data'])
    if event is None:
      counts['invalid'] += 1
      invalid.append((line['source'], line['data']))
      continue
    eid, cust, key, value, t = event
    start = t - t % size
    known = list(marks.values())
    watermark = None if any(m is None for m in known) else min(known)
    # Python's runners drop once the watermark is strictly past end + lateness.
    if watermark is not None and watermark > start + size + lateness:
      counts['too_late'] += 1
      too_late.append((line['source'], line['data']))
      continue
    # A copy is a duplicate while its id's first accepted copy's window is open
    # (whatever window this copy falls in); after that it is judged afresh.
    first_closes = accepted.get(eid)
    if first_closes is not None and (watermark is None or watermark <= first_closes):
      counts['duplicate'] += 1
      continue
    accepted[eid] = start + size + lateness
    aggregated.append((eid, cust, key, t, value))
    counts['aggregated'] += 1
    values.setdefault((cust, key, start, start + size), []).append(value)
  windows = {
      w: (len(v), window_sum(v), min(v), max(v)) for w, v in values.items()
  }
  return Outcome(counts, windows, too_late, invalid, aggregated)


def rollup_differences(
    path: str, window_size_s: int, allowed_lateness_s: int, rollup_size_s: int,
    rollup_lateness_s: int) -> Dict[Tuple[str, str, int], Tuple[List[str], List[str]]]:
  """The same replay in windows of two sizes: per rollup window
  ``(customer_id, key, start)``, the sorted event ids only the rollup
  aggregated and those only the primary windows aggregated (where any)."""
  size = rollup_size_s * 1000
  primary = compute(path, window_size_s, allowed_lateness_s).accepted
  rollup = compute(path, rollup_size_s, rollup_lateness_s).accepted
  differences: Dict[Tuple[str, str, int], Tuple[List[str], List[str]]] = {}
  for events, others, side in ((rollup, primary, 0), (primary, rollup, 1)):
    for eid, cust, key, t, _ in sorted(set(events) - set(others)):
      window = (cust, key, t - t % size)
      differences.setdefault(window, ([], []))[side].append(eid)
  return {w: (sorted(a), sorted(b)) for w, (a, b) in differences.items()}
