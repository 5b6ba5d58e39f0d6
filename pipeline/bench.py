"""``python -m pipeline bench``: benchmarks that print figures, one JSON line per run.

  replay   a generated incident replay through the whole pipeline (any runner;
           on the DirectRunner in bulk unless --replay-mode stream is passed
           through), beside the same data through the plain-Python reference;
           prints events/s, wall time, peak RSS and the ratio to the
           reference, and whether the outputs were equal. The full incident
           hour: --messages 2850000 --rate 791.
  soak     HOURS of event time at a steady rate (1-minute windows with lateness);
           the worker's RSS is sampled inside the pipeline each event-time hour;
           prints the samples and whether they stay flat (within +-10 %) after
           the warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

from pipeline import reference, traffic
from pipeline.run import final_panes


def _flag(extra: List[str], name: str, default: str) -> str:
  for i, arg in enumerate(extra):
    if arg == name and i + 1 < len(extra):
      return extra[i + 1]
    if arg.startswith(name + '='):
      return arg.split('=', 1)[1]
  return default


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


def _run_pipeline(args: argparse.Namespace, replay: str, extra: List[str]) -> Tuple[str, float]:
  """Runs ``python -m pipeline run`` on the replay; returns (output dir, wall s)."""
  out = os.path.join(args.workdir, 'out')
  command = [
      sys.executable, '-m', 'pipeline', 'run', '--source', f'replay:{replay}',
      '--window-size', str(args.window_size), '--allowed-lateness',
      str(args.allowed_lateness), '--output-dir', out, *extra
  ]
  started = time.monotonic()
  proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wall = time.monotonic() - started
  if proc.returncode != 0:
    raise SystemExit(f'pipeline failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return out, wall


def _bench_replay(args: argparse.Namespace, extra: List[str]) -> dict:
  replay = _replay_for(args, args.messages, args.rate, args.tick)
  out, wall = _run_pipeline(args, replay, extra)
  peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

  ref_started = time.monotonic()
  expected = reference.compute(replay, args.window_size, args.allowed_lateness)
  ref_wall = time.monotonic() - ref_started

  with open(os.path.join(out, 'accounting.json'), encoding='utf-8') as f:
    accounting = json.load(f)
  finals = final_panes(os.path.join(out, 'aggregates.jsonl'))
  windows = {w: (p['count'], p['sum'], p['min'], p['max']) for w, p in finals.items()}
  return {
      'bench': 'replay',
      'runner': _runner(extra),
      'replay_mode': _flag(
          extra, '--replay-mode', 'bulk' if _runner(extra) == 'DirectRunner' else 'stream'),
      'messages': args.messages,
      'wall_s': round(wall, 2),
      'events_per_s': round(args.messages / wall, 1),
      'peak_rss_mib': round(peak_rss_mib, 1),
      'reference_wall_s': round(ref_wall, 3),
      'reference_events_per_s': round(args.messages / ref_wall, 1),
      'ratio_to_reference': round(wall / ref_wall, 1),
      'outputs_equal_reference': (
          accounting == expected.accounting and windows == expected.windows),
  }


def _bench_soak(args: argparse.Namespace, extra: List[str]) -> dict:
  messages = int(args.hours * 3600 * args.rate)
  replay = _replay_for(args, messages, args.rate, args.tick)
  out, wall = _run_pipeline(args, replay, ['--sample-memory-every', '3600', *extra])
  with open(os.path.join(out, 'memory.jsonl'), encoding='utf-8') as f:
    samples = sorted((json.loads(line) for line in f), key=lambda s: s['event_time'])
  rss = [s['rss_mib'] for s in samples]
  steady = rss[args.warmup_hours:]
  spread = (max(steady) - min(steady)) / statistics.median(steady) if steady else None
  return {
      'bench': 'soak',
      'runner': _runner(extra),
      'event_time_hours': args.hours,
      'messages': messages,
      'wall_s': round(wall, 1),
      'events_per_s': round(messages / wall, 1),
      'rss_mib_per_event_hour': rss,
      'warmup_hours': args.warmup_hours,
      'steady_spread_pct': None if spread is None else round(100 * spread, 1),
      'flat_within_10pct': spread is not None and spread <= 0.10,
  }


def main(argv: List[str]) -> int:
  parser = argparse.ArgumentParser(prog='python -m pipeline bench', description=__doc__)
  parser.add_argument('kind', choices=['replay', 'soak'])
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
  args, extra = parser.parse_known_args(argv)
  if args.messages <= 0 or args.hours <= 0 or args.rate <= 0:
    parser.error('--messages, --hours and --rate must be positive')
  args.workdir = args.workdir or tempfile.mkdtemp(prefix='tidemark-bench-')
  os.makedirs(args.workdir, exist_ok=True)
  bench = _bench_replay if args.kind == 'replay' else _bench_soak
  print(json.dumps(bench(args, extra)), flush=True)
  return 0
