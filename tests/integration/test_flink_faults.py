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
from collections import Counter
from typing import Optional, Tuple

import psycopg
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from integration.conftest import (
    CLUSTER_SCRIPT, FLINK_MASTER, JOB_ENDPOINT, REPO, WORKER_POOL, replace_killed_taskmanager,
    run_script, wait_for)
from integration.test_kafka_on_flink import Traffic
from pipeline.deployment.flink_cluster import FlinkCluster
from tools import reference

pytestmark = pytest.mark.integration

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


@pytest.fixture(scope='module')
def flink_cluster(flink_job_server, kafka_broker, postgres_dsn):
  run_script(CLUSTER_SCRIPT, 'start')
  yield FlinkCluster(FLINK_MASTER)
  run_script(CLUSTER_SCRIPT, 'stop')


class Customer:
  """A customer file for one test: its own topic, tables, group and job;
  optionally at a parallelism, with a rollup (size, lateness) and another
  checkpoint interval."""

  def __init__(self, tmp_path, kafka_broker: str, dsn: str, parallelism: Optional[int] = None,
               rollup: Optional[Tuple[int, int]] = None, checkpoint_interval_s: int = 2):
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
    self.rollup = rollup
    window = {'size_s': WINDOW_S, 'allowed_lateness_s': LATENESS_S, 'early_firing_s': 1}
    if rollup is not None:
      window['rollups'] = [{'size_s': rollup[0], 'allowed_lateness_s': rollup[1]}]
    flink = {'job_endpoint': JOB_ENDPOINT, 'flink_master': FLINK_MASTER, 'worker_pool': WORKER_POOL,
             'checkpoint_interval_s': checkpoint_interval_s, 'job_name': self.job_name}
    if parallelism is not None:
      flink['parallelism'] = parallelism
    with open(self.path, 'w', encoding='utf-8') as f:
      json.dump({
          'customer_id': CUSTOMER,
          'window': window,
          'shards': 2,
          'source': {'kind': 'kafka', 'bootstrap_servers': kafka_broker,
                     'topics': [self.topic], 'consumer_group': f'{CUSTOMER}.{self.run_id}'},
          # No password in a customer file: the workers read scripts/postgres.sh's passfile.
          'sink': {'kind': 'postgres', 'dsn': re.sub(r':[^:@/]*@', '@', dsn), 'table': self.table,
                   'dead_letter_table': f'{CUSTOMER}_dead_{self.run_id}'},
          'deploy': {'flink': flink},
      }, f)
    self.published = 0

  def deploy(self, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, '-m', 'pipeline', 'deploy', '--customer-file', self.path,
         '--target', 'flink', *args],
        capture_output=True, text=True, timeout=600, cwd=str(self.dir),
        env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert result.returncode == 0, f'deploy {args}:\n{result.stdout}\n{result.stderr[-4000:]}'
    # the graph is built without a windowing mismatch to warn about
    assert 'must have the same window' not in result.stderr, result.stderr[-4000:]
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

  def publish_fast(self, seconds: float, rate: int, stragglers: threading.Event) -> None:
    """``rate`` events/s for ``seconds`` over both partitions: event time now, every
    9th event redelivered right behind (every 27th one into the other partition,
    so its copies race), every 50th message garbage, and once ``stragglers`` is
    set every 100th event 10 minutes old: too late for any window size here once
    the job has seen the present. The reference's replay marks the watermark
    just past such an event's windows before it."""
    deadline = time.monotonic() + seconds
    batch = rate // 10
    while time.monotonic() < deadline:
      tick = time.monotonic()
      now = int(time.time() * 1000)
      late = stragglers.is_set()
      for _ in range(batch):
        i, self.published = self.published, self.published + 1
        partition = i % PARTITIONS
        if i % 50 == 17:
          self.traffic.send('A', partition, b'{"event_id": "cut', now)
          continue
        event_time = now
        if late and i % 100 == 3:
          event_time = now - 600_000
          self.traffic.watermark_everywhere(now - 500_000)
        body = (f'e{i}', CUSTOMER, f'k{i % 4}', round((i % 97) * 0.5 - 20, 2), event_time)
        self.traffic.event('A', partition, *body)
        if i % 9 == 4:
          self.traffic.event('A', (partition + (i % 27 == 4)) % PARTITIONS, *body)
      self.traffic.flush()
      time.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))

  def on_time_rows(self) -> int:
    with psycopg.connect(self.dsn) as conn:
      try:
        return conn.execute(
            f'SELECT count(*) FROM "{self.table}" WHERE timing = %s', ('ON_TIME',)).fetchone()[0]
      except psycopg.errors.UndefinedTable:
        return 0

  def dead_letter_rows(self) -> list:
    with psycopg.connect(self.dsn) as conn:
      return conn.execute(
          f'SELECT reason, source, data, message_id, window_size_ms '
          f'FROM "{CUSTOMER}_dead_{self.run_id}"').fetchall()

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

  def output(self, name: str, rollup: bool = False):
    folder = self.dir / 'tidemark-output'
    return folder / f'rollup-{self.rollup[0]}s' / name if rollup else folder / name

  def accounting(self, rollup: bool = False) -> dict:
    try:
      with open(self.output('accounting.json', rollup), encoding='utf-8') as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def dead_letters(self, rollup: bool = False) -> list:
    with open(self.output('dead_letter.jsonl', rollup), encoding='utf-8') as f:
      return [json.loads(line) for line in f]

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


