"""Kafka topics (two partitions each) → the pipeline on Flink → the contract.

Phase 1 publishes in-order traffic (every partition's record times only grow),
so no event can be late whatever order the partitions are read in, from two
sources and a third that lags them by a minute (within the allowed lateness);
a fourth source delivers one record per partition and then stays idle, and
must not hold the watermark back.
Once phase 1 is read and the idle partitions let the watermark follow the wall
clock, phase 2 publishes a late event within the allowed lateness (a LATE
pane), stragglers far beyond it (too late), redeliveries (one in another
window than its first copy) and garbage. The expected outcome is
tools/reference.py's reading of the same traffic written down as a replay.
"""

from __future__ import annotations

import json
import time
import uuid

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from conftest import as_sent, letters
from integration.conftest import KAFKA_EXPANSION_SERVICE, flink_args, wait_for
from tools import reference
from pipeline.launch.build import build, read_source
from pipeline.settings.config import RunConfig
from pipeline.launch.run import prepare_output
from pipeline.readback.reconciliation import final_panes
from transforms.rules.model import dead_letter_payload
from transforms.connectors.sources import decode_payload

pytestmark = pytest.mark.integration

WINDOW_S, LATENESS_S = 10, 300
PARTITIONS = 2
CUSTOMERS = ('finserve', 'dataflow-inc', 'acme.io')


class Traffic:
  """What was published, kept as replay lines for the reference.

  The producer is idempotent, so a retried request can neither duplicate nor
  reorder records; ``flush`` also checks every partition's offsets against the
  send order, so the replay is the order the broker holds.
  """

  def __init__(self, bootstrap: str, topics: dict):
    self.producer = Producer(
        {'bootstrap.servers': bootstrap, 'linger.ms': 5, 'enable.idempotence': True})
    self.topics = topics
    self.lines = []
    self._sent = []  # (topic, partition), in send order
    self._offsets = {}  # send index → its offset, or the delivery error
    self._checked = 0
    self._last = {}  # (topic, partition) → the last offset checked

  def send(self, source: str, partition: int, value: bytes, timestamp: int,
           key: str = 'none') -> None:
    index = len(self._sent)
    self._sent.append((self.topics[source], partition))

    def delivered(err, msg, index=index):
      self._offsets[index] = err if err is not None else msg.offset()

    self.producer.produce(
        self.topics[source], value=value, key=key.encode(), partition=partition,
        timestamp=timestamp, on_delivery=delivered)
    self.lines.append({'source': source, 'data': decode_payload(value or b"")})

  def event(self, source: str, partition: int, event_id: str, customer: str, key: str,
            value: float, event_time: int) -> None:
    body = json.dumps({'event_id': event_id, 'customer_id': customer, 'key': key,
                       'value': value, 'event_time': event_time}).encode()
    self.send(source, partition, body, event_time, customer)

  def watermark_everywhere(self, millis: int) -> None:
    for source in self.topics:
      self.lines.append({'source': source, 'watermark': millis})

  def flush(self) -> None:
    assert self.producer.flush(30) == 0
    for index in range(self._checked, len(self._sent)):
      partition, offset = self._sent[index], self._offsets.pop(index, None)
      assert isinstance(offset, int), f'record {index} to {partition} not delivered: {offset}'
      assert offset > self._last.get(partition, -1), (
          f'{partition} holds record {index} at offset {offset}, before an earlier send')
      self._last[partition] = offset
    self._checked = len(self._sent)

  def write_replay(self, path: str) -> str:
    with open(path, 'w', encoding='utf-8') as f:
      for line in self.lines:
        f.write(json.dumps(line) + '\n')
    return path


