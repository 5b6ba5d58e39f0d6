"""A live run over Kafka on Flink, then a restatement of its range from the topic.

The live run reads three windows of traffic, then stragglers arrive beyond the
allowed lateness: new ids (too late live, recovered by the restatement) and a
redelivery of an id the run aggregated (too late live, a duplicate for the
restatement). The restatement reads the topic again, bounded by record time,
and the files, SQLite and PostgreSQL then hold the no-lateness truth for every window of
the range (the reference's reading with a lateness no event reaches); the audit
names exactly the recovered ids; a second restatement writes nothing.
"""

from __future__ import annotations

import datetime
import glob
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
from test_restate import NO_LATENESS, _audit, _finals, _snapshot, _sqlite
from tools import reference

pytestmark = pytest.mark.integration

W, L = 10, 5


def _iso(millis: int) -> str:
  return datetime.datetime.fromtimestamp(millis / 1000, datetime.timezone.utc).strftime(
      '%Y-%m-%dT%H:%M:%SZ')


def _received(out: str) -> int:
  for path in glob.glob(os.path.join(out, '.tidemark-run-*', 'accounting.json')):
    try:
      with open(path, encoding='utf-8') as f:
        return json.load(f)['received']
    except (OSError, ValueError, KeyError):
      pass
  return 0


def _restate(out: str, *args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'pipeline', 'restate', out, *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def _postgres(dsn: str, table: str) -> dict:
  import psycopg
  with psycopg.connect(dsn) as db:
    rows = db.execute(f'SELECT customer_id, key, window_start, window_end, count, sum, min, '
                      f'max FROM {table}').fetchall()
  return {r[:4]: r[4:] for r in rows}


def test_a_kafka_run_restated_from_its_topic(
    kafka_broker, flink_job_server, postgres_dsn, pg_table, tmp_path):
  topic = f'tidemark-restate-{uuid.uuid4().hex[:8]}'
  admin = AdminClient({'bootstrap.servers': kafka_broker})
  for future in admin.create_topics([NewTopic(topic, 2, 1)]).values():
    future.result(30)
  traffic = Traffic(kafka_broker, {'A': topic})
  size = W * 1000
  now = int(time.time() * 1000)
  first = now - now % size - 6 * size  # windows first .. first + 3 W, closed within seconds
  for i in range(300):
    traffic.event('A', i % 2, f'e{i}', 'finserve', f'k{i % 3}', float(i),
                  first + (3 * size * i) // 300)
  traffic.send('A', 0, b'not json', first + 10)
  traffic.flush()
  phase1 = 301

  out = str(tmp_path / 'out')
  live = subprocess.Popen(
      [sys.executable, '-m', 'pipeline', 'run', *flink_args(flink_job_server), '--streaming',
       f'--source=kafka:{kafka_broker}/A={topic}',
       f'--kafka-expansion-service={KAFKA_EXPANSION_SERVICE}', f'--window-size={W}',
       f'--allowed-lateness={L}', f'--output-dir={out}', '--run-seconds=60',
       '--sink=postgres', f'--postgres-dsn={postgres_dsn}', f'--postgres-table={pg_table}',
       f'--postgres-dead-letter-table={pg_table}_dl'],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 120
    while _received(out) < phase1 and time.monotonic() < deadline:
      time.sleep(1)
    assert _received(out) == phase1, 'the live run read the first traffic'
    time.sleep(W)  # idle partitions: the watermark follows the wall clock, past the range
    late_ids = [f'late-{j}' for j in range(5)]
    for j, event_id in enumerate(late_ids):  # beyond the lateness: too late live
      traffic.event('A', j % 2, event_id, 'finserve', 'k1', 100.0 + j, first + j * size // 2)
    traffic.event('A', 1, 'e7', 'finserve', 'k1', 7.0, first + (3 * size * 7) // 300)
    traffic.flush()
    output, _ = live.communicate(timeout=180)
  finally:
    if live.poll() is None:
      live.kill()
  assert live.returncode == 0, output[-3000:]

  replay = traffic.write_replay(str(tmp_path / 'published.jsonl'))
  span = (first, first + 3 * size)

  def in_span(windows: dict) -> dict:
    return {w: v for w, v in windows.items() if span[0] <= w[2] < span[1]}

  truth = in_span(reference.compute(replay, W, NO_LATENESS).windows)
  letters = [json.loads(line) for line in open(os.path.join(out, 'dead_letter.jsonl'))]
  assert sorted(json.loads(d['data'])['event_id'] for d in letters
                if d['reason'] == 'too_late') == sorted(late_ids + ['e7'])
  assert in_span(_finals(out)) != truth
  assert in_span(_postgres(postgres_dsn, pg_table)) == in_span(_finals(out))

  args = ('--from', _iso(span[0]), '--to', _iso(span[1]), f'--postgres-dsn={postgres_dsn}')
  restated = _restate(out, *args)
  assert restated.returncode == 0, restated.stderr[-3000:]
  assert in_span(_finals(out)) == truth
  assert in_span(_sqlite(out)) == truth
  assert in_span(_postgres(postgres_dsn, pg_table)) == truth
  audit = _audit(out)
  assert sorted(a['event_id'] for w in audit['windows'] for a in w['added']) == late_ids
  assert {a['reason'] for w in audit['windows'] for a in w['added']} == {'too_late_live'}
  assert audit['too_late_recovered'] == 5 and audit['too_late_read'] == 6
  counts = audit['accounting']
  assert counts['read'] == phase1 + 6 and counts['invalid'] == 1 and counts['duplicate'] == 1
  accounting = json.load(open(os.path.join(out, 'accounting.json')))
  assert accounting['too_late'] == 0 and accounting['received'] == phase1 + 6

  before = _snapshot(out), _postgres(postgres_dsn, pg_table)
  again = _restate(out, *args)
  assert again.returncode == 0 and 'nothing to restate' in again.stdout
  assert (_snapshot(out), _postgres(postgres_dsn, pg_table)) == before
  import psycopg
  with psycopg.connect(postgres_dsn, autocommit=True) as db:
    db.execute(f'DROP TABLE IF EXISTS {pg_table}_dl')
