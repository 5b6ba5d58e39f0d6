"""``python -m tools bench deployed``: the shape customers deploy, under a ramp.

Needs the Kafka broker, the Flink job server, the session cluster (with its
Python worker pool) and PostgreSQL running (``scripts/kafka.sh start``,
``scripts/flink.sh start``, ``scripts/flink-cluster.sh start``,
``scripts/postgres.sh start``); the bench starts none of them. It writes a
customer file (Kafka in with ``--partitions`` per topic, PostgreSQL out, a
rollup, ``--checkpoint-interval``, ``--parallelism``, two gate shards), deploys
it with ``python -m pipeline deploy --target flink`` (detached, as customers do)
and publishes the simulator's incident traffic at increasing rates, event time
following the wall clock, like ``bench stream`` (the same step verdict: the
backlogs published − received and published − routed, from accounting.json, may
not grow by more than ``--slack-seconds`` of traffic).

Per step it prints the CPU each process used (JobManager, TaskManager, the
worker pool with its SDK workers and how many of those run, broker, PostgreSQL,
this publisher) and the latency from a window's end to its ON_TIME row in
PostgreSQL (or the LATE row that replaced it: a pane released by the same
checkpoint as the one after it may be overwritten before a poll sees it) and to
its ON_TIME pane in aggregates.jsonl; at the end the job's
checkpoint durations (Flink's REST API), then it cancels the job and checks the
accounting (received = published = invalid + too_late + duplicate + aggregated).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from typing import Dict, List, Optional, Tuple

from tools import simulate, traffic
from tools.bench.stream import (
    BASE_MS, port_open, step_lines, wait_until, Watcher, descendants, latency_summary,
    max_sustained, service_pid, step_verdict, tree_cpu_seconds)
from transforms.rules.model import AGGREGATED, DUPLICATE, INVALID, RECEIVED, TOO_LATE

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MASTER = '127.0.0.1:' + os.environ.get('FLINK_REST_PORT', '18081')
POOL = '127.0.0.1:' + os.environ.get('FLINK_WORKER_POOL_PORT', '18050')
JOB_ENDPOINT = 'localhost:' + os.environ.get('FLINK_JOB_PORT', '18099')
CUSTOMER = 'benchco'
#: Processes whose CPU is reported, by the pid file scripts/ keep.
PROCESSES = ('flink-jobmanager', 'flink-taskmanager', 'flink-worker-pool', 'kafka')


class _RowWatcher(threading.Thread):
  """Polls the PostgreSQL table for rows past EARLY (ON_TIME, or a LATE row
  that replaced it): the wall time (ms) each window's first appeared."""

  def __init__(self, dsn: str, table: str, every_s: float = 0.2):
    super().__init__(daemon=True)
    self._dsn, self._table, self._every = dsn, table, every_s
    self._halt = threading.Event()
    self.lock = threading.Lock()
    self.seen: Dict[tuple, Tuple[int, int]] = {}  # window -> (end ms, seen ms)

  def run(self) -> None:
    import psycopg
    conn = None
    while not self._halt.is_set():
      try:
        conn = conn or psycopg.connect(self._dsn, autocommit=True)
        rows = conn.execute(
            f'SELECT customer_id, key, window_start, window_end FROM "{self._table}" '
            "WHERE timing <> 'EARLY'").fetchall()
        now = int(time.time() * 1000)
        with self.lock:
          for customer, key, start, end in rows:
            self.seen.setdefault((customer, key, start, end - start), (end, now))
      except psycopg.Error:
        conn = None  # the table does not exist yet, or the server went away
      self._halt.wait(self._every)

  def stop(self) -> None:
    self._halt.set()
    self.join(5)

  def latencies(self, start_ms: int, end_ms: int, size_ms: int) -> List[Tuple[int, float]]:
    with self.lock:
      return [(end, (seen - end) / 1000) for (_, _, _, size), (end, seen) in self.seen.items()
              if size == size_ms and start_ms <= end < end_ms]


