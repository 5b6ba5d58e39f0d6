"""``python -m tools bench drain``: how fast a backlog drains through Flink,
the pipeline beside the stateless ceiling, in the same command.

Needs a running Kafka broker (or, ``--source pubsub``, the Pub/Sub emulator with
``PUBSUB_EMULATOR_HOST`` set) and Flink job server (``scripts/kafka.sh start`` or
``scripts/pubsub-emulator.sh start``, ``scripts/flink.sh start``). It creates
fresh topics (one per traffic source), fills them with the simulator's incident
traffic (skewed sources, stragglers, redeliveries, garbage), the same number of
messages in every topic and event times ending at the moment the fill ends, in
the traffic's arrival order, then reads that backlog with bounded reads
(``--kafka-max-records``, ``--pubsub-max-messages``) through

* ``ceiling``: read → parse → window → combine → write (tools/bench/ceiling.py),
* ``tidemark``: ``python -m pipeline run``, the whole product,

each twice per round: the first ``--small`` messages of every topic, then the
whole backlog (after one unmeasured warm-up read). A Pub/Sub read consumes what
it reads, so every read has subscriptions of its own, created before the fill.
Start-up (expansion, submission, job start) costs the same in both reads, so
the drain rate is the difference in messages over the difference in wall time.
Rounds alternate the two pipelines; the figures are the medians. It checks the
pipeline's accounting of the whole backlog (received = published, and the run
reconciled: exit code 0) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Dict, List, Sequence, Tuple, Union

from tools import simulate, traffic
from tools.bench.stream import (
    KafkaFeed, PubSubFeed, flink_args, option_value, require_services)

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def backlog_lines(per_topic: int, seed: int, window_size_s: int,
                  allowed_lateness_s: int) -> List[traffic.Data]:
  """``per_topic`` messages of incident traffic per source, in the traffic's
  arrival order: stragglers and redeliveries arrive behind their sources'
  record times, as in production."""
  profile = traffic.Profile(
      messages=per_topic * 8, seed=seed, rate_per_s=800.0, window_size_s=window_size_s,
      allowed_lateness_s=allowed_lateness_s)
  lines: List[traffic.Data] = []
  per_source: Dict[str, int] = {}
  for line in traffic.generate(profile):
    if isinstance(line, traffic.Data) and per_source.get(line.source, 0) < per_topic:
      per_source[line.source] = per_source.get(line.source, 0) + 1
      lines.append(line)
  short = {s: n for s, n in per_source.items() if n < per_topic}
  if short:
    raise SystemExit(f'bench drain: the traffic has too few messages for {short}')
  return lines


def _fill(feed: Union[KafkaFeed, PubSubFeed], lines: Sequence[traffic.Data]) -> float:
  """Sends ``lines`` as fast as ``feed`` takes them, event times ending a few
  seconds after the send does (a backlog of now); returns the seconds taken."""
  started = time.monotonic()
  estimate_s = len(lines) / 15000
  offset = int((time.time() + estimate_s) * 1000) - max(line.event_time for line in lines)
  simulate.simulate(lines, feed.target, 0, offset)
  return round(time.monotonic() - started, 1)


def _timed(command: Sequence[str], log_path: str) -> Tuple[int, float]:
  started = time.monotonic()
  with open(log_path, 'w', encoding='utf-8') as log:
    code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=_ROOT).returncode
  return code, time.monotonic() - started


def bench_drain(args: argparse.Namespace, extra: List[str]) -> dict:
  if option_value(extra, '--runner') is None:
    extra = flink_args() + list(extra)
  pubsub = args.source == 'pubsub'
  problem = require_services(None if pubsub else args.bootstrap_servers, extra)
  if problem:
    raise SystemExit(problem.replace('bench stream', 'bench drain'))
  per_topic = args.messages // 3
  small = args.small // 3
  if not 0 < small < per_topic:
    raise SystemExit('bench drain: --small must be positive and smaller than --messages')
  lines = backlog_lines(per_topic, args.seed, args.window_size, args.allowed_lateness)
  prefix = f'tidemark-drain-{uuid.uuid4().hex[:8]}-'
  sources = sorted({line.source for line in lines})
  feed: Union[KafkaFeed, PubSubFeed] = (
      PubSubFeed(args.project, prefix, sources, reads=1 + 4 * args.rounds) if pubsub else
      KafkaFeed(args.bootstrap_servers, prefix, sources, args.partitions))
  fill_s = _fill(feed, lines)
  bound = '--pubsub-max-messages' if pubsub else '--kafka-max-records'
  reads = itertools.count()

  def read_args(n: int) -> List[str]:
    """The next read's source and bound: ``n`` messages per topic."""
    return ['--source', feed.source_for(next(reads)), bound, str(n)]

  common = ['--window-size', str(args.window_size),
            '--allowed-lateness', str(args.allowed_lateness), *extra]
  commands = {
      'ceiling': [sys.executable, '-m', 'tools.bench.ceiling'],
      'tidemark': [sys.executable, '-m', 'pipeline', 'run'],
  }
  rounds: List[dict] = []
  problems: List[str] = []
  accounting = None
  # The first job on a job server pays class loading and JIT warm-up: not measured.
  warmup = os.path.join(args.workdir, 'warmup')
  _timed(commands['ceiling'] + common + read_args(small) + ['--output-dir', warmup],
         warmup + '.log')
  for k in range(args.rounds):
    order = list(commands) if k % 2 == 0 else list(commands)[::-1]
    measured = {}
    for name in order:
      walls = {}
      for n in (small, per_topic):
        out = os.path.join(args.workdir, f'{name}-{k}-{n}')
        code, wall = _timed(
            commands[name] + common + read_args(n) + ['--output-dir', out],
            out + '.log')
        if code != 0:
          problems.append(f'{name} reading {n} per topic exited {code}; see {out}.log')
        walls[n] = wall
        if name == 'tidemark' and n == per_topic:
          with open(os.path.join(out, 'accounting.json'), encoding='utf-8') as f:
            accounting = json.load(f)
          if accounting['received'] != 3 * per_topic:
            problems.append(f'received {accounting["received"]} of {3 * per_topic}')
      rate = 3 * (per_topic - small) / (walls[per_topic] - walls[small])
      measured[name] = {'wall_small_s': round(walls[small], 1),
                        'wall_all_s': round(walls[per_topic], 1),
                        'events_per_s': round(rate)}
      print(f'bench drain: round {k}: {name} {json.dumps(measured[name])}',
            file=sys.stderr, flush=True)
    measured['ratio'] = round(
        measured['tidemark']['events_per_s'] / measured['ceiling']['events_per_s'], 2)
    measured['load_avg_1m'] = round(os.getloadavg()[0], 2)
    rounds.append(measured)
  ceiling = statistics.median(r['ceiling']['events_per_s'] for r in rounds)
  tidemark = statistics.median(r['tidemark']['events_per_s'] for r in rounds)
  return {
      'bench': 'drain',
      'source': args.source,
      'messages': 3 * per_topic,
      'small': 3 * small,
      'partitions_per_topic': None if pubsub else args.partitions,
      'fill_s': fill_s,
      'ceiling_events_per_s': round(ceiling),
      'tidemark_events_per_s': round(tidemark),
      'ratio': round(statistics.median(r['ratio'] for r in rounds), 2),
      'rounds': rounds,
      'accounting': accounting,
      'problems': problems,
      'pipeline_options': list(extra),
      'workdir': args.workdir,
  }


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--small', type=int, default=30000,
                      help='drain: messages of the short read that prices start-up')
  parser.add_argument('--rounds', type=int, default=2,
                      help='drain: rounds, each reading with both pipelines')