def _down_for(script: str, seconds: float) -> None:
  """Stops a service with its script, and starts it again ``seconds`` later."""
  run_script(script, 'stop')
  time.sleep(seconds)
  run_script(script, 'start')


def _completed_checkpoints(cluster: FlinkCluster, jid: str) -> int:
  return cluster.checkpoints(jid)['counts']['completed']


def test_a_killed_taskmanager_loses_nothing_and_doubles_nothing(
    flink_cluster, kafka_broker, postgres_dsn, tmp_path):
  customer = Customer(tmp_path, kafka_broker, postgres_dsn)
  assert 'is running on the Flink cluster' in customer.deploy()
  job = flink_cluster.wait_for_job(customer.job_name, 120)
  try:
    publisher = customer.publish_in_background(45)
    wait_for(lambda: _completed_checkpoints(flink_cluster, job.jid) >= 3, 60, '3 checkpoints')
    time.sleep(5)  # mid-way between checkpoints, traffic flowing
    checkpoint = flink_cluster.checkpoints(job.jid)['latest']['completed']
    killed_at = replace_killed_taskmanager(flink_cluster, job.jid)
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
  wait_for(lambda: _completed_checkpoints(flink_cluster, first.jid) >= 2, 60, '2 checkpoints')
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
  customer = Customer(tmp_path, kafka_broker, postgres_dsn, parallelism=2)
  customer.deploy()
  job = flink_cluster.wait_for_job(customer.job_name, 120)
  try:
    publisher = customer.publish_in_background(50)
    wait_for(lambda: customer.finals(), 60, 'the first rows in PostgreSQL')
    _down_for(POSTGRES_SCRIPT, 30)
    publisher.join()
    expected = customer.expected()
    customer.settle(expected, timeout_s=240)
    print(f'PostgreSQL down 30 s: the job restarted {flink_cluster.restarts(job.jid)} times')
  finally:
    flink_cluster.cancel(job.jid)
  _assert_dead_letters_once(customer, expected)


class AccountingSampler:
  """Reads the accounting files every 0.2 s while the job runs: each category
  of each file must only ever grow."""

  def __init__(self, customer: Customer):
    self._customer = customer
    self.samples = {False: [], True: []}  # rollup? -> records, in reading order
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._stop.is_set():
      for rollup, samples in self.samples.items():
        record = self._customer.accounting(rollup)
        if record and (not samples or record != samples[-1]):
          samples.append(record)
      time.sleep(0.2)

  def stop(self):
    self._stop.set()
    self._thread.join()

  def backwards(self) -> list:
    """``(rollup?, before, after)`` of every step back in any category."""
    return [(rollup, a, b) for rollup, samples in self.samples.items()
            for a, b in zip(samples, samples[1:]) if any(b[k] < a[k] for k in a)]


