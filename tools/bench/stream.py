"""``python -m tools bench stream``: the highest rate the pipeline sustains
reading Kafka (or, ``--source pubsub``, Pub/Sub) on Flink, and the
event-to-final-pane latency.

Needs a running Kafka broker (or the Pub/Sub emulator, with
``PUBSUB_EMULATOR_HOST`` set) and Flink job server (``scripts/kafka.sh start``,
``scripts/pubsub-emulator.sh start``, ``scripts/flink.sh start``); the bench
does not start or stop them, so JVM start-up is never part of a figure. It
creates fresh topics (one per traffic source; for Pub/Sub, a subscription each),
launches ``python -m pipeline run`` reading them (by default on the
Flink job server, LOOPBACK worker), and publishes the simulator's incident
traffic (tools.traffic) at increasing rates, one step per rate. Event times
are shifted to the moment each step starts, so event time follows the wall
clock and a window's end is a wall-clock instant.

Per step it compares what was published with what the pipeline has accounted
for (accounting.json, rewritten every 2 s): the step is *sustained* when the
backlog (published - received, and published - received-and-routed; their
least-squares trend through observations every 0.2 s) did not grow by more than
``--slack-seconds`` of traffic over the step. The ramp stops at the first step
that is not sustained. Latency is the wall time from a
window's end to its ON_TIME pane appearing in aggregates.jsonl (the final pane
unless late data follows), p50/p95/max over the windows that ended in a step.

At the end it waits for the backlog to drain and every window to close, checks
the accounting (received = invalid + too_late + duplicate + aggregated, and
aggregated = the sum of the final panes' counts), cancels the job through the
job service (the launcher then stops cleanly) and deletes the topics, unless the
job server kept Kafka consumers of the job alive (Beam's KafkaIO on Flink does
not close them on cancel): then the topics stay, and it says so. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from tools import simulate, traffic
from pipeline.readback.reconciliation import live_output_dir
from pipeline.readback.reconciliation import Reconciliation, final_panes
from transforms.rules.model import AGGREGATED, DUPLICATE, INVALID, RECEIVED, TOO_LATE

#: The live throughput target on Kafka -> Flink, events per second.
TARGET_EVENTS_PER_S = 5000
#: The checkpoint interval of a Pub/Sub run unless given (ms): Flink acks a
#: message when the checkpoint that holds it completes.
PUBSUB_CHECKPOINT_MS = 2000
#: How long (s) to allow the Java Pub/Sub read's watermark to reach the wall
#: clock once traffic stops: each reader does after a minute without messages.
PUBSUB_WATERMARK_S = 120
#: Event times of the generated traffic start here and are shifted to "now".
BASE_MS = traffic.INCIDENT_START_MS
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CLK_TCK = os.sysconf('SC_CLK_TCK')


def stage_dir() -> str:
  """Where scripts/ keep pid files and logs (``TIDEMARK_STAGE`` or ``.stage``)."""
  return os.environ.get('TIDEMARK_STAGE', os.path.join(_ROOT, '.stage'))


def service_pid(name: str) -> Optional[int]:
  """The pid of a live service started by scripts/ (``flink``, ``kafka``), or None."""
  try:
    with open(os.path.join(stage_dir(), 'run', f'{name}.pid'), encoding='ascii') as f:
      pid = int(f.read().strip())
    os.kill(pid, 0)
    return pid
  except (OSError, ValueError):
    return None


def flink_args() -> List[str]:
  """Runner options for the job server that scripts/flink.sh starts."""
  port = os.environ.get('FLINK_JOB_PORT', '18099')
  return ['--runner=PortableRunner', f'--job_endpoint=localhost:{port}',
          '--environment_type=LOOPBACK']


# --- Pure logic: verdicts and summaries (unit tested) -------------------------

def slope(points: Sequence[Tuple[float, float]]) -> float:
  """Least-squares slope of ``(x, y)`` points (0 for fewer than two distinct x)."""
  if len(points) < 2:
    return 0.0
  mean_x = sum(x for x, _ in points) / len(points)
  mean_y = sum(y for _, y in points) / len(points)
  sxx = sum((x - mean_x) ** 2 for x, _ in points)
  if not sxx:
    return 0.0
  return sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx


#: One observation during a step: (monotonic s, published, received, accounted),
#: accounted = invalid + too_late + duplicate + aggregated.
Sample = Tuple[float, int, int, int]


#: A step whose publisher reached less than this share of its rate offered the
#: pipeline less than the rate the step names: it is no verdict on that rate.
REACHED_SHARE = 0.95


def step_verdict(rate: float, samples: Sequence[Sample], slack_s: float) -> dict:
  """Whether one step of the ramp was sustained, from observations taken
  through it (the first at its start, the last at its end).

  Two backlogs: published minus received (read by the pipeline) and published
  minus accounted (routed to an outcome). Their growth over the step is the
  least-squares trend through every observation times the step's length, not
  the difference of two snapshots: accounting.json is rewritten every 2 s and
  events wait in the router for timer rounds, so a single snapshot is noisy.
  The step is sustained when neither grew by more than ``slack_s`` seconds of
  traffic at ``rate``; it ``reached`` its rate when the publisher sent at least
  ``REACHED_SHARE`` of it.
  """
  if rate <= 0 or slack_s < 0 or len(samples) < 2:
    raise ValueError('rate must be positive, slack_s non-negative, and a step needs '
                     'at least two samples')
  (t0, p0, r0, a0), (t1, p1, r1, a1) = samples[0], samples[-1]
  seconds = t1 - t0
  if seconds <= 0:
    raise ValueError('samples must span some time')
  backlog = slope([(t, p - r) for t, p, r, _ in samples]) * seconds
  unrouted = slope([(t, p - a) for t, p, _, a in samples]) * seconds
  allowed = slack_s * rate
  return {
      'rate': rate,
      'seconds': round(seconds, 1),
      'published': p1 - p0,
      'publish_rate': round((p1 - p0) / seconds, 1),
      'receive_rate': round((r1 - r0) / seconds, 1),
      'account_rate': round((a1 - a0) / seconds, 1),
      'backlog_end': p1 - r1,
      'unrouted_end': p1 - a1,
      'backlog_growth': round(backlog),
      'unrouted_growth': round(unrouted),
      'samples': len(samples),
      'sustained': backlog <= allowed and unrouted <= allowed,
      'reached': (p1 - p0) / seconds >= REACHED_SHARE * rate,
  }


def percentile(values: Sequence[float], q: float) -> Optional[float]:
  """Nearest-rank percentile (``q`` in 0..100) of ``values``; None when empty."""
  if not values:
    return None
  ordered = sorted(values)
  rank = max(1, -(-len(ordered) * q // 100))  # ceil
  return ordered[int(rank) - 1]


def latency_summary(latencies: Sequence[Tuple[int, float]]) -> dict:
  """p50, p95 and max (s, one decimal) of ``(window end ms, latency s)`` pairs
  (one per key and window), how many there were and how many window ends (every
  key's window ends together, so the panes of one end are not independent)."""
  def r(x):
    return None if x is None else round(x, 1)
  seconds = [s for _, s in latencies]
  return {'windows': len(seconds), 'window_ends': len({e for e, _ in latencies}),
          'p50_s': r(percentile(seconds, 50)), 'p95_s': r(percentile(seconds, 95)),
          'max_s': r(max(seconds) if seconds else None)}


def max_sustained(steps: Iterable[dict]) -> Optional[float]:
  """The highest rate of the unbroken run of steps from the start that the
  publisher reached and the pipeline sustained."""
  best = None
  for step in steps:
    if not (step['sustained'] and step['reached']):
      break
    best = step['rate']
  return best


def parse_rates(text: str) -> List[float]:
  try:
    rates = [float(r) for r in text.split(',') if r.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r}: expected RATE[,RATE...]') from None
  if not rates or any(r <= 0 for r in rates) or rates != sorted(rates):
    raise argparse.ArgumentTypeError(f'{text!r}: rates must be positive and increasing')
  return rates


# --- Observing the run --------------------------------------------------------

def _processes() -> Dict[int, Tuple[int, float]]:
  """``{pid: (parent pid, CPU seconds used so far)}`` of every process, from /proc."""
  table: Dict[int, Tuple[int, float]] = {}
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat', encoding='ascii', errors='replace') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue
    table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK)
  return table


