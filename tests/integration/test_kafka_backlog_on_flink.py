"""A bounded read of a fresh Kafka backlog, through ``python -m pipeline run`` on Flink.

Three topics hold traffic whose event times end now: two current sources and
one that lags them by a minute, with redeliveries (some in another window than
their first copy) and garbage. The read is bounded (``--kafka-max-records``),
so the run finishes: the watermark jumps to the end of time once every record
is read, every window closes and fires its final pane, and the launcher
reconciles. The allowed lateness is far longer than the read, so no window can
close while records are still arriving: nothing is too late, every on-time
event is aggregated, and the outcome is the reference's reading of the same
traffic with the watermark at the beginning of time throughout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from integration.conftest import KAFKA_EXPANSION_SERVICE, REPO, flink_args
from integration.test_kafka_on_flink import Traffic
from pipeline.readback.reconciliation import final_panes
from tools import reference

pytestmark = pytest.mark.integration

WINDOW_S, LATENESS_S = 10, 600
PER_TOPIC = 900


def test_a_bounded_read_of_a_fresh_backlog_finishes_with_every_window_closed(
    kafka_broker, flink_job_server, tmp_path):
  run_id = uuid.uuid4().hex[:8]
  topics = {s: f'tidemark-backlog-{run_id}-{s.lower()}' for s in ('A', 'B', 'LAG')}
  admin = AdminClient({'bootstrap.servers': kafka_broker})
  for future in admin.create_topics([NewTopic(t, 1, 1) for t in topics.values()]).values():
    future.result(30)
  traffic = Traffic(kafka_broker, topics)
  now = int(time.time() * 1000)
  span = 90 * 1000
  for source, lag in (('A', 0), ('B', 0), ('LAG', 60 * 1000)):
    for i in range(PER_TOPIC):
      t = now - lag - span + (span * i) // PER_TOPIC  # rising in every partition
      if i % 50 == 11:
        traffic.send(source, 0, b'{"event_id": "half', t)
      elif i % 30 == 4 and i > 147:  # a redelivery of an id 14.7 s older: another window
        traffic.event(source, 0, f'{source}-{i - 147}', 'finserve', 'k', 3.0, t)
      else:
        traffic.event(source, 0, f'{source}-{i}', ('finserve', 'acme.io')[i % 2],
                      f'k{i % 3}', round(i * 0.75 - 300, 2), t)
  traffic.flush()

  out = str(tmp_path / 'out')
  run = subprocess.run(
      [sys.executable, '-m', 'pipeline', 'run',
       '--source', f'kafka:{kafka_broker}/' + ','.join(f'{s}={t}' for s, t in topics.items()),
       '--kafka-max-records', str(PER_TOPIC),
       f'--kafka-expansion-service={KAFKA_EXPANSION_SERVICE}',
       '--window-size', str(WINDOW_S), '--allowed-lateness', str(LATENESS_S),
       '--output-dir', out, '--sqlite', 'none', *flink_args(flink_job_server)],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  # The runner's own count of what its GroupByKeys dropped, read from the job's metrics.
  assert 'dropped by the runner as expired: 0 ' in run.stdout, run.stdout[-2000:]

  expected = reference.compute(traffic.write_replay(str(tmp_path / 'published.jsonl')),
                               WINDOW_S, LATENESS_S)
  with open(os.path.join(out, 'accounting.json'), encoding='utf-8') as f:
    accounting = json.load(f)
  assert accounting == expected.accounting
  assert accounting['received'] == 3 * PER_TOPIC and accounting['too_late'] == 0
  assert accounting['duplicate'] == 3 * 25 and accounting['invalid'] == 3 * 18
  finals = final_panes(os.path.join(out, 'aggregates.jsonl'))
  assert {w: (p['count'], p['sum'], p['min'], p['max']) for w, p in finals.items()} == (
      expected.windows)
  # Every window closed: its final pane is the watermark's (ON_TIME) or a late
  # one after it, never an early pane left waiting.
  assert {p['timing'] for p in finals.values()} <= {'ON_TIME', 'LATE'}
  with open(os.path.join(out, 'dead_letter.jsonl'), encoding='utf-8') as f:
    dead = [json.loads(line) for line in f]
  assert sorted((d['reason'], d['source'], d['data']) for d in dead) == sorted(
      ('invalid', s, d) for s, d in expected.invalid)


def test_a_partition_without_records_is_named_before_the_run(kafka_broker, tmp_path):
  from pipeline.settings.config import RunConfig
  from pipeline.launch.summary import source_warnings
  topic = f'tidemark-empty-{uuid.uuid4().hex[:8]}'
  admin = AdminClient({'bootstrap.servers': kafka_broker})
  admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(30)
  traffic = Traffic(kafka_broker, {'A': topic})
  traffic.event('A', 1, 'e1', 'finserve', 'k', 1.0, int(time.time() * 1000))
  traffic.flush()
  config = RunConfig(source=f'kafka:{kafka_broker}/A={topic}', window_size_s=10,
                     allowed_lateness_s=0, early_firing_s=None, output_dir=str(tmp_path),
                     sqlite_path=None, shards=1)
  [warning] = source_warnings(config)
  assert f'({topic}/0)' in warning and 'holds the watermark at the beginning of time' in (
      ' '.join(warning.split()))
