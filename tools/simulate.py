"""``python -m tools simulate``: publish incident-like traffic to a real
broker (Pub/Sub, Kafka) or write it as a replay, at a chosen rate.

The traffic is ``tools.traffic.generate(profile)`` (three sources with skew,
a lagging source, boundary events, stragglers, redeliveries, garbage), in
arrival order. Per the contract (section 1):

* Pub/Sub: one topic per source (``projects/P/topics/PREFIX<source>``), the
  payload as the message data, attributes ``ts`` (event time, epoch ms) and
  ``event_id`` (from the payload when it has one);
* Kafka: one topic per source (``PREFIX<source>``), record timestamp = event
  time (CreateTime), key = ``customer_id`` (from the payload when it has one);
* replay: the contract's replay file, watermark lines included.

``--shift-to-now`` rebases every event time (payloads, attributes, record
timestamps, watermarks) by whole windows so that the earliest event is at or
just after the current wall-clock time: runners whose Pub/Sub watermark is the
wall clock (the DirectRunner) would otherwise find every historical event too
late. Garbage payloads are never rewritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from tools import traffic
from tools.traffic import Data, Line, Profile, SourceWatermark
from transforms.rules.model import payload_bytes

TARGETS = ('pubsub', 'kafka', 'replay')
DEFAULT_PROJECT = 'tidemark-local'
DEFAULT_TOPIC_PREFIX = 'tidemark-'
DEFAULT_KAFKA_SERVERS = os.environ.get('KAFKA_BOOTSTRAP_SERVERS', '127.0.0.1:19092')


class Published(NamedTuple):
  """One message as it goes out: where, the payload and its metadata."""
  source: str
  payload: str
  event_time: int  # ms: the payload's when valid, else the arrival time
  event_id: Optional[str]
  customer_id: Optional[str]


def _fields(payload: str) -> Optional[tuple]:
  from transforms.rules.payload import InvalidPayload, parse_payload
  try:
    return parse_payload(payload)
  except InvalidPayload:
    return None


def _json_field(payload: str, name: str) -> Optional[str]:
  """A string field of a payload that is a JSON object, even an invalid one."""
  try:
    obj = json.loads(payload)
  except (ValueError, RecursionError):
    return None
  value = obj.get(name) if isinstance(obj, dict) else None
  return value if isinstance(value, str) and value else None


def _shift_rfc3339(text: str, millis: int) -> str:
  """``millis`` formatted in the zone of the RFC 3339 timestamp ``text``."""
  if text[-1] in 'Zz':
    zone = datetime.timezone.utc
  else:
    sign = -1 if text[-6] == '-' else 1
    zone = datetime.timezone(sign * datetime.timedelta(
        hours=int(text[-5:-3]), minutes=int(text[-2:])))
  instant = datetime.datetime.fromtimestamp(millis // 1000, tz=zone)
  zone_text = 'Z' if zone == datetime.timezone.utc else text[-6:]
  return instant.strftime('%Y-%m-%dT%H:%M:%S') + f'.{millis % 1000:03d}' + zone_text


def shift_payload(payload: str, offset_ms: int) -> str:
  """A valid payload with its event time moved by ``offset_ms`` (same form:
  integer or RFC 3339 in the same zone); anything invalid is left as it is."""
  fields = _fields(payload)
  if fields is None or offset_ms == 0:
    return payload
  obj = json.loads(payload)
  shifted = fields[4] + offset_ms
  if isinstance(obj['event_time'], str):
    obj['event_time'] = _shift_rfc3339(obj['event_time'], shifted)
  else:
    obj['event_time'] = shifted
  return json.dumps(obj)


def to_publish(data: Data, offset_ms: int = 0) -> Published:
  payload = shift_payload(data.payload, offset_ms)
  fields = _fields(payload)
  if fields is not None:
    event_id, customer_id, _, _, event_time = fields
  else:
    event_id = _json_field(payload, 'event_id')
    customer_id = _json_field(payload, 'customer_id')
    event_time = data.event_time + offset_ms
  return Published(data.source, payload, event_time, event_id, customer_id)


def encode(payload: str) -> bytes:
  """Payload bytes; a lone surrogate (deliberate garbage) goes out as the
  invalid UTF-8 it stands for (``model.payload_bytes``, as dead letters keep it)."""
  return payload_bytes(payload)


def pubsub_message(message: Published) -> Tuple[bytes, Dict[str, str]]:
  """``(data, attributes)`` of the Pub/Sub message for ``message``."""
  attributes = {'ts': str(message.event_time)}
  if message.event_id is not None:
    attributes['event_id'] = message.event_id
  return encode(message.payload), attributes


def kafka_record(message: Published, topic_prefix: str) -> dict:
  """Keyword arguments of ``Producer.produce`` for ``message``."""
  return dict(
      topic=f'{topic_prefix}{message.source}',
      key=None if message.customer_id is None else message.customer_id.encode('utf-8'),
      value=encode(message.payload),
      timestamp=message.event_time)


def shift_to_now_offset(lines: Sequence[Line], window_size_s: int,
                        now_ms: Optional[int] = None) -> int:
  """Whole windows that move the earliest event time to at or after now."""
  now_ms = int(time.time() * 1000) if now_ms is None else now_ms
  times = [line.event_time for line in lines if isinstance(line, Data)]
  if not times:
    return 0
  window_ms = window_size_s * 1000
  return -((min(times) - now_ms) // window_ms) * window_ms


class _Pacer:
  """Spaces calls ``1/rate`` seconds apart on average (0: no pacing)."""

  def __init__(self, rate: float):
    self._gap = 1.0 / rate if rate > 0 else 0.0
    self._start = time.monotonic()
    self._n = 0

  def wait(self) -> None:
    if self._gap:
      due = self._start + self._n * self._gap
      delay = due - time.monotonic()
      if delay > 0:
        time.sleep(delay)
    self._n += 1


# --- Targets ------------------------------------------------------------------

class PubSubTarget:

  def __init__(self, project: str, topic_prefix: str, sources: Sequence[str],
               create_topics: bool):
    from google.cloud import pubsub_v1
    from google.api_core import exceptions
    self._client = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(
            max_messages=500, max_bytes=4 * 1024 * 1024, max_latency=0.01))
    self._topics = {s: self._client.topic_path(project, f'{topic_prefix}{s}') for s in sources}
    if create_topics:
      for topic in self._topics.values():
        try:
          self._client.create_topic(name=topic)
        except exceptions.AlreadyExists:
          pass
    self._futures: List = []

  def send(self, message: Published) -> None:
    data, attributes = pubsub_message(message)
    self._futures.append(
        self._client.publish(self._topics[message.source], data, **attributes))

  def send_watermark(self, mark: SourceWatermark) -> None:
    pass  # Pub/Sub carries no watermarks; the runner estimates them

  def close(self) -> None:
    """Waits until everything sent is published (the target stays usable)."""
    for future in self._futures:
      future.result(timeout=120)
    self._futures.clear()


class KafkaTarget:

  def __init__(self, servers: str, topic_prefix: str):
    from confluent_kafka import Producer
    self._prefix = topic_prefix
    self._errors: List[str] = []
    self._producer = Producer({
        'bootstrap.servers': servers, 'linger.ms': 5, 'enable.idempotence': True,
        'message.max.bytes': 2 * 1024 * 1024})

  def _delivered(self, error, _record) -> None:
    if error is not None:
      self._errors.append(str(error))

  def send(self, message: Published) -> None:
    record = kafka_record(message, self._prefix)
    while True:
      try:
        self._producer.produce(on_delivery=self._delivered, **record)
        break
      except BufferError:
        self._producer.poll(0.1)
    self._producer.poll(0)

  def send_watermark(self, mark: SourceWatermark) -> None:
    pass  # the record timestamps are the watermark's input

  def close(self) -> None:
    left = self._producer.flush(120)
    if left or self._errors:
      raise RuntimeError(
          f'kafka: {left} records undelivered, errors: {self._errors[:3]}')


class ReplayTarget:

  def __init__(self, path: str):
    self._file = open(path, 'w', encoding='utf-8')

  def send(self, message: Published) -> None:
    self._file.write(traffic.to_replay_line(Data(message.source, message.payload, 0)) + '\n')

  def send_watermark(self, mark: SourceWatermark) -> None:
    self._file.write(traffic.to_replay_line(mark) + '\n')

  def close(self) -> None:
    self._file.close()


@dataclasses.dataclass
class Report:
  messages: int
  seconds: float
  offset_ms: int

  @property
  def rate(self) -> float:
    return self.messages / self.seconds if self.seconds > 0 else float('inf')


def simulate(lines: Sequence[Line], target, rate: float, offset_ms: int = 0,
             record: Optional[Callable[[Published], None]] = None) -> Report:
  """Sends ``lines`` in order; returns how many messages went out and how fast
  (including the final flush)."""
  pacer = _Pacer(rate)
  started = time.monotonic()
  sent = 0
  for line in lines:
    if isinstance(line, Data):
      message = to_publish(line, offset_ms)
      pacer.wait()
      target.send(message)
      if record is not None:
        record(message)
      sent += 1
    elif isinstance(line, SourceWatermark):
      target.send_watermark(SourceWatermark(line.source, line.millis + offset_ms))
  target.close()
  return Report(sent, time.monotonic() - started, offset_ms)


def _sources_arg(text: str) -> Tuple[Tuple[str, float, float], ...]:
  try:
    out = []
    for item in text.split(','):
      name, share, delay = item.split(':')
      out.append((name, float(share), float(delay)))
    return tuple(out)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'{text!r}: expected NAME:SHARE:MAX_DELAY_S[,...]') from None


def main(argv: List[str]) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m tools simulate',
      description='Publish incident-like traffic to Pub/Sub or Kafka, or write a replay.')
  parser.add_argument('--to', required=True, choices=TARGETS)
  parser.add_argument('--messages', type=int, default=Profile().messages)
  parser.add_argument('--rate', type=float, default=0.0,
                      help='messages per second of wall time (0: as fast as possible)')
  parser.add_argument('--event-rate', type=float, default=Profile().rate_per_s,
                      help='events per second of event time in the generated traffic')
  parser.add_argument('--seed', type=int, default=Profile().seed)
  parser.add_argument('--window-size', type=int, default=Profile().window_size_s)
  parser.add_argument('--allowed-lateness', type=int, default=Profile().allowed_lateness_s)
  parser.add_argument('--sources', type=_sources_arg, default=Profile().sources,
                      help='NAME:SHARE:MAX_DELAY_S[,...] (default: A, B and a lagging C)')
  for name in ('boundary', 'straggler', 'redelivery', 'garbage'):
    parser.add_argument(f'--{name}-share', type=float,
                        default=getattr(Profile(), f'{name}_share'))
  parser.add_argument('--shift-to-now', action='store_true',
                      help='rebase event times to the current wall clock (by whole windows)')
  parser.add_argument('--project', default=DEFAULT_PROJECT, help='pubsub: project id')
  parser.add_argument('--topic-prefix', default=DEFAULT_TOPIC_PREFIX,
                      help='pubsub/kafka: topic name = PREFIX + source name')
  parser.add_argument('--create-topics', action='store_true',
                      help='pubsub: create missing topics first')
  parser.add_argument('--bootstrap-servers', default=DEFAULT_KAFKA_SERVERS, help='kafka')
  parser.add_argument('--out', help='replay: the file to write')
  parser.add_argument('--record', help='also write what was sent (after shifting) as '
                      'JSON lines {"source", "data", "event_time"}')
  args = parser.parse_args(argv)
  if args.messages < 0 or args.event_rate <= 0 or args.rate < 0 or args.window_size <= 0:
    parser.error('--messages, --rate must be >= 0; --event-rate, --window-size > 0')
  if args.to == 'replay' and not args.out:
    parser.error('--to replay needs --out PATH')

  profile = Profile(
      messages=args.messages, seed=args.seed, rate_per_s=args.event_rate,
      window_size_s=args.window_size, allowed_lateness_s=args.allowed_lateness,
      sources=args.sources, boundary_share=args.boundary_share,
      straggler_share=args.straggler_share, redelivery_share=args.redelivery_share,
      garbage_share=args.garbage_share)
  lines = list(traffic.generate(profile))
  offset = shift_to_now_offset(lines, args.window_size) if args.shift_to_now else 0
  names = [s[0] for s in profile.sources]
  if args.to == 'pubsub':
    if not os.environ.get('PUBSUB_EMULATOR_HOST'):
      print('simulate: PUBSUB_EMULATOR_HOST is not set: publishing to real Google Cloud '
            'Pub/Sub with your default credentials', file=sys.stderr)
    target = PubSubTarget(args.project, args.topic_prefix, names, args.create_topics)
  elif args.to == 'kafka':
    target = KafkaTarget(args.bootstrap_servers, args.topic_prefix)
  else:
    target = ReplayTarget(args.out)

  record_file = open(args.record, 'w', encoding='utf-8') if args.record else None

  def record(message: Published) -> None:
    record_file.write(json.dumps({
        'source': message.source, 'data': message.payload,
        'event_time': message.event_time}) + '\n')

  try:
    report = simulate(lines, target, args.rate, offset, record if record_file else None)
  finally:
    if record_file:
      record_file.close()
  where = {'pubsub': f'projects/{args.project}/topics/{args.topic_prefix}{{{",".join(names)}}}',
           'kafka': f'{args.bootstrap_servers} topics {args.topic_prefix}{{{",".join(names)}}}',
           'replay': args.out}[args.to]
  shifted = f', event times shifted by {offset / 1000:+,.0f} s' if offset else ''
  print(f'sent {report.messages:,} messages to {where} in {report.seconds:.2f} s: '
        f'{report.rate:,.0f} messages/s{shifted}')
  return 0