def descendants(root: int, table: Optional[Dict[int, Tuple[int, float]]] = None) -> List[int]:
  """The pids of ``root``'s children, their children, and so on."""
  table = _processes() if table is None else table
  found, todo = [], [root]
  while todo:
    pid = todo.pop()
    children = [p for p, (ppid, _) in table.items() if ppid == pid]
    found += children
    todo += children
  return found


def tree_cpu_seconds(root: int, with_descendants: bool = True) -> float:
  """CPU seconds (user + system) used so far by ``root`` and (by default) its
  descendants."""
  table = _processes()
  pids = [root] + (descendants(root, table) if with_descendants else [])
  return sum(table[p][1] for p in pids if p in table)


class Watcher(threading.Thread):
  """Polls the run's outputs: the latest accounting record, and the wall time
  (ms) at which each window's ON_TIME pane first appeared."""

  def __init__(self, output_dir: str, every_s: float = 0.2):
    super().__init__(daemon=True)
    self._output_dir = output_dir
    self._live: Optional[str] = None  # the folder the run writes into now
    self._every = every_s
    self._halt = threading.Event()
    self._offset = 0
    self._partial = b''
    self.lock = threading.Lock()
    self.accounting: Dict[str, int] = {}
    self.on_time_seen: Dict[tuple, Tuple[int, int]] = {}  # window -> (end ms, seen ms)
    self.published = 0  # messages sent so far (counted by the publisher)
    self._samples: Optional[List[Sample]] = None

  def run(self) -> None:
    while not self._halt.is_set():
      self.poll()
      self._halt.wait(self._every)

  def stop(self) -> None:
    self._halt.set()
    self.join(5)

  def poll(self) -> None:
    now = int(time.time() * 1000)
    live = live_output_dir(self._output_dir)  # the run's staging folder while it runs
    if live != self._live:
      self._live, self._offset, self._partial = live, 0, b''
      with self.lock:
        self.on_time_seen = dict(self.on_time_seen)
    try:
      with open(os.path.join(live, 'accounting.json'), encoding='utf-8') as f:
        accounting = json.load(f)
      with self.lock:
        self.accounting = accounting
    except (OSError, ValueError):
      pass
    try:
      with open(os.path.join(live, 'aggregates.jsonl'), 'rb') as f:
        f.seek(self._offset)
        chunk = f.read()
    except OSError:
      return
    self._sample()
    self._offset += len(chunk)
    lines = (self._partial + chunk).split(b'\n')
    self._partial = lines.pop()
    with self.lock:
      for line in lines:
        pane = json.loads(line)
        if pane['timing'] == 'ON_TIME':
          window = (pane['customer_id'], pane['key'], pane['window_start'])
          self.on_time_seen.setdefault(window, (pane['window_end'], now))

  def start_step(self) -> None:
    """Starts recording a Sample at every poll (and one now)."""
    with self.lock:
      self._samples = []
    self._sample()

  def end_step(self) -> List[Sample]:
    """Stops recording; returns the step's Samples, the last taken now."""
    self._sample()
    with self.lock:
      samples, self._samples = self._samples, None
    return samples

  def _sample(self) -> None:
    received, accounted = self.counts()
    with self.lock:
      if self._samples is not None:
        self._samples.append((time.monotonic(), self.published, received, accounted))

  def counts(self) -> Tuple[int, int]:
    """(received, accounted) where accounted = invalid + too_late + duplicate + aggregated."""
    with self.lock:
      a = dict(self.accounting)
    return a.get(RECEIVED, 0), sum(a.get(c, 0) for c in (INVALID, TOO_LATE, DUPLICATE, AGGREGATED))

  def latencies(self, start_ms: int, end_ms: int) -> List[Tuple[int, float]]:
    """``(window end ms, seconds from it to the ON_TIME pane)`` of the windows
    ending in [start, end)."""
    with self.lock:
      return [(end, (seen - end) / 1000) for end, seen in self.on_time_seen.values()
              if start_ms <= end < end_ms]


