"""``python -m tools bench``: benchmarks that print figures, one JSON line per run.

  replay   a generated incident replay through the whole pipeline (any runner;
           on the DirectRunner in bulk unless --replay-mode stream is passed
           through), beside the same data through the plain-Python reference
           and the decode limit (msgspec alone decoding the same payloads on one
           core, times the cores the run uses); prints events/s, wall time,
           peak RSS, the three rates and the run's speed against the other two,
           and whether the outputs were equal. The full incident hour:
           --messages 2850000 --rate 791. --profile runs it once more in one
           process under cProfile and prints each phase's share of the time
           (tools/bench/profile.py).
  soak     HOURS of event time at a steady rate (1-minute windows with lateness);
           the worker's RSS is sampled inside the pipeline each event-time hour;
           on Flink the job server JVM's RSS and live heap (after a forced full
           GC, jcmd GC.class_histogram: Flink's heap state backend keeps all
           keyed state and timers there) are sampled as each of those samples
           appears; prints the samples and whether they stay flat (within
           +-10 %) after the warm-up.
  stream   Kafka (or Pub/Sub) -> the pipeline on Flink at increasing rates: the highest rate
           sustained (backlog not growing) and the window-end-to-ON_TIME-pane
           latency (see tools/bench/stream.py).
  drain    a pre-filled Kafka (or Pub/Sub) backlog read through Flink by the pipeline and by
           the stateless ceiling (read -> parse -> window -> combine), in the
           same command: both drain rates and their ratio (tools/bench/drain.py).
  deployed the shape customers deploy (session cluster, worker pool, parallelism,
           checkpoints, PostgreSQL, a rollup) under a ramp: sustained rate, CPU
           per process, window end -> ON_TIME row in PostgreSQL, checkpoint
           durations (tools/bench/deployed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, NamedTuple, Optional

from tools import reference, traffic
from tools.bench import deployed as bench_deployed
from tools.bench import drain as bench_drain
from tools.bench import profile as bench_profile
from tools.bench import stream as bench_stream
from pipeline.readback.reconciliation import live_output_dir
from pipeline.readback.reconciliation import final_panes
from transforms.flow.diagnostics import resident_mib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _flag(extra: List[str], name: str, default: str) -> str:
  value = bench_stream.option_value(extra, name)
  return default if value is None else value


def _runner(extra: List[str]) -> str:
  return _flag(extra, '--runner', 'DirectRunner')


def _replay_for(args: argparse.Namespace, messages: int, rate: float, tick_s: int) -> str:
  workdir = args.workdir
  replay = os.path.join(workdir, f'replay-{messages}-{rate}-{tick_s}-{args.seed}.jsonl')
  if not os.path.exists(replay):
    traffic.write_replay(replay, traffic.Profile(
        messages=messages, seed=args.seed, rate_per_s=rate, tick_s=tick_s,
        window_size_s=args.window_size, allowed_lateness_s=args.allowed_lateness))
  return replay


def _run_arguments(args: argparse.Namespace, replay: str, out: str, extra: List[str]) -> List[str]:
  """``pipeline run ...``: the run of the replay into ``out``."""
  return ['pipeline', 'run', '--source', f'replay:{replay}', '--window-size',
          str(args.window_size), '--allowed-lateness', str(args.allowed_lateness),
          '--output-dir', out, *extra]


class PipelineRun(NamedTuple):
  out: str  #: the output folder
  wall_s: float
  #: the peak resident set of the run's largest process (the launcher or a
  #: worker it started), from the kernel's accounting when the run ended
  peak_rss_mib: float


def _run_pipeline(args: argparse.Namespace, replay: str, extra: List[str],
                  on_poll: Optional[Callable[[str], None]] = None) -> PipelineRun:
  """Runs ``python -m pipeline run`` on the replay. ``on_poll(output dir)`` is
  called about twice a second while it runs."""
  out = os.path.join(args.workdir, 'out')
  command = [sys.executable, '-m', *_run_arguments(args, replay, out, extra)]
  log_path = os.path.join(args.workdir, 'run.log')
  started = time.monotonic()
  with open(log_path, 'w', encoding='utf-8') as log:
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    while True:
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      if on_poll is not None:
        on_poll(out)
      time.sleep(0.5)
  wall = time.monotonic() - started
  returncode = os.waitstatus_to_exitcode(status)
  if returncode != 0:
    with open(log_path, encoding='utf-8', errors='replace') as f:
      tail = f.read()[-4000:]
    raise SystemExit(f'pipeline failed ({returncode}), log {log_path}:\n{tail}')
  return PipelineRun(out, wall, usage.ru_maxrss / 1024)


def decode_limit(replay: str) -> float:
  """Payloads per second that msgspec alone decodes on one core: every data
  line's payload of ``replay``, decoded once (the floor of any per-message work)."""
  import msgspec

  from transforms.rules.model import payload_bytes
  from transforms.rules.replay_index import index_replay, read_chunk
  index = index_replay(replay)
  payloads = [payload_bytes(message[5]) for chunk in index.chunks
              for message in read_chunk(replay, chunk)]
  decode = msgspec.json.Decoder().decode
  started = time.process_time()
  for payload in payloads:
    try:
      decode(payload)
    except msgspec.DecodeError:
      pass
  return len(payloads) / max(time.process_time() - started, 1e-9)


