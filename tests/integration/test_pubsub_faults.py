"""A Pub/Sub customer deployed to the Flink session cluster, a TaskManager killed
under traffic.

``python -m pipeline deploy --target flink`` submits the customer's job to the
cluster of scripts/flink-cluster.sh (a JobManager, a TaskManager, the Python
worker pool), detached, at parallelism 2, checkpointed every 2 s, reading a
subscription of the Pub/Sub emulator through the Java read and writing
PostgreSQL. Live traffic (event time = now; redeliveries under new message ids,
garbage, a malformed ``ts``) flows while the TaskManager is killed with SIGKILL
between two checkpoints. What the killed TaskManager had read but not
checkpointed was never acknowledged, so Pub/Sub delivers it again to the
restored job. The final rows in PostgreSQL, the accounting and the dead letters
(file and table) must equal the contract read independently: nothing lost,
nothing counted or stored twice.

Nothing published at the present can be too late: the reader's watermark is at
most the oldest event time read in the last minute, and the allowed lateness
covers the outage. Once the restored job has seen the present again (a
restored job's watermark starts from the beginning of time: Flink does not
checkpoint watermarks), every 100th event is ten minutes old: too late for any
window here (a dead letter in the file and, the table being scoped to the
customer, in the table).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest

from conftest import live_outcome
from integration.conftest import (
    CLUSTER_SCRIPT, FLINK_MASTER, JOB_ENDPOINT, WORKER_POOL, replace_killed_taskmanager,
    run_script, wait_for)
from integration.test_pubsub_on_flink import PROJECT, _require_rest
from pipeline.deployment.flink_cluster import FlinkCluster

pytestmark = pytest.mark.integration

WINDOW_S, LATENESS_S = 5, 120
RATE, CUSTOMER = 200, 'pubco'


@pytest.fixture(scope='module')
def pubsub_cluster(flink_job_server, postgres_dsn, emulator):
  _require_rest(emulator)
  run_script(CLUSTER_SCRIPT, 'start')
  yield FlinkCluster(FLINK_MASTER)
  run_script(CLUSTER_SCRIPT, 'stop')


class PubSubCustomer:
  """A customer file for one test: its own topic and subscription, tables and job."""

  def __init__(self, tmp_path, dsn: str):
    from google.cloud import pubsub_v1
    self.run_id = uuid.uuid4().hex[:8]
    self.publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    self.topic = self.publisher.create_topic(
        name=self.publisher.topic_path(PROJECT, f'{CUSTOMER}-live-{self.run_id}')).name
    self.subscription = subscriber.create_subscription(request={
        'name': subscriber.subscription_path(PROJECT, f'{CUSTOMER}-live-{self.run_id}'),
        'topic': self.topic, 'ack_deadline_seconds': 30}).name
    self.source = self.subscription.rsplit('/', 1)[1]
    self.table = f'{CUSTOMER}_aggregates_{self.run_id}'
    self.dead_table = f'{CUSTOMER}_dead_{self.run_id}'
    self.job_name = f'{CUSTOMER}-{self.run_id}'
    self.dsn = dsn
    self.dir = tmp_path
    self.sent: list = []  # (source, payload) in publish order
    self.published = 0  # events numbered so far
    self.too_late: set = set()  # event ids published ten minutes old
    self.path = str(tmp_path / f'{CUSTOMER}.json')
    with open(self.path, 'w', encoding='utf-8') as f:
      json.dump({
          'customer_id': CUSTOMER,
          'window': {'size_s': WINDOW_S, 'allowed_lateness_s': LATENESS_S},
          'shards': 2,
          'source': {'kind': 'pubsub', 'subscriptions': [self.subscription]},
          'sink': {'kind': 'postgres', 'dsn': re.sub(r':[^:@/]*@', '@', dsn),
                   'table': self.table, 'dead_letter_table': self.dead_table},
          'deploy': {'flink': {
              'job_endpoint': JOB_ENDPOINT, 'flink_master': FLINK_MASTER, 'worker_pool': WORKER_POOL,
              'checkpoint_interval_s': 2, 'parallelism': 2, 'job_name': self.job_name}},
      }, f)

  def deploy(self, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, '-m', 'pipeline', 'deploy', '--customer-file', self.path,
         '--target', 'flink', *args],
        capture_output=True, text=True, timeout=600, cwd=str(self.dir),
        env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert result.returncode == 0, f'deploy {args}:\n{result.stdout}\n{result.stderr[-4000:]}'
    return result.stdout

  def _send(self, body: str, **attributes) -> object:
    self.sent.append((self.source, body))
    return self.publisher.publish(self.topic, body.encode(), **attributes)

  def publish(self, seconds: float, stragglers: threading.Event) -> None:
    """Live traffic for ``seconds``: event time now, every 9th event published
    again right behind (a new message id), every 50th message garbage, every
    100th event with a ``ts`` of ``garbage``, and once ``stragglers`` is set
    every 100th event ten minutes old."""
    deadline, i = time.monotonic() + seconds, self.published
    while time.monotonic() < deadline:
      tick, now, futures = time.monotonic(), int(time.time() * 1000), []
      for _ in range(RATE // 10):
        i += 1
        if i % 50 == 17:
          futures.append(self._send('{"event_id": "cut', ts=str(now)))
          continue
        event_time = now
        if stragglers.is_set() and i % 100 == 53:
          event_time = now - 600_000
          self.too_late.add(f'e{i}')
        body = json.dumps({'event_id': f'e{i}', 'customer_id': CUSTOMER, 'key': f'k{i % 4}',
                           'value': round((i % 97) * 0.5 - 20, 2), 'event_time': event_time})
        futures.append(self._send(body, ts='garbage' if i % 100 == 3 else str(event_time)))
        if i % 9 == 4:
          futures.append(self._send(body, ts=str(now)))
      for future in futures:
        future.result(timeout=60)
      self.published = i  # a later call goes on with new event ids
      time.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))

  def expected(self):
    """(accounting, final windows rounded as the table holds them, invalid and
    too-late payloads, sorted) by the contract."""
    outcome = live_outcome(self.sent, WINDOW_S, self.too_late)
    windows = {w: (c, round(total, 6), lo, hi) for w, (c, total, lo, hi) in outcome.windows.items()}
    return outcome.accounting, windows, sorted(outcome.invalid), sorted(outcome.too_late)

  def finals(self) -> dict:
    with psycopg.connect(self.dsn) as conn:
      try:
        rows = conn.execute(
            f'SELECT customer_id, key, window_start, window_end, count, sum, min, max '
            f'FROM "{self.table}"').fetchall()
      except psycopg.errors.UndefinedTable:
        return {}
    return {tuple(r[:4]): (r[4], round(r[5], 6), r[6], r[7]) for r in rows}

  def accounting(self) -> dict:
    try:
      with open(self.dir / 'tidemark-output' / 'accounting.json', encoding='utf-8') as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def dead_letter_rows(self) -> list:
    with psycopg.connect(self.dsn) as conn:
      return conn.execute(
          f'SELECT reason, source, data, message_id FROM "{self.dead_table}"').fetchall()

  def dead_letter_lines(self) -> list:
    with open(self.dir / 'tidemark-output' / 'dead_letter.jsonl', encoding='utf-8') as f:
      return [json.loads(line) for line in f]


def _assert_dead_letters_once(customer: PubSubCustomer, invalid: list, too_late: list) -> None:
  lines = customer.dead_letter_lines()
  assert sorted((d['source'], d['data']) for d in lines if d['reason'] == 'invalid') == invalid
  assert sorted((d['source'], d['data']) for d in lines if d['reason'] == 'too_late') == too_late
  assert len({d['message_id'] for d in lines}) == len(lines), 'a dead letter is written twice'
  rows = customer.dead_letter_rows()
  assert sorted((r[1], bytes(r[2]).decode()) for r in rows) == too_late  # data: the exact bytes
  assert len({r[3] for r in rows}) == len(rows), 'a dead letter is stored twice in the table'


def test_a_pubsub_job_on_the_cluster_survives_a_killed_taskmanager_exactly(
    pubsub_cluster, postgres_dsn, tmp_path):
  cluster = pubsub_cluster
  customer = PubSubCustomer(tmp_path, postgres_dsn)
  assert 'is running on the Flink cluster' in customer.deploy()
  job = cluster.wait_for_job(customer.job_name, 120)
  try:
    stragglers = threading.Event()
    publisher = threading.Thread(target=customer.publish, args=(75, stragglers))
    publisher.start()
    wait_for(lambda: cluster.checkpoints(job.jid)['counts']['completed'] >= 3, 90, '3 checkpoints')
    time.sleep(3)  # between two checkpoints, traffic flowing
    replace_killed_taskmanager(cluster, job.jid)
    time.sleep(15)  # the readers' watermarks estimated again from the present
    stragglers.set()
    publisher.join()
    accounting, windows, invalid, too_late = customer.expected()
    # Windows close once the subscription has been idle for a minute.
    wait_for(lambda: customer.finals() == windows and customer.accounting() == accounting,
          300, 'final rows and accounting equal to the contract')
    assert cluster.checkpoints(job.jid)['latest']['restored'] is not None
  finally:
    cluster.cancel(job.jid)
  assert accounting['duplicate'] > 100 and accounting['invalid'] > 20
  assert accounting['too_late'] > 5
  _assert_dead_letters_once(customer, invalid, too_late)
  # The table is scoped to the customer: its too-late letters only.
  assert {r[0] for r in customer.dead_letter_rows()} == {'too_late'}



def test_a_pubsub_job_stopped_with_a_savepoint_and_restored_continues_exactly(
    pubsub_cluster, postgres_dsn, tmp_path):
  """``deploy --stop`` takes a savepoint of the Java read's state (its
  unacknowledged messages and the ids it deduplicates by) and cancels the job;
  traffic waits in the subscription meanwhile; ``deploy --from-savepoint``
  continues: nothing lost, nothing counted or stored twice."""
  cluster = pubsub_cluster
  customer = PubSubCustomer(tmp_path, postgres_dsn)
  customer.deploy()
  first = cluster.wait_for_job(customer.job_name, 120)
  stragglers = threading.Event()
  # traffic flows through the stop, the pause and the restore
  publisher = threading.Thread(target=customer.publish, args=(30, stragglers))
  publisher.start()
  wait_for(lambda: cluster.checkpoints(first.jid)['counts']['completed'] >= 2, 90,
           '2 checkpoints')
  time.sleep(3)
  savepoint = customer.deploy('--stop').strip().splitlines()[-1].split('savepoint ', 1)[1]
  assert cluster.job(first.jid)['state'] == 'CANCELED'
  time.sleep(5)  # no job reads: the traffic waits in the subscription
  customer.deploy('--from-savepoint', savepoint)
  second = cluster.wait_for_job(customer.job_name, 120)
  try:
    publisher.join()
    time.sleep(15)  # the readers' watermarks estimated again from the present
    stragglers.set()
    customer.publish(15, stragglers)
    accounting, windows, invalid, too_late = customer.expected()
    wait_for(lambda: customer.finals() == windows and customer.accounting() == accounting,
             300, 'final rows and accounting equal to the contract')
    assert cluster.checkpoints(second.jid)['latest']['restored']['is_savepoint']
    assert cluster.restarts(second.jid) == 0
  finally:
    cluster.cancel(second.jid)
  assert accounting['duplicate'] > 100 and accounting['invalid'] > 20
  assert accounting['too_late'] > 5
  _assert_dead_letters_once(customer, invalid, too_late)