def _customer_file(args: argparse.Namespace, path: str, run_id: str, topics: Dict[str, str],
                   dsn: str) -> dict:
  spec = {
      'customer_id': CUSTOMER,
      'window': {'size_s': args.window_size, 'allowed_lateness_s': args.allowed_lateness,
                 'rollups': [{'size_s': args.window_size * 6,
                              'allowed_lateness_s': args.allowed_lateness * 2}]},
      'shards': 2,
      'source': {'kind': 'kafka', 'bootstrap_servers': args.bootstrap_servers,
                 'topics': list(topics.values()),
                 'consumer_group': f'{CUSTOMER}.{run_id}'},
      'sink': {'kind': 'postgres', 'dsn': re.sub(r':[^:@/]*@', '@', dsn),
               'table': f'{CUSTOMER}_{run_id}', 'dead_letter_table': f'{CUSTOMER}_dead_{run_id}'},
      'deploy': {'flink': {
          'job_endpoint': JOB_ENDPOINT, 'flink_master': MASTER, 'worker_pool': POOL,
          'checkpoint_interval_s': args.checkpoint_interval, 'parallelism': args.parallelism,
          'job_name': f'{CUSTOMER}-{run_id}'}},
  }
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(spec, f)
  return spec


def _postgres_pid() -> Optional[int]:
  """The PostgreSQL server's pid (its postmaster.pid, scripts/postgres.sh's data folder)."""
  data = os.environ.get('TIDEMARK_PG_DATA', os.path.join(_ROOT, '.stage', 'postgres'))
  try:
    with open(os.path.join(data, 'postmaster.pid'), encoding='ascii') as f:
      return int(f.readline())
  except (OSError, ValueError):
    return None


def _pids() -> Dict[str, int]:
  pids = {name: service_pid(name) for name in PROCESSES}
  pids['postgres'] = _postgres_pid()
  return {**{n: p for n, p in pids.items() if p}, 'bench': os.getpid()}


def _checkpoint_summary(cluster, jid: str) -> dict:
  stats = cluster.checkpoints(jid)
  duration = stats.get('summary', {}).get('end_to_end_duration', {})
  size = stats.get('summary', {}).get('state_size', {})
  return {'completed': stats['counts']['completed'], 'failed': stats['counts']['failed'],
          'duration_ms': {k: duration.get(k) for k in ('min', 'avg', 'p95', 'max')},
          'state_size_bytes': {k: size.get(k) for k in ('avg', 'max')}}


