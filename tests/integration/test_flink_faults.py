"""Faults on a real Flink session cluster: Kafka in, PostgreSQL out, live traffic.

Each test submits a customer's job with ``python -m pipeline deploy`` to the
cluster of scripts/flink-cluster.sh (a JobManager, a TaskManager and the
Python worker pool, separate processes), detached and checkpointed every 2 s,
publishes live traffic (event time = now, redeliveries, garbage) while a fault
happens, and then waits for the windows to close. The final panes in
PostgreSQL and the job's accounting must equal the reference's reading of
exactly what was published: nothing lost, nothing counted twice.

The allowed lateness is longer than any outage here, so no event is too late
however long the recovery takes; the reference reads the traffic with the
watermark at the beginning of time, where nothing is too late either.
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
from confluent_kafka.admin import AdminClient, NewTopic

from integration.conftest import JOB_ENDPOINT, REPO
from integration.test_kafka_on_flink import Traffic
from pipeline.flink_cluster import FlinkCluster
from tools import reference

pytestmark = pytest.mark.integration

MASTER = '127.0.0.1:' + os.environ.get('FLINK_REST_PORT', '18081')
POOL = '127.0.0.1:' + os.environ.get('FLINK_WORKER_POOL_PORT', '18050')
CLUSTER_SCRIPT = os.path.join(REPO, 'scripts', 'flink-cluster.sh')
POSTGRES_SCRIPT = os.path.join(REPO, 'scripts', 'postgres.sh')
WINDOW_S, LATENESS_S, PARTITIONS = 5, 40, 2
RATE, CUSTOMER = 60, 'faultco'
#: payloads that once crashed a worker: each must be dead-lettered, no restart
POISON = [
    '{"event_id": "p1", "customer_id": "faultco", "key": "k", "value": 1.0, '
    '"event_time": 1705543260000, "pad": ' + '[' * 5000 + ']' * 5000 + '}',
    # valid, at the edge of a double: it is aggregated (a sum of two is clamped), so
    # it carries its own id and the time it is sent, like the rest of the traffic
    '{"event_id": "p2-@SEQ", "customer_id": "faultco", "key": "k", '
    '"value": 1.7976931348623157e308, "event_time": @NOW}',
    '{"event_id": "p3", "customer_id": "faultco", "key": "k", "value": 1.0, '
    '"event_time": "\uff12\uff10\uff12\uff14-01-18T02:01:00Z"}',
    '{"event_id": "p4", "customer_id": "faultco", "key": "k", "value": 1.0, "value": 2.0, '
    '"event_time": 1705543260000}',
]


def _script(path: str, action: str) -> None:
  result = subprocess.run([path, action], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, f'{path} {action}:\n{result.stdout}\n{result.stderr}'


@pytest.fixture(scope='module')
def flink_cluster(flink_job_server, kafka_broker, postgres_dsn):
  _script(CLUSTER_SCRIPT, 'start')
  yield FlinkCluster(MASTER)
  _script(CLUSTER_SCRIPT, 'stop')


class Customer:
  """A customer file for one test: its own topic, tables, group and job."""

  def __init__(self, tmp_path, kafka_broker: str, dsn: str):
    self.run_id = uuid.uuid4().hex[:8]
    self.topic = f'{CUSTOMER}.live-{self.run_id}'
    self.table = f'{CUSTOMER}_aggregates_{self.run_id}'
    self.job_name = f'{CUSTOMER}-{self.run_id}'
    self.dsn = dsn
    self.dir = tmp_path
    admin = AdminClient({'bootstrap.servers': kafka_broker})
    for future in admin.create_topics([NewTopic(self.topic, PARTITIONS, 1)]).values():
      future.result(30)
    self.traffic = Traffic(kafka_broker, {'A': self.topic})
    self.path = str(tmp_path / f'{CUSTOMER}.json')
    with open(self.path, 'w', encoding='utf-8') as f:
      json.dump({
          'customer_id': CUSTOMER,
          'window': {'size_s': WINDOW_S, 'allowed_lateness_s': LATENESS_S, 'early_firing_s': 1},
          'shards': 2,
          'source': {'kind': 'kafka', 'bootstrap_servers': kafka_broker,
                     'topics': [self.topic], 'consumer_group': f'{CUSTOMER}.{self.run_id}'},
          # No password in a customer file: the workers read scripts/postgres.sh's passfile.
          'sink': {'kind': 'postgres', 'dsn': re.sub(r':[^:@/]*@', '@', dsn), 'table': self.table,
                   'dead_letter_table': f'{CUSTOMER}_dead_{self.run_id}'},
          'deploy': {'flink': {
              'job_endpoint': JOB_ENDPOINT, 'flink_master': MASTER, 'worker_pool': POOL,
              'checkpoint_interval_s': 2, 'job_name': self.job_name}},
      }, f)
    self.published = 0

  def deploy(self, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, '-m', 'pipeline', 'deploy', '--customer-file', self.path,
         '--target', 'flink', *args],
        capture_output=True, text=True, timeout=600, cwd=str(self.dir),
        env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert result.returncode == 0, f'deploy {args}:\n{result.stdout}\n{result.stderr[-4000:]}'
    return result.stdout

  def publish(self, seconds: float, poison: bool = False) -> None:
    """Live traffic for ``seconds``: event time now, every 9th event
    redelivered right behind, every 50th message garbage."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
      now = int(time.time() * 1000)
      for _ in range(RATE // 10):
        i, self.published = self.published, self.published + 1
        partition = i % PARTITIONS
        if i % 50 == 17:
          self.traffic.send('A', partition, b'{"event_id": "cut', now)
          continue
        self.traffic.event('A', partition, f'e{i}', CUSTOMER, f'k{i % 4}',
                           round((i % 97) * 0.5 - 20, 2), now)
        if i % 9 == 4:
          self.traffic.event('A', partition, f'e{i}', CUSTOMER, f'k{i % 4}',
                             round((i % 97) * 0.5 - 20, 2), now)
      if poison and self.published % 300 < RATE // 10:
        for body in POISON:
          body = body.replace('@SEQ', str(self.published)).replace('@NOW', str(now))
          self.traffic.send('A', 0, body.encode('utf-8', 'surrogatepass'), now)
      self.traffic.flush()
      time.sleep(0.1)

  def publish_in_background(self, seconds: float, **kwargs) -> threading.Thread:
    thread = threading.Thread(target=self.publish, args=(seconds,), kwargs=kwargs)
    thread.start()
    return thread

  def expected(self) -> reference.Outcome:
    return reference.compute(
        self.traffic.write_replay(str(self.dir / 'published.jsonl')), WINDOW_S, LATENESS_S)

  def finals(self) -> dict:
    with psycopg.connect(self.dsn) as conn:
      try:
        rows = conn.execute(
            f'SELECT customer_id, key, window_start, window_end, count, sum, min, max '
            f'FROM "{self.table}"').fetchall()
      except psycopg.errors.UndefinedTable:
        return {}
    return {tuple(r[:4]): tuple(r[4:]) for r in rows}

  def accounting(self) -> dict:
    try:
      with open(self.dir / 'tidemark-output' / 'accounting.json', encoding='utf-8') as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def settle(self, expected: reference.Outcome, timeout_s: float = 180) -> None:
    """Waits until PostgreSQL's final panes and the accounting equal the
    reference (windows close LATENESS_S after their end)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if self.finals() == expected.windows and self.accounting() == expected.accounting:
        return
      time.sleep(2)
    finals, windows = self.finals(), expected.windows
    wrong = {w: (finals.get(w), v) for w, v in windows.items() if finals.get(w) != v}
    raise AssertionError(
        f'after {timeout_s} s: accounting {self.accounting()} != {expected.accounting}; '
        f'{len(wrong)} of {len(windows)} windows differ, e.g. {list(wrong.items())[:3]}')


def _wait(predicate, timeout_s: float, what: str):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.5)
  raise AssertionError(f'timed out after {timeout_s} s waiting for {what}')


def _completed_checkpoints(cluster: FlinkCluster, jid: str) -> int:
  return cluster.checkpoints(jid)['counts']['completed']


def test_a_killed_taskmanager_loses_nothing_and_doubles_nothing(
    flink_cluster, kafka_broker, postgres_dsn, tmp_path):
  customer = Customer(tmp_path, kafka_broker, postgres_dsn)
  assert 'is running on the Flink cluster' in customer.deploy()
  job = flink_cluster.wait_for_job(customer.job_name, 120)
  try:
    publisher = customer.publish_in_background(45)
    _wait(lambda: _completed_checkpoints(flink_cluster, job.jid) >= 3, 60, '3 checkpoints')
    time.sleep(5)  # mid-way between checkpoints, traffic flowing
    checkpoint = flink_cluster.checkpoints(job.jid)['latest']['completed']
    killed_at = time.time()
    pid = int(open(os.path.join(REPO, '.stage', 'run', 'flink-taskmanager.pid')).read())
    os.kill(pid, 9)
    _wait(lambda: not os.path.exists(f'/proc/{pid}'), 30, 'the TaskManager to die')
    _script(CLUSTER_SCRIPT, 'start')  # a new TaskManager

    def running_again():
      detail = flink_cluster.job(job.jid)
      return (flink_cluster.restarts(job.jid) >= 1 and detail['state'] == 'RUNNING' and
              all(v['status'] == 'RUNNING' for v in detail['vertices']))
    _wait(running_again, 120, 'the job to run again')
    downtime = time.time() - killed_at
    publisher.join()
    expected = customer.expected()
    customer.settle(expected)
    replayed_s = killed_at - checkpoint['latest_ack_timestamp'] / 1000
    print(f'recovery: {downtime:.1f} s until every task ran again; input since the last '
          f'checkpoint replayed: {replayed_s:.1f} s (~{replayed_s * RATE:.0f} events at '
          f'{RATE}/s); restarts {flink_cluster.restarts(job.jid)}')
    assert flink_cluster.checkpoints(job.jid)['latest']['restored'] is not None
  finally:
    flink_cluster.cancel(job.jid)
  kinds = expected.accounting
  assert kinds['received'] == sum('data' in line for line in customer.traffic.lines)
  assert kinds['duplicate'] > 100 and kinds['invalid'] > 20 and kinds['too_late'] == 0
  assert sum(v[0] for v in expected.windows.values()) == kinds['aggregated']


def test_stop_with_savepoint_and_restore_continue_exactly(
    flink_cluster, kafka_broker, postgres_dsn, tmp_path):
  customer = Customer(tmp_path, kafka_broker, postgres_dsn)
  customer.deploy()
  first = flink_cluster.wait_for_job(customer.job_name, 120)
  # traffic flows through the stop, the pause and the restore
  publisher = customer.publish_in_background(50, poison=True)
  _wait(lambda: _completed_checkpoints(flink_cluster, first.jid) >= 2, 60, '2 checkpoints')
  time.sleep(3)
  assert flink_cluster.restarts(first.jid) == 0, 'poison messages restarted the job'
  stopped_at = time.time()
  out = customer.deploy('--stop')
  savepoint = out.strip().splitlines()[-1].split('savepoint ', 1)[1]
  assert flink_cluster.job(first.jid)['state'] == 'CANCELED'
  time.sleep(5)  # no job runs: the traffic waits in Kafka
  customer.deploy('--from-savepoint', savepoint)
  second = flink_cluster.wait_for_job(customer.job_name, 120)
  print(f'stop with savepoint to restored job RUNNING: {time.time() - stopped_at:.1f} s')
  try:
    publisher.join()
    expected = customer.expected()
    customer.settle(expected)
    assert flink_cluster.checkpoints(second.jid)['latest']['restored']['is_savepoint']
    assert flink_cluster.restarts(second.jid) == 0, 'poison messages restarted the job'
  finally:
    flink_cluster.cancel(second.jid)
  assert expected.accounting['too_late'] == 0
  assert expected.accounting['invalid'] >= len(POISON) * 3


def test_postgres_down_for_30_seconds_loses_nothing(
    flink_cluster, kafka_broker, postgres_dsn, tmp_path):
  customer = Customer(tmp_path, kafka_broker, postgres_dsn)
  customer.deploy()
  job = flink_cluster.wait_for_job(customer.job_name, 120)
  try:
    publisher = customer.publish_in_background(50)
    _wait(lambda: customer.finals(), 60, 'the first rows in PostgreSQL')
    _script(POSTGRES_SCRIPT, 'stop')
    time.sleep(30)
    _script(POSTGRES_SCRIPT, 'start')
    publisher.join()
    expected = customer.expected()
    customer.settle(expected, timeout_s=240)
    print(f'PostgreSQL down 30 s: the job restarted {flink_cluster.restarts(job.jid)} times')
  finally:
    flink_cluster.cancel(job.jid)