def tcp_connections(pid: int, remote_port: int) -> int:
  """Established TCP connections from process ``pid`` to ``remote_port``."""
  inodes = set()
  try:
    for fd in os.listdir(f'/proc/{pid}/fd'):
      try:
        link = os.readlink(f'/proc/{pid}/fd/{fd}')
      except OSError:
        continue
      if link.startswith('socket:['):
        inodes.add(link[8:-1])
  except OSError:
    return 0
  count = 0
  for table in ('tcp', 'tcp6'):
    try:
      with open(f'/proc/{pid}/net/{table}', encoding='ascii') as f:
        next(f)
        for line in f:
          fields = line.split()
          if (fields[3] == '01' and int(fields[2].rsplit(':', 1)[1], 16) == remote_port
              and fields[9] in inodes):
            count += 1
    except OSError:
      pass
  return count


def port_open(address: str) -> bool:
  host, _, port = address.rpartition(':')
  try:
    with socket.create_connection((host or 'localhost', int(port)), timeout=2):
      return True
  except OSError:
    return False


def option_value(extra: Sequence[str], name: str) -> Optional[str]:
  """The value of option ``name`` in pass-through arguments (``NAME V`` or ``NAME=V``)."""
  for i, arg in enumerate(extra):
    if arg == name and i + 1 < len(extra):
      return extra[i + 1]
    if arg.startswith(name + '='):
      return arg.split('=', 1)[1]
  return None