def test_the_deployed_shape_accounts_for_every_event_through_a_taskmanager_kill(
    flink_cluster, kafka_broker, postgres_dsn, tmp_path):
  """The shape customers deploy: parallelism 2, two partitions, two gate shards,
  a rollup, checkpoints, PostgreSQL; 2,000 events/s with garbage, redeliveries
  (some into the other partition) and events too late for every window size;
  a TaskManager killed mid-stream. Every accounting file ends equal to the
  reference and never steps back while the job runs; every dead letter is in the
  files and the table exactly once; the final rows equal the reference.

  Checkpoints every 10 s, as customers run them, and the kill 6 s after one:
  the rows written meanwhile (PostgreSQL takes them as panes fire) belong to a
  history the restore rolls back, with more early panes than the restored one
  fires again; the restored history's panes must replace them."""
  rollup = (20, 60)
  customer = Customer(tmp_path, kafka_broker, postgres_dsn, parallelism=2, rollup=rollup,
                      checkpoint_interval_s=10)
  assert 'is running on the Flink cluster' in customer.deploy()
  job = flink_cluster.wait_for_job(customer.job_name, 120)
  sampler = AccountingSampler(customer)
  try:
    stragglers = threading.Event()
    publisher = threading.Thread(target=customer.publish_fast, args=(60, 2000, stragglers))
    publisher.start()
    # An ON_TIME row proves the gate knows the present (it holds the windows'
    # watermark at its next closing): from now on a 10-minute-old event is too late.
    wait_for(customer.on_time_rows, 60, 'the first ON_TIME row in PostgreSQL')
    stragglers.set()
    completed = _completed_checkpoints(flink_cluster, job.jid)
    wait_for(lambda: _completed_checkpoints(flink_cluster, job.jid) > completed, 30,
             'a checkpoint with stragglers flowing')
    time.sleep(6)  # stragglers flowing, 6 s into the next checkpoint interval
    replace_killed_taskmanager(flink_cluster, job.jid)
    publisher.join()
    replay = customer.traffic.write_replay(str(tmp_path / 'published.jsonl'))
    primary = reference.compute(replay, WINDOW_S, LATENESS_S)
    rolled = reference.compute(replay, *rollup)
    expected = reference.Outcome(
        primary.accounting, {**primary.windows, **rolled.windows}, primary.too_late,
        primary.invalid)
    customer.settle(expected, timeout_s=240)
    wait_for(lambda: customer.accounting(rollup=True) == rolled.accounting, 120,
          'the rollup accounting to equal the reference')
    time.sleep(5)  # anything still on its way would show now
    assert flink_cluster.checkpoints(job.jid)['latest']['restored'] is not None
  finally:
    sampler.stop()
    flink_cluster.cancel(job.jid)

  for outcome in (primary, rolled):
    counts = outcome.accounting
    assert counts['received'] == (counts['invalid'] + counts['too_late'] + counts['duplicate']
                                  + counts['aggregated'])
  assert primary.accounting['too_late'] > 100 and rolled.accounting['too_late'] > 100
  assert primary.accounting['duplicate'] > 1000 and primary.accounting['invalid'] > 1000
  assert customer.accounting() == primary.accounting
  assert customer.accounting(rollup=True) == rolled.accounting
  assert sampler.backwards() == []
  # the files move once per checkpoint (10 s) at most: a few steps to compare
  assert len(sampler.samples[False]) >= 4 and len(sampler.samples[True]) >= 4

  # every dead letter once, in each file and in the table
  # (the job names its source by the topic; the reference by the traffic's name)
  letters = customer.dead_letters()
  assert Counter((d['reason'], d['data']) for d in letters) == Counter(
      [('too_late', data) for _, data in primary.too_late] +
      [('invalid', data) for _, data in primary.invalid])
  assert len({d['message_id'] for d in letters}) == len(letters)
  rolled_letters = customer.dead_letters(rollup=True)
  assert Counter(d['data'] for d in rolled_letters) == Counter(
      data for _, data in rolled.too_late)
  rows = customer.dead_letter_rows()
  stored = Counter((size, bytes(data).decode()) for _, _, data, _, size in rows)
  assert stored == Counter([(WINDOW_S * 1000, data) for _, data in primary.too_late] +
                           [(rollup[0] * 1000, data) for _, data in rolled.too_late])
  assert all(reason == 'too_late' and message_id for reason, _, _, message_id, _ in rows)