def _cores(extra: List[str], messages: int) -> int:
  """The cores a run works on: a DirectRunner bulk run's worker processes (as
  ``use_every_core``), else the job's ``--parallelism``, at most the machine's
  cores (all of them when it is not given)."""
  from pipeline.settings.runners import PARALLEL_BULK_MESSAGES
  if _runner(extra) != 'DirectRunner':
    cpus = os.cpu_count() or 1
    return min(int(bench_stream.option_value(extra, '--parallelism') or cpus), cpus)
  given = bench_stream.option_value(extra, '--direct_num_workers')
  if given is not None:
    return int(given)
  return (os.cpu_count() or 1) if messages >= PARALLEL_BULK_MESSAGES else 1


def _bench_replay(args: argparse.Namespace, extra: List[str]) -> dict:
  replay = _replay_for(args, args.messages, args.rate, args.tick)
  out, wall, peak_rss_mib = _run_pipeline(args, replay, extra)

  ref_started = time.monotonic()
  expected = reference.compute(replay, args.window_size, args.allowed_lateness)
  ref_wall = time.monotonic() - ref_started

  per_core = decode_limit(replay)
  cores = _cores(extra, args.messages)
  rate = args.messages / wall

  with open(os.path.join(out, 'accounting.json'), encoding='utf-8') as f:
    accounting = json.load(f)
  finals = final_panes(os.path.join(out, 'aggregates.jsonl'))
  windows = {w: (p['count'], p['sum'], p['min'], p['max']) for w, p in finals.items()}
  profile = {}
  if args.profile:
    if _runner(extra) != 'DirectRunner' or '--direct_num_workers' in ' '.join(extra):
      raise SystemExit('bench replay --profile: the DirectRunner in one process only')
    profile = {'profile': bench_profile.profile_replay(
        _run_arguments(args, replay, os.path.join(args.workdir, 'profiled'), extra),
        args.workdir, REPO)}
  return {
      'bench': 'replay',
      'runner': _runner(extra),
      'replay_mode': _flag(
          extra, '--replay-mode', 'bulk' if _runner(extra) == 'DirectRunner' else 'stream'),
      'messages': args.messages,
      'wall_s': round(wall, 2),
      'events_per_s': round(rate, 1),
      'peak_rss_mib': round(peak_rss_mib, 1),
      'reference_wall_s': round(ref_wall, 3),
      'reference_events_per_s': round(args.messages / ref_wall, 1),
      'ratio_to_reference': round(wall / ref_wall, 1),
      'speed_vs_reference': float(f'{ref_wall / wall:.3g}'),
      'cores': cores,
      'decode_limit_events_per_s': round(per_core * cores, 1),
      'speed_vs_decode_limit': float(f'{rate / (per_core * cores):.3g}'),
      'outputs_equal_reference': (
          accounting == expected.accounting and windows == expected.windows),
      **profile,
  }