def require_services(bootstrap: Optional[str], extra: Sequence[str]) -> Optional[str]:
  """None when Kafka (``bootstrap``; None: the Pub/Sub emulator), the job
  server and the expansion service answer; else what to start."""
  missing = []
  if bootstrap is None:
    emulator = os.environ.get('PUBSUB_EMULATOR_HOST')
    if not emulator or not port_open(emulator):
      missing.append('the Pub/Sub emulator (scripts/pubsub-emulator.sh start; '
                     'eval "$(scripts/pubsub-emulator.sh env)")')
  elif not port_open(bootstrap.split(',')[0]):
    missing.append(f'Kafka at {bootstrap} (scripts/kafka.sh start)')
  job = option_value(extra, '--job_endpoint')
  if job and not port_open(job):
    missing.append(f'the Flink job server at {job} (scripts/flink.sh start)')
  expansion = option_value(extra, '--kafka-expansion-service') or option_value(
      extra, '--kafka_expansion_service') or 'localhost:' + os.environ.get(
          'KAFKA_EXPANSION_PORT', '18096')
  if not port_open(expansion):
    missing.append(f'the Java expansion service at {expansion} (scripts/flink.sh start)')
  if missing:
    return 'bench stream: not running: ' + '; '.join(missing)
  return None


def step_lines(args: argparse.Namespace, step: int, rate: float, seconds: float,
                customers: Tuple[str, ...] = traffic.Profile.customers) -> List[traffic.Line]:
  """The simulator's traffic for one step, event ids made unique across steps."""
  profile = traffic.Profile(
      messages=max(1, int(rate * seconds)), seed=args.seed + step, rate_per_s=rate,
      window_size_s=args.window_size, allowed_lateness_s=args.allowed_lateness,
      start_ms=BASE_MS, customers=customers)
  tag = f'"event_id": "s{step}-'
  return [traffic.Data(line.source, line.payload.replace('"event_id": "', tag, 1),
                       line.event_time)
          if isinstance(line, traffic.Data) else line
          for line in traffic.generate(profile)]


