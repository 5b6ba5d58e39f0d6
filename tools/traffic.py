"""Incident-like traffic, deterministic from a seed.

Three sources with skew (C lags far behind A and B, holding the pipeline
watermark back), events exactly on window boundaries, stragglers inside and
beyond the allowed lateness, redeliveries, and garbage of every kind the
contract calls invalid. The same traffic feeds replay files and, later, the
simulator that publishes to real brokers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import heapq
import json
import random
from typing import Iterator, List, NamedTuple, Tuple, Union

INCIDENT_START_MS = 1705543200000  # 2024-01-18T02:00:00Z


@dataclasses.dataclass(frozen=True)
class Profile:
  messages: int = 3000
  seed: int = 7
  rate_per_s: float = 25.0  # events per second of event time, all sources
  window_size_s: int = 60
  allowed_lateness_s: int = 30
  start_ms: int = INCIDENT_START_MS
  tick_s: int = 5  # how often sources report watermarks
  # source -> (share of events, usual delay bound s); C lags
  sources: Tuple[Tuple[str, float, float], ...] = (
      ('A', 0.45, 2.0), ('B', 0.40, 5.0), ('C', 0.15, 90.0))
  customers: Tuple[str, ...] = ('finserve', 'dataflow-inc', 'acme.io')
  keys_per_customer: int = 6
  boundary_share: float = 0.04
  straggler_share: float = 0.03
  redelivery_share: float = 0.04
  garbage_share: float = 0.03


class Data(NamedTuple):
  source: str
  payload: str
  event_time: int  # ms; for garbage, the arrival time


class SourceWatermark(NamedTuple):
  source: str
  millis: int


class AdvanceProcessingTime(NamedTuple):
  seconds: float


Line = Union[Data, SourceWatermark, AdvanceProcessingTime]


def _rfc3339(millis: int, rng: random.Random) -> str:
  offset_min = rng.choice([0, 0, 60, -300, 330])
  zone = datetime.timezone(datetime.timedelta(minutes=offset_min))
  instant = datetime.datetime.fromtimestamp(millis / 1000, tz=zone)
  text = instant.strftime('%Y-%m-%dT%H:%M:%S') + f'.{millis % 1000:03d}'
  return text + ('Z' if offset_min == 0 else instant.strftime('%z')[:3] + ':' +
                 instant.strftime('%z')[3:])


def _garbage(rng: random.Random, n: int, event_time: int) -> str:
  good = {'event_id': f'g-{n}', 'customer_id': 'finserve', 'key': 'AAPL',
          'value': 1.5, 'event_time': event_time}
  kind = n % 20
  if kind == 0:
    return 'not json at all'
  if kind == 1:
    return json.dumps([good])
  if kind == 2:
    return json.dumps({k: v for k, v in good.items() if k != 'event_id'})
  if kind == 3:
    return json.dumps({**good, 'value': True})
  if kind == 4:
    return json.dumps(good).replace('1.5', 'NaN')
  if kind == 5:
    return json.dumps(good).replace('1.5', 'Infinity')
  if kind == 6:
    return json.dumps({**good, 'value': '1.5'})
  if kind == 7:
    return json.dumps({**good, 'event_time': 946684799999})
  if kind == 8:
    return json.dumps({**good, 'event_time': 4102444800000})
  if kind == 9:
    return json.dumps({**good, 'event_time': float(event_time)})
  if kind == 10:
    return json.dumps({**good, 'event_time': '2024-01-18 02:01:00'})
  if kind == 11:
    return json.dumps({**good, 'customer_id': 'fin serve!'})
  if kind == 12:
    return json.dumps({**good, 'event_id': 'x' * 129})
  if kind == 13:
    return json.dumps({**good, 'padding': 'p' * (64 * 1024)})
  if kind == 14:
    return ''
  if kind == 15:
    return json.dumps({**good, 'key': ''})
  if kind == 16:
    return '{"event_id": "g-%d", "customer_id": "finserve"' % n  # truncated
  if kind == 17:
    return json.dumps(good) + '\ud800'  # lone surrogate: not UTF-8
  if kind == 18:
    return json.dumps({**good, 'event_time': '2024-02-30T00:00:00Z'})
  return json.dumps({**good, 'value': None})


def generate(profile: Profile) -> Iterator[Line]:
  """Yields the traffic in arrival order."""
  rng = random.Random(profile.seed)
  window_ms = profile.window_size_s * 1000
  lateness_ms = profile.allowed_lateness_s * 1000
  keys = [f'{c}:{k}' for c in profile.customers for k in range(profile.keys_per_customer)]
  names = [s[0] for s in profile.sources]
  shares = [s[1] for s in profile.sources]
  bounds = {s[0]: s[2] * 1000 for s in profile.sources}
  lag_ms = max(bounds.values())

  # (arrival ms, sequence, line)
  arrivals: List[Tuple[int, int, Data]] = []
  sent: List[Data] = []
  gap_ms = 1000.0 / profile.rate_per_s
  clock = float(profile.start_ms)
  for n in range(profile.messages):
    clock += rng.expovariate(1.0 / gap_ms)
    source = rng.choices(names, shares)[0]
    roll = rng.random()
    if roll < profile.garbage_share:
      data = Data(source, _garbage(rng, n, int(clock)), int(clock))
      arrivals.append((int(clock), n, data))
      continue
    roll -= profile.garbage_share
    if roll < profile.redelivery_share and sent:
      original = rng.choice(sent[-200:])
      arrivals.append((int(clock) + rng.randint(0, 3000), n, original))
      continue
    roll -= profile.redelivery_share
    delay = rng.uniform(0, bounds[source])
    event_time = int(clock - delay)
    if roll < profile.boundary_share:
      event_time -= event_time % window_ms
    elif roll < profile.boundary_share + profile.straggler_share:
      # behind the lagging watermark: late, some within lateness, some beyond
      event_time = int(clock - lag_ms - rng.uniform(0, window_ms + 2 * lateness_ms))
    customer_key = rng.choice(keys)
    customer, _, key = customer_key.partition(':')
    value = round(rng.uniform(-50, 500), rng.choice([0, 2, 4]))
    payload = {
        'event_id': f'{source}-{n:08d}',
        'customer_id': customer,
        'key': f'{key}',
        'value': value,
        'event_time': event_time if rng.random() < 0.8 else _rfc3339(event_time, rng),
    }
    data = Data(source, json.dumps(payload), event_time)
    sent.append(data)
    arrivals.append((int(clock), n, data))
  heapq.heapify(arrivals)

  tick_ms = profile.tick_s * 1000
  next_tick = profile.start_ms + tick_ms
  marks = {name: None for name in names}
  while arrivals:
    arrival, _, data = heapq.heappop(arrivals)
    while arrival >= next_tick:
      yield AdvanceProcessingTime(float(profile.tick_s))
      for name in names:
        mark = int(next_tick - bounds[name])
        if marks[name] is None or mark > marks[name]:
          marks[name] = mark
          yield SourceWatermark(name, mark)
      next_tick += tick_ms
    yield data


def to_replay_line(line: Line) -> str:
  if isinstance(line, Data):
    return json.dumps({'source': line.source, 'data': line.payload})
  if isinstance(line, SourceWatermark):
    return json.dumps({'source': line.source, 'watermark': line.millis})
  return json.dumps({'advance_processing_time': line.seconds})


def write_replay(path: str, profile: Profile) -> int:
  """Writes a replay file; returns the number of messages in it."""
  count = 0
  with open(path, 'w', encoding='utf-8') as f:
    for line in generate(profile):
      count += isinstance(line, Data)
      f.write(to_replay_line(line) + '\n')
  return count


def add_arguments(parser: argparse.ArgumentParser) -> None:
  defaults = Profile()
  parser.add_argument('--messages', type=int, default=defaults.messages)
  parser.add_argument('--seed', type=int, default=defaults.seed)
  parser.add_argument('--rate', type=float, default=defaults.rate_per_s,
                      help='events per second of event time')
  parser.add_argument('--window-size', type=int, default=defaults.window_size_s)
  parser.add_argument('--allowed-lateness', type=int, default=defaults.allowed_lateness_s)
  parser.add_argument('--tick', type=int, default=defaults.tick_s,
                      help='seconds between watermark/processing-time reports')


def main(argv: List[str]) -> int:
  """``python -m tools generate``: write an incident-like replay."""
  parser = argparse.ArgumentParser(
      prog='python -m tools generate',
      description='Write an incident-like replay (contract section 2).')
  parser.add_argument('--out', required=True, help='replay file to write')
  add_arguments(parser)
  args = parser.parse_args(argv)
  count = write_replay(args.out, profile_from_args(args))
  print(f'wrote {count:,} messages to {args.out}')
  return 0


def profile_from_args(args: argparse.Namespace) -> Profile:
  if args.messages < 0 or args.rate <= 0 or args.tick <= 0:
    raise SystemExit('--messages must be >= 0, --rate and --tick > 0')
  return Profile(
      messages=args.messages, seed=args.seed, rate_per_s=args.rate,
      window_size_s=args.window_size, allowed_lateness_s=args.allowed_lateness,
      tick_s=args.tick)