def steady_spread(series: List[Optional[float]], warmup: int) -> Optional[float]:
  """(max - min) / median of ``series`` after the first ``warmup`` values
  (missing values skipped)."""
  steady = [v for v in series[warmup:] if v is not None]
  return (max(steady) - min(steady)) / statistics.median(steady) if steady else None


def steady_slope(series: List[Optional[float]], warmup: int) -> Optional[float]:
  """Least-squares slope (units per sample, i.e. per event-time hour) of
  ``series`` after the first ``warmup`` values: growth, robust to one noisy sample."""
  points = [(i, v) for i, v in enumerate(series) if i >= warmup and v is not None]
  if len(points) < 2:
    return None
  mean_x = statistics.fmean(x for x, _ in points)
  mean_y = statistics.fmean(y for _, y in points)
  return (sum((x - mean_x) * (y - mean_y) for x, y in points) /
          sum((x - mean_x) ** 2 for x, _ in points))


def jvm_live_heap_mib(pid: int) -> Optional[float]:
  """The bytes of live objects on the JVM's heap, in MiB: ``jcmd PID
  GC.class_histogram`` runs a full GC and counts what survives, in one step.
  None if ``pid`` is not a JVM (jcmd would send it SIGQUIT), jcmd is missing or
  answers otherwise."""
  try:
    if os.path.basename(os.readlink(f'/proc/{pid}/exe')) != 'java':
      return None
    histogram = subprocess.run(['jcmd', str(pid), 'GC.class_histogram'], capture_output=True,
                               text=True, timeout=120, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  match = re.search(r'^Total\s+\d+\s+(\d+)\s*$', histogram, re.MULTILINE)
  return round(int(match.group(1)) / 2**20, 1) if match else None


class _JvmSampler:
  """Samples the job server JVM each time a new worker memory sample appears
  in memory.jsonl (one per event-time hour), keyed by its event time."""

  def __init__(self, pid: int, live_heap: bool):
    self.pid = pid
    self._live_heap = live_heap
    self.samples = {}

  def __call__(self, out: str) -> None:
    try:
      with open(os.path.join(live_output_dir(out), 'memory.jsonl'), encoding='utf-8') as f:
        times = [json.loads(line)['event_time'] for line in f if line.endswith('\n')]
    except OSError:
      return
    for event_time in times:
      if event_time not in self.samples:
        sample = {'rss_mib': round(resident_mib(self.pid), 1)}
        if self._live_heap:
          sample['live_heap_mib'] = jvm_live_heap_mib(self.pid)
        self.samples[event_time] = sample


def _bench_soak(args: argparse.Namespace, extra: List[str]) -> dict:
  messages = int(args.hours * 3600 * args.rate)
  replay = _replay_for(args, messages, args.rate, args.tick)
  runner = _runner(extra)
  jvm = None
  if runner in ('PortableRunner', 'FlinkRunner'):
    pid = args.jvm_pid or bench_stream.service_pid('flink')
    if pid is None:
      raise SystemExit('bench soak: no Flink job server pid (scripts/flink.sh start, or --jvm-pid)')
    jvm = _JvmSampler(pid, args.jvm_live_heap)
  # Samples that only appear as the job ends (the last hour's, flushed when the
  # watermark jumps to the end) have no JVM figure: the job is being torn down.
  out, wall, _ = _run_pipeline(args, replay, ['--sample-memory-every', '3600', *extra], jvm)
  with open(os.path.join(out, 'memory.jsonl'), encoding='utf-8') as f:
    samples = sorted((json.loads(line) for line in f), key=lambda s: s['event_time'])
  rss = [s['rss_mib'] for s in samples]
  spread = steady_spread(rss, args.warmup_hours)
  slope = steady_slope(rss, args.warmup_hours)
  figures = {
      'bench': 'soak',
      'runner': runner,
      'event_time_hours': args.hours,
      'messages': messages,
      'wall_s': round(wall, 1),
      'events_per_s': round(messages / wall, 1),
      'rss_mib_per_event_hour': rss,
      'warmup_hours': args.warmup_hours,
      'steady_spread_pct': None if spread is None else round(100 * spread, 1),
      'steady_slope_mib_per_hour': None if slope is None else round(slope, 2),
      'flat_within_10pct': spread is not None and spread <= 0.10,
  }
  if jvm is not None:
    # The last hour's sample appears only when the watermark jumps to the end
    # of time, as Flink finishes the job and frees it: not a steady figure.
    per_hour = [jvm.samples.get(s['event_time'], {}) for s in samples[:-1]] + [{}]
    jvm_rss = [h.get('rss_mib') for h in per_hour]
    live = [h.get('live_heap_mib') for h in per_hour]
    figures['job_server_rss_mib_per_event_hour'] = jvm_rss
    if args.jvm_live_heap:
      figures['job_server_live_heap_mib_per_event_hour'] = live
    for name, series in (('job_server_rss', jvm_rss), ('job_server_live_heap', live)):
      s = steady_spread(series, args.warmup_hours)
      k = steady_slope(series, args.warmup_hours)
      figures[f'{name}_steady_spread_pct'] = None if s is None else round(100 * s, 1)
      figures[f'{name}_steady_slope_mib_per_hour'] = None if k is None else round(k, 2)
  return figures


def main(argv: List[str]) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m tools bench', description=__doc__, allow_abbrev=False,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('kind', choices=['replay', 'soak', 'stream', 'drain', 'deployed'])
  parser.add_argument('--messages', type=int, default=10000)
  parser.add_argument('--seed', type=int, default=7)
  parser.add_argument('--rate', type=float, default=traffic.Profile.rate_per_s)
  parser.add_argument('--window-size', type=int, default=60)
  parser.add_argument('--allowed-lateness', type=int, default=30)
  parser.add_argument('--tick', type=int, default=traffic.Profile.tick_s,
                      help='seconds of event time between watermark reports')
  parser.add_argument('--hours', type=float, default=24.0, help='soak: event-time hours')
  parser.add_argument('--warmup-hours', type=int, default=3, help='soak: samples to ignore')
  parser.add_argument('--workdir', help='keep the replay and outputs here')
  parser.add_argument('--profile', action='store_true',
                      help='replay: run it again in one process under cProfile and print '
                           'the share of each phase (tools/bench/profile.py)')
  parser.add_argument('--jvm-pid', type=int,
                      help='soak on Flink: the job server pid (default: scripts/flink.sh\'s)')
  parser.add_argument('--no-jvm-live-heap', dest='jvm_live_heap', action='store_false',
                      help='soak on Flink: sample the JVM\'s RSS only, no forced GC')
  bench_stream.add_arguments(parser)
  bench_drain.add_arguments(parser)
  bench_deployed.add_arguments(parser)
  args, extra = parser.parse_known_args(argv)
  if args.messages <= 0 or args.hours <= 0 or args.rate <= 0:
    parser.error('--messages, --hours and --rate must be positive')
  args.workdir = args.workdir or tempfile.mkdtemp(prefix='tidemark-bench-')
  os.makedirs(args.workdir, exist_ok=True)
  if args.partitions < 1 or args.step_seconds <= 0 or args.slack_seconds < 0:
    parser.error('--partitions and --step-seconds must be positive, --slack-seconds >= 0')
  bench = {'replay': _bench_replay, 'soak': _bench_soak,
           'stream': bench_stream.bench_stream, 'drain': bench_drain.bench_drain,
           'deployed': bench_deployed.bench_deployed}[args.kind]
  print(json.dumps(bench(args, extra)), flush=True)
  return 0