def wait_until(predicate, timeout_s: float, every_s: float = 0.5) -> bool:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(every_s)
  return bool(predicate())


def cancel_job(job_endpoint: str, job_name: str) -> int:
  """Cancels the running jobs whose ``--job_name`` is ``job_name`` through the
  Beam job service; returns how many."""
  import grpc
  from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc
  states = beam_job_api_pb2.JobState
  done = (states.STOPPED, states.DONE, states.FAILED, states.CANCELLED, states.UPDATED,
          states.DRAINED, states.CANCELLING)
  cancelled = 0
  with grpc.insecure_channel(job_endpoint) as channel:
    stub = beam_job_api_pb2_grpc.JobServiceStub(channel)
    for info in stub.GetJobs(beam_job_api_pb2.GetJobsRequest(), timeout=30).job_info:
      name = info.pipeline_options.fields.get('beam:option:job_name:v1')
      if name is not None and name.string_value == job_name and info.state not in done:
        stub.Cancel(beam_job_api_pb2.CancelJobRequest(job_id=info.job_id), timeout=60)
        cancelled += 1
  return cancelled


def _stop_job(proc: subprocess.Popen, job_endpoint: Optional[str], job_name: str) -> int:
  """Cancels the job through the job service (the launcher then sees it
  cancelled, reconciles and exits); falls back to SIGINT, then SIGTERM. SDK
  worker processes left behind by the launcher are ended too."""
  workers = descendants(proc.pid)
  if proc.poll() is None and job_endpoint:
    try:
      cancel_job(job_endpoint, job_name)
      proc.wait(90)
    except Exception as e:  # pylint: disable=broad-except
      print(f'bench stream: cancelling through {job_endpoint} failed: {e}', file=sys.stderr)
  for stop in (lambda: proc.send_signal(signal.SIGINT), proc.terminate, proc.kill):
    if proc.poll() is not None:
      break
    stop()
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      pass
  for pid in workers:
    try:
      os.kill(pid, signal.SIGTERM)
    except OSError:
      pass
  return proc.wait()


def _leaked_consumers(flink_pid: Optional[int], kafka_port: int, before: int) -> int:
  """Kafka connections the job server opened for the job and still holds a
  few seconds after it stopped."""
  if not flink_pid:
    return 0
  leaked = 0
  for _ in range(10):
    leaked = max(0, tcp_connections(flink_pid, kafka_port) - before)
    if not leaked:
      break
    time.sleep(1)
  return leaked


class KafkaFeed:
  """Fresh Kafka topics, one per traffic source, and their publisher."""

  def __init__(self, bootstrap: str, prefix: str, sources: Sequence[str], partitions: int):
    from confluent_kafka.admin import AdminClient, NewTopic
    self.bootstrap = bootstrap
    self.topics = {s: prefix + s for s in sources}
    self._admin = AdminClient({'bootstrap.servers': bootstrap})
    for future in self._admin.create_topics(
        [NewTopic(t, partitions, 1) for t in self.topics.values()]).values():
      future.result(30)
    self.source = f'kafka:{bootstrap}/' + ','.join(f'{s}={t}' for s, t in self.topics.items())
    self.target = simulate.KafkaTarget(bootstrap, prefix)
    self.port = int(bootstrap.split(',')[0].rsplit(':', 1)[1])

  def source_for(self, read: int) -> str:
    """``--source`` of the ``read``-th read: every read reads the topics from the start."""
    return self.source

  def delete(self) -> None:
    self._admin.delete_topics(list(self.topics.values()))


