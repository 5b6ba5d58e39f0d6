"""``python -m pipeline bench``: benchmarks that print figures, one JSON line per run.

  replay   a generated incident replay through the whole pipeline (any runner),
           beside the same data through the plain-Python reference; prints
           events/s, wall time, peak RSS and the ratio to the reference, and
           whether the outputs were equal.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import List

from pipeline import reference, traffic
from pipeline.run import final_panes


def _bench_replay(args: argparse.Namespace, extra: List[str]) -> dict:
  workdir = args.workdir or tempfile.mkdtemp(prefix='tidemark-bench-')
  replay = os.path.join(workdir, f'replay-{args.messages}.jsonl')
  if not os.path.exists(replay):
    traffic.write_replay(replay, traffic.Profile(
        messages=args.messages, seed=args.seed, rate_per_s=args.rate,
        window_size_s=args.window_size, allowed_lateness_s=args.allowed_lateness))
  out = os.path.join(workdir, 'out')
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
  peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

  ref_started = time.monotonic()
  expected = reference.compute(replay, args.window_size, args.allowed_lateness)
  ref_wall = time.monotonic() - ref_started

  with open(os.path.join(out, 'accounting.json'), encoding='utf-8') as f:
    accounting = json.load(f)
  finals = final_panes(os.path.join(out, 'aggregates.jsonl'))
  windows = {w: (p['count'], p['sum'], p['min'], p['max']) for w, p in finals.items()}
  runner = next((extra[i + 1] for i, a in enumerate(extra[:-1]) if a == '--runner'), None)
  return {
      'bench': 'replay',
      'runner': runner or 'DirectRunner',
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


def main(argv: List[str]) -> int:
  parser = argparse.ArgumentParser(prog='python -m pipeline bench', description=__doc__)
  parser.add_argument('kind', choices=['replay'])
  parser.add_argument('--messages', type=int, default=10000)
  parser.add_argument('--seed', type=int, default=7)
  parser.add_argument('--rate', type=float, default=traffic.Profile.rate_per_s)
  parser.add_argument('--window-size', type=int, default=60)
  parser.add_argument('--allowed-lateness', type=int, default=30)
  parser.add_argument('--workdir', help='keep the replay and outputs here')
  args, extra = parser.parse_known_args(argv)
  if args.messages <= 0:
    parser.error('--messages must be positive')
  print(json.dumps(_bench_replay(args, extra)), flush=True)
  return 0