def bench_deployed(args: argparse.Namespace, extra: List[str]) -> dict:
  from confluent_kafka.admin import AdminClient, NewTopic
  from pipeline.deployment.flink_cluster import FlinkCluster

  dsn = args.postgres_dsn or os.environ.get('TIDEMARK_POSTGRES_DSN')
  missing = [what for what, up in (
      (f'Kafka at {args.bootstrap_servers} (scripts/kafka.sh start)',
       port_open(args.bootstrap_servers.split(',')[0])),
      (f'the Flink job server at {JOB_ENDPOINT} (scripts/flink.sh start)',
       port_open(JOB_ENDPOINT)),
      (f'the Flink cluster at {MASTER} (scripts/flink-cluster.sh start)', port_open(MASTER)),
      ('PostgreSQL: --postgres-dsn (scripts/postgres.sh start prints it)', dsn))
      if not up]
  if missing:
    raise SystemExit('bench deployed: not running: ' + '; '.join(missing))
  run_id = uuid.uuid4().hex[:8]
  prefix = f'{CUSTOMER}.deployed-{run_id}-'  # a customer's resources carry its name
  topics = {s[0]: prefix + s[0] for s in traffic.Profile().sources}
  admin = AdminClient({'bootstrap.servers': args.bootstrap_servers})
  for future in admin.create_topics(
      [NewTopic(t, args.partitions, 1) for t in topics.values()]).values():
    future.result(30)
  workdir = os.path.join(args.workdir, f'deployed-{run_id}')
  os.makedirs(workdir)
  spec = _customer_file(args, os.path.join(workdir, 'benchco.json'), run_id, topics, dsn)
  job_name = spec['deploy']['flink']['job_name']
  plan = [(rate, step_lines(args, k, rate, args.step_seconds, customers=(CUSTOMER,)))
          for k, rate in enumerate([args.rates[0]] + list(args.rates))]
  # The customer's source names are its topics: the simulator publishes to PREFIX + source.
  target = simulate.KafkaTarget(args.bootstrap_servers, prefix)
  cluster = FlinkCluster(MASTER)
  deployed = subprocess.run(
      [sys.executable, '-m', 'pipeline', 'deploy', '--customer-file',
       os.path.join(workdir, 'benchco.json'), '--target', 'flink'],
      cwd=workdir, capture_output=True, text=True, timeout=600)
  if deployed.returncode != 0:
    raise SystemExit(f'bench deployed: deploy failed:\n{deployed.stderr[-3000:]}')
  job = cluster.wait_for_job(job_name, 120)
  output_dir = os.path.join(workdir, 'tidemark-output')
  watcher = Watcher(output_dir)
  rows = _RowWatcher(dsn, spec['sink']['table'])
  watcher.start()
  rows.start()
  result: dict = {'bench': 'deployed', 'parallelism': args.parallelism,
                  'checkpoint_interval_s': args.checkpoint_interval,
                  'partitions_per_topic': args.partitions, 'window_size_s': args.window_size}
  steps: List[dict] = []

  def count(_message) -> None:
    watcher.published += 1

  try:
    rate, lines = plan[0]  # warm-up: until the job has read it all
    simulate.simulate(lines, target, rate, int(time.time() * 1000) - BASE_MS, count)
    if not wait_until(lambda: watcher.counts()[1] >= watcher.published, args.startup_timeout):
      raise SystemExit(f'bench deployed: the job did not catch up with the warm-up in '
                       f'{args.startup_timeout} s; see {workdir}')
    for rate, lines in plan[1:]:
      pids = _pids()
      # the worker pool's SDK workers and PostgreSQL's backends are their children
      tree = ('flink-worker-pool', 'postgres')
      cpu0 = {n: tree_cpu_seconds(p, n in tree) for n, p in pids.items()}
      watcher.start_step()
      step_start = time.time()
      simulate.simulate(lines, target, rate, int(step_start * 1000) - BASE_MS, count)
      step_end = time.time()
      step = step_verdict(rate, watcher.end_step(), args.slack_seconds)
      wall = step_end - step_start
      step['cpu_pct'] = {n: round(100 * (tree_cpu_seconds(pids[n], n in tree) - c) / wall)
                         for n, c in cpu0.items()}
      pool = pids.get('flink-worker-pool')
      step['sdk_worker_processes'] = len(
          [p for p in descendants(pool) if _is_sdk_worker(p)]) if pool else None
      window = (int(step_start * 1000), int(step_end * 1000))
      step['on_time_row_latency'] = latency_summary(
          rows.latencies(*window, args.window_size * 1000))
      step['on_time_pane_latency'] = latency_summary(watcher.latencies(*window))
      steps.append(step)
      print(f'bench deployed: {json.dumps(step)}', file=sys.stderr, flush=True)
      if not step['sustained']:
        break
    published = watcher.published
    drained = wait_until(lambda: watcher.counts()[1] >= published, args.drain_timeout)
    settle = 2 * args.allowed_lateness + 6 * args.window_size + 3 * args.checkpoint_interval
    wait_until(lambda: watcher.counts() == (published, published), settle, every_s=2)
    result['checkpoints'] = _checkpoint_summary(cluster, job.jid)
  finally:
    try:
      cluster.cancel(job.jid)
    finally:
      watcher.stop()
      rows.stop()
      admin.delete_topics(list(topics.values()))
  watcher.poll()
  accounting = dict(watcher.accounting)
  routed = sum(accounting.get(c, 0) for c in (INVALID, TOO_LATE, DUPLICATE, AGGREGATED))
  best = max_sustained(steps)
  at_best = next((s for s in steps if s['rate'] == best), None)
  result.update({
      'max_sustained_rate': best,
      'on_time_row_latency_at_max': at_best and at_best['on_time_row_latency'],
      'steps': steps,
      'published': watcher.published,
      'drained': drained,
      'accounting': accounting,
      'received_equals_published': accounting.get(RECEIVED) == watcher.published,
      'accounting_consistent': accounting.get(RECEIVED) == routed,
      'output_dir': output_dir,
  })
  return result


def _is_sdk_worker(pid: int) -> bool:
  """Whether ``pid`` is a Python process (the pool starts each SDK worker as one)."""
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      return b'python' in f.read().split(b'\0', 1)[0]
  except OSError:
    return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--checkpoint-interval', type=int, default=10,
                      help='deployed: seconds between checkpoints')
  parser.add_argument('--parallelism', type=int, default=2, help='deployed: job parallelism')
  parser.add_argument('--postgres-dsn',
                      help='deployed: PostgreSQL (default $TIDEMARK_POSTGRES_DSN)')