class PubSubFeed:
  """Fresh Pub/Sub topics on the emulator, ``reads`` subscriptions each (a
  read consumes what it reads, so each read takes a set of its own), and
  their publisher."""

  def __init__(self, project: str, prefix: str, sources: Sequence[str], reads: int = 1):
    from google.cloud import pubsub_v1
    self._publisher, self._subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    self.topics = {s: self._publisher.create_topic(
        name=self._publisher.topic_path(project, prefix + s)).name for s in sources}
    #: per read, {source: subscription path}
    self.subscriptions = [{s: self._subscriber.create_subscription(request={
        'name': self._subscriber.subscription_path(project, f'{prefix}sub{k or ""}-{s}'),
        'topic': topic, 'ack_deadline_seconds': 60}).name for s, topic in self.topics.items()}
        for k in range(reads)]
    self.source = self.source_for(0)
    self.target = simulate.PubSubTarget(project, prefix, list(sources), create_topics=False)
    emulator = os.environ.get('PUBSUB_EMULATOR_HOST', ':0')
    self.port = int(emulator.rsplit(':', 1)[1])

  def source_for(self, read: int) -> str:
    """``--source`` of the ``read``-th read."""
    return 'pubsub:' + ','.join(f'{s}={p}' for s, p in self.subscriptions[read].items())

  def delete(self) -> None:
    for subscriptions in self.subscriptions:
      for path in subscriptions.values():
        self._subscriber.delete_subscription(subscription=path)
    for path in self.topics.values():
      self._publisher.delete_topic(topic=path)