def _accounting(path: str):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def test_kafka_traffic_on_flink_meets_the_contract(kafka_broker, flink_job_server, tmp_path):
  run_id = uuid.uuid4().hex[:8]
  topics = {'A': f'tidemark-it-{run_id}-a', 'B': f'tidemark-it-{run_id}-b',
            'C': f'tidemark-it-{run_id}-c', 'I': f'tidemark-it-{run_id}-idle'}
  admin = AdminClient({'bootstrap.servers': kafka_broker})
  for future in admin.create_topics(
      [NewTopic(t, PARTITIONS, 1) for t in topics.values()]).values():
    future.result(30)
  traffic = Traffic(kafka_broker, topics)

  # Phase 1: three windows' worth, times rising across every partition.
  size = WINDOW_S * 1000
  now = int(time.time() * 1000)
  first_window = now - now % size - 3 * size
  n = 600
  slot = 0
  for i in range(n):
    source, partition = ('A', 'B')[i % 2], (i // 2) % PARTITIONS
    t = first_window + (3 * size * i) // n
    if i % 40 == 7:
      garbage = b'\xff\xfe{"event_id": "bad"' if i % 80 == 7 else b'not json at all'
      traffic.send(source, partition, garbage, t)
      continue
    customer = CUSTOMERS[i % 3]
    traffic.event(source, partition, f'{source}-{i}', customer, f'k{i % 2}',
                  round(i * 1.25 - 100, 2), t)
    if i % 25 == 3:  # a redelivery, right behind the original
      traffic.event(source, partition, f'{source}-{i}', customer, f'k{i % 2}',
                    round(i * 1.25 - 100, 2), t)
    slot += 1
  for partition in range(PARTITIONS):  # source I: one record each, then idle
    traffic.event('I', partition, f'I-{partition}', CUSTOMERS[1], 'k3', 1.0, first_window)
  for i in range(60):  # source C lags a minute behind A and B
    traffic.event('C', i % PARTITIONS, f'C-{i}', CUSTOMERS[i % 3], 'k2', float(i),
                  first_window - 60 * 1000 + (3 * size * i) // 60)
  traffic.flush()
  phase1 = len(traffic.lines)

  out = str(tmp_path / 'out')
  options = PipelineOptions(flink_args(flink_job_server) + [
      '--streaming',
      f'--source=kafka:{kafka_broker}/' + ','.join(f'{s}={t}' for s, t in topics.items()),
      f'--kafka-expansion-service={KAFKA_EXPANSION_SERVICE}',
      f'--window-size={WINDOW_S}', f'--allowed-lateness={LATENESS_S}',
      '--early-firing=0', f'--output-dir={out}', '--sqlite=none'])
  config = RunConfig.from_options(options)
  assert config.accounting_update_s == 2
  prepare_output(config)
  pipeline = beam.Pipeline(options=options)
  build(pipeline, config, read_source(config))
  started = time.monotonic()
  result = pipeline.run()
  try:
    wait_for(lambda: (_accounting(config.accounting_path) or {}).get('received') == phase1,
          150, f"{phase1} messages of phase 1 to be received")
    first_key = (CUSTOMERS[0], 'k0', first_window, first_window + size)
    wait_for(lambda: first_key in final_panes(config.aggregates_path), 120,
          'the first window to fire')
    print(f'phase 1: {phase1} messages through Kafka and Flink in '
          f'{time.monotonic() - started:.1f} s (including job start)')

    # Phase 2: the watermark now follows the wall clock (every partition is idle).
    phase2_mark = int(time.time() * 1000)
    traffic.watermark_everywhere(phase2_mark)
    traffic.event('A', 0, 'late-but-allowed', CUSTOMERS[0], 'k0', 1000.5,
                  first_window + 1234)
    for j in range(4):
      traffic.event('B', j % PARTITIONS, f'far-too-late-{j}', CUSTOMERS[1], 'k1', 7.0,
                    first_window - 20 * 60 * 1000 + j)
    traffic.event('A', 1, 'A-0', CUSTOMERS[0], 'k0', -100.0, first_window)  # redelivery
    # A redelivery whose event_time moved a window on: still the first copy's id.
    traffic.event('B', 0, 'A-2', CUSTOMERS[2], 'k0', 9.5, first_window + size + 5)
    traffic.send('B', 1, b'{"event_id": 5}', phase2_mark)
    traffic.flush()
    total = len([line for line in traffic.lines if 'data' in line])
    wait_for(lambda: (_accounting(config.accounting_path) or {}).get('received') == total,
          180, f'all {total} messages to be received')
    expected = reference.compute(
        traffic.write_replay(str(tmp_path / 'published.jsonl')), WINDOW_S, LATENESS_S)

    def settled():
      finals = {w: (p['count'], p['sum'], p['min'], p['max'])
                for w, p in final_panes(config.aggregates_path).items()}
      return finals == expected.windows and _accounting(
          config.accounting_path) == expected.accounting
    wait_for(settled, 120, 'final panes and accounting to equal the reference')
  finally:
    result.cancel()
    wait_for(lambda: result.state in (PipelineState.CANCELLED, PipelineState.FAILED,
                                   PipelineState.DONE), 60, 'the Flink job to stop')

  kinds = expected.accounting
  assert kinds['too_late'] == 4 and kinds['duplicate'] > 2 and kinds['invalid'] > 1
  assert [a for a in expected.accepted if a[0] == 'A-2'] == [
      ('A-2', CUSTOMERS[2], 'k0', first_window + (3 * size * 2) // n, -97.5)]
  assert {a[0] for a in expected.accepted if a[0].startswith('C-')} == {
      f'C-{i}' for i in range(60)}, 'the lagging source is aggregated, none of it too late'
  assert _accounting(config.accounting_path) == expected.accounting
  panes = [json.loads(line) for line in open(config.aggregates_path, encoding='utf-8')]
  late = [p for p in panes if (p['customer_id'], p['key'], p['window_start']) == (
      CUSTOMERS[0], 'k0', first_window) and p['timing'] == 'LATE']
  assert late and max(p['max'] for p in late) == 1000.5, 'the allowed late event has a LATE pane'
  with open(config.dead_letter_path, encoding='utf-8') as f:
    dead = [json.loads(line) for line in f]
  assert letters(dead, 'too_late') == as_sent(expected.too_late)
  assert letters(dead, 'invalid') == as_sent(expected.invalid)
  # Invalid UTF-8 survives byte for byte (data_base64).
  assert any(dead_letter_payload(d) == b'\xff\xfe{"event_id": "bad"' for d in dead)