def _assert_dead_letters_once(customer: Customer, expected: reference.Outcome) -> None:
  letters = customer.dead_letters()
  assert Counter((d['reason'], d['data']) for d in letters) == Counter(
      [('too_late', data) for _, data in expected.too_late] +
      [('invalid', data) for _, data in expected.invalid])
  assert len({d['message_id'] for d in letters}) == len(letters)


def test_a_killed_jobmanager_is_resumed_from_the_latest_checkpoint(
    flink_cluster, kafka_broker, postgres_dsn, tmp_path):
  """Without high availability a restarted JobManager has forgotten its jobs;
  ``deploy --resume`` submits the job again from the newest checkpoint the
  lost one retained, and it continues exactly."""
  customer = Customer(tmp_path, kafka_broker, postgres_dsn, parallelism=2)
  customer.deploy()
  first = flink_cluster.wait_for_job(customer.job_name, 120)
  publisher = customer.publish_in_background(50)
  second = None
  try:
    wait_for(lambda: _completed_checkpoints(flink_cluster, first.jid) >= 3, 60, '3 checkpoints')
    time.sleep(3)
    pid = int(open(os.path.join(REPO, '.stage', 'run', 'flink-jobmanager.pid')).read())
    os.kill(pid, 9)
    wait_for(lambda: not os.path.exists(f'/proc/{pid}'), 30, 'the JobManager to die')
    killed_at = time.time()
    run_script(CLUSTER_SCRIPT, 'start')  # the JobManager again; the TaskManager rejoins it
    assert flink_cluster.running_job(customer.job_name) is None  # forgotten
    assert '--savepoint_path' in customer.deploy('--resume', '--dry-run')
    customer.deploy('--resume')
    second = flink_cluster.wait_for_job(customer.job_name, 120)
    print(f'JobManager killed to resumed job RUNNING: {time.time() - killed_at:.1f} s')
    publisher.join()
    expected = customer.expected()
    customer.settle(expected, timeout_s=240)
    restored = flink_cluster.checkpoints(second.jid)['latest']['restored']
    assert restored is not None and first.jid in restored['external_path']
  finally:
    publisher.join()
    if second is not None:
      flink_cluster.cancel(second.jid)
  _assert_dead_letters_once(customer, expected)


def test_the_kafka_broker_down_for_30_seconds_loses_nothing(
    flink_cluster, kafka_broker, postgres_dsn, tmp_path):
  """The broker stops for 30 s between two stretches of traffic (publishers
  cannot publish meanwhile); the job recovers by itself and counts every event once."""
  customer = Customer(tmp_path, kafka_broker, postgres_dsn, parallelism=2)
  customer.deploy()
  job = flink_cluster.wait_for_job(customer.job_name, 120)
  try:
    customer.publish(20)
    wait_for(lambda: _completed_checkpoints(flink_cluster, job.jid) >= 3, 60, '3 checkpoints')
    _down_for(os.path.join(REPO, 'scripts', 'kafka.sh'), 30)
    customer.publish(20)
    expected = customer.expected()
    customer.settle(expected, timeout_s=300)
    print(f'Kafka down 30 s: the job restarted {flink_cluster.restarts(job.jid)} times')
  finally:
    flink_cluster.cancel(job.jid)
  _assert_dead_letters_once(customer, expected)