def bench_stream(args: argparse.Namespace, extra: List[str]) -> dict:
  from apache_beam.options.pipeline_options import PipelineOptions
  from pipeline.settings.config import RunConfig
  from pipeline.readback.reconciliation import reconcile

  if option_value(extra, '--runner') is None:
    extra = flink_args() + list(extra)
  pubsub = args.source == 'pubsub'
  if pubsub and option_value(extra, '--checkpointing_interval') is None:
    # Flink acknowledges a Pub/Sub message when a checkpoint completes.
    extra = list(extra) + [f'--checkpointing_interval={PUBSUB_CHECKPOINT_MS}']
  if pubsub and option_value(extra, '--state_backend') is None:
    # The source's message ids of 10 minutes outgrow the 5 MB that Flink's
    # default (in-memory) checkpoint storage takes at ~1,500 messages/s.
    extra = list(extra) + ['--state_backend=filesystem', '--state_backend_storage_path=file://' +
                           os.path.join(os.path.abspath(args.workdir), 'checkpoints')]
  problem = require_services(None if pubsub else args.bootstrap_servers, extra)
  if problem:
    raise SystemExit(problem)
  py_spy = os.path.join(os.path.dirname(sys.executable), 'py-spy')
  if args.py_spy and not os.access(py_spy, os.X_OK):
    raise SystemExit(f'bench stream: --py-spy needs {py_spy}: pip install -e ".[bench]"')

  run_id = uuid.uuid4().hex[:8]
  prefix = f'tidemark-bench-{run_id}-'
  sources = [s[0] for s in traffic.Profile().sources]
  feed: Union[KafkaFeed, PubSubFeed] = (
      PubSubFeed(args.project, prefix, sources) if pubsub else
      KafkaFeed(args.bootstrap_servers, prefix, sources, args.partitions))

  out = os.path.join(args.workdir, f'stream-{run_id}')
  source = feed.source
  job_name = f'tidemark-bench-{run_id}'
  run_args = ['--source', source, '--window-size', str(args.window_size),
              '--allowed-lateness', str(args.allowed_lateness), '--output-dir', out,
              f'--job_name={job_name}', *extra]
  config = RunConfig.from_options(PipelineOptions(run_args))

  # Traffic for every step is generated before anything is timed.
  plan = [(rate, step_lines(args, k, rate, args.step_seconds))
          for k, rate in enumerate([args.rates[0]] + list(args.rates))]
  target = feed.target
  log_path = os.path.join(args.workdir, f'stream-{run_id}.log')
  log = open(log_path, 'w', encoding='utf-8')
  started = time.monotonic()
  # This interpreter first on PATH: Beam starts process workers as plain
  # ``python`` (--experiments=use_loopback_process_worker).
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep +
             os.environ.get('PATH', ''))
  proc = subprocess.Popen([sys.executable, '-m', 'pipeline', 'run', *run_args],
                          stdout=log, stderr=subprocess.STDOUT, cwd=_ROOT, env=env)
  watcher = Watcher(config.output_dir)
  watcher.start()
  kafka_port = feed.port
  flink_pid = service_pid('flink')
  connections_before = tcp_connections(flink_pid, kafka_port) if flink_pid else 0
  pids = {'pipeline': proc.pid, 'flink': flink_pid, 'bench': os.getpid(),
          **({'pubsub-emulator': service_pid('pubsub-emulator')} if pubsub else
             {'kafka': service_pid('kafka')})}
  published = 0
  profiler = None
  steps: List[dict] = []
  result: dict = {'bench': 'stream', 'source': args.source,
                  'runner': option_value(extra, '--runner')}
  try:
    # Warm-up: the first rate until the job has started and caught up.
    def count(_message) -> None:
      watcher.published += 1

    rate, lines = plan[0]
    simulate.simulate(lines, target, rate, int(time.time() * 1000) - BASE_MS, count)
    published = watcher.published
    if not wait_until(lambda: watcher.counts()[1] >= published or proc.poll() is not None,
                 args.startup_timeout):
      raise SystemExit(f'bench stream: the job did not catch up with {published} warm-up '
                       f'messages within {args.startup_timeout} s; see {log_path}')
    if proc.poll() is not None:
      raise SystemExit(f'bench stream: the pipeline exited ({proc.returncode}); see {log_path}')
    result['startup_s'] = round(time.monotonic() - started, 1)
    if args.py_spy:
      profiler = subprocess.Popen(
          [py_spy, 'record', '--pid', str(proc.pid), '--subprocesses', '--format', 'raw',
           '--rate', '47', '--output', args.py_spy],
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    for rate, lines in plan[1:]:
      cpu0 = {n: tree_cpu_seconds(p, n != 'bench') for n, p in pids.items() if p}
      watcher.start_step()
      step_start = time.time()
      simulate.simulate(lines, target, rate, int(step_start * 1000) - BASE_MS, count)
      step_end = time.time()
      samples = watcher.end_step()
      published = watcher.published
      wall = step_end - step_start
      step = step_verdict(rate, samples, args.slack_seconds)
      step['cpu_pct'] = {n: round(100 * (tree_cpu_seconds(pids[n], n != 'bench') - c) / wall)
                         for n, c in cpu0.items()}
      step['load_avg_1m'] = round(os.getloadavg()[0], 2)
      step['_window'] = (int(step_start * 1000), int(step_end * 1000))
      steps.append(step)
      print(f'bench stream: {json.dumps({k: v for k, v in step.items() if k[0] != "_"})}',
            file=sys.stderr, flush=True)
      if not step['sustained'] or proc.poll() is not None:
        break
    if profiler is not None:
      profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
      profiler.wait(60)
      result['py_spy_profile'] = args.py_spy if os.path.exists(args.py_spy) else None

    # Drain, let every window close, then check the accounting.
    drained_at = time.monotonic()
    drained = wait_until(lambda: watcher.counts()[1] >= published, args.drain_timeout)
    result['drain_s'] = round(time.monotonic() - drained_at, 1)

    def reconciled():
      try:
        reconcile(dataclasses.replace(config, output_dir=live_output_dir(config.output_dir)))
        return True
      except (Reconciliation, OSError, ValueError, KeyError):
        return False
    # A Pub/Sub reader moves its watermark to the wall clock only after a
    # minute without messages: then the last windows close.
    settle = args.window_size + args.allowed_lateness + 60 + (PUBSUB_WATERMARK_S if pubsub else 0)
    consistent = drained and wait_until(reconciled, settle, every_s=2)
  finally:
    # Each clean-up step runs whatever happened before it.
    try:
      code = _stop_job(proc, option_value(extra, '--job_endpoint'), job_name)
    finally:
      try:
        if profiler is not None and profiler.poll() is None:
          profiler.send_signal(signal.SIGINT)
          profiler.wait(60)
      finally:
        watcher.stop()
        log.close()
        leaked = 0 if pubsub else _leaked_consumers(flink_pid, kafka_port, connections_before)
        # Consumers left behind poll their topics for ever: deleting the topics
        # would turn that into a busy loop of errors (and a fast-growing log).
        if not leaked:
          feed.delete()
  watcher.poll()
  if leaked:
    print(f'bench stream: WARNING: the Flink job server still holds {leaked} Kafka '
          'connection(s) the stopped job opened (Beam\'s KafkaIO does not close its '
          'consumers when a job is cancelled on Flink); they keep polling, using CPU. '
          f'Topics {prefix}* are kept (deleting them makes the consumers spin). Restart '
          'the job server before the next measurement: scripts/flink.sh stop; '
          'scripts/flink.sh start', file=sys.stderr, flush=True)

  with open(config.accounting_path, encoding='utf-8') as f:
    accounting = json.load(f)
  parts = sum(accounting[c] for c in (INVALID, TOO_LATE, DUPLICATE, AGGREGATED))
  in_panes = sum(p['count'] for p in final_panes(config.aggregates_path).values())
  with open(os.path.join(out, 'on_time_panes_seen.jsonl'), 'w', encoding='utf-8') as f:
    for (customer, key, start), (end, seen) in sorted(watcher.on_time_seen.items()):
      f.write(json.dumps({'customer_id': customer, 'key': key, 'window_start': start,
                          'window_end': end, 'seen_ms': seen}) + '\n')
  for step in steps:
    step['on_time_latency'] = latency_summary(watcher.latencies(*step.pop('_window')))
  best = max_sustained(steps)
  at_best = next((s for s in steps if s['rate'] == best), None)
  result.update({
      'max_sustained_rate': best,
      'target_events_per_s': TARGET_EVENTS_PER_S,
      'on_time_latency_at_max': at_best and at_best['on_time_latency'],
      'step_seconds': args.step_seconds,
      'slack_seconds': args.slack_seconds,
      'partitions_per_topic': args.partitions,
      'steps': steps,
      'published': published,
      'accounting': accounting,
      'received_equals_published': accounting[RECEIVED] == published,
      'accounting_consistent': accounting[RECEIVED] == parts,
      'aggregated_equals_final_panes': accounting[AGGREGATED] == in_panes,
      'reconciled_before_stop': consistent,
      'pipeline_exit_code': code,
      'job_server_kafka_connections_left': leaked,
      'topics_deleted': not leaked,
      'pipeline_options': [a for a in extra],
      'output_dir': out,
  })
  return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--rates', type=parse_rates, default=parse_rates('250,500,1000,2000,4000'),
                      help='stream: messages/s per step, increasing')
  parser.add_argument('--step-seconds', type=float, default=60.0, help='stream: wall s per step')
  parser.add_argument('--slack-seconds', type=float, default=5.0,
                      help='stream: backlog growth tolerated per step, in seconds of traffic')
  parser.add_argument('--partitions', type=int, default=1, help='stream, drain: Kafka partitions per topic')
  parser.add_argument('--bootstrap-servers', default=simulate.DEFAULT_KAFKA_SERVERS,
                      help='stream, drain: Kafka')
  parser.add_argument('--source', choices=('kafka', 'pubsub'), default='kafka',
                      help='stream, drain: what the job reads: Kafka topics, or Pub/Sub subscriptions '
                      'on the emulator (PUBSUB_EMULATOR_HOST)')
  parser.add_argument('--project', default='tidemark-bench', help='stream, drain: Pub/Sub project')
  parser.add_argument('--startup-timeout', type=float, default=300.0,
                      help='stream: s to wait for the job to start and read the warm-up')
  parser.add_argument('--py-spy', metavar='PATH',
                      help='stream: record a py-spy profile (collapsed stacks) of the pipeline '
                      'process and its SDK workers over the ramp steps into PATH')
  parser.add_argument('--drain-timeout', type=float, default=300.0,
                      help='stream: s to wait for the backlog to drain after the ramp')
