"""A replay on Flink gives exactly what it gives on the DirectRunner, and what
the contract says: the same accounting, final panes and dead letters."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from conftest import as_sent, letters
from tools import reference, traffic
from pipeline.readback.reconciliation import final_panes
from tests.integration.conftest import flink_args

WINDOW_S, LATENESS_S = 60, 30
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _arrivals_at_exactly_end_plus_lateness(replay: str) -> int:
  """Valid events that arrived with the pipeline watermark exactly at their
  window's ``end + lateness``, where the runner's own rule would decide."""
  marks, hits = {}, 0
  lines = [json.loads(line) for line in open(replay, encoding='utf-8') if line.strip()]
  for line in lines:
    if 'source' in line:
      marks.setdefault(line['source'], None)
  size, lateness = WINDOW_S * 1000, LATENESS_S * 1000
  for line in lines:
    if 'watermark' in line:
      marks[line['source']] = line['watermark']
    elif 'data' in line and None not in marks.values():
      event = reference.validate(line['data'])
      if event is not None:
        t = event[4]
        hits += min(marks.values()) == t - t % size + size + lateness
  return hits


def _run(replay: str, out: str, *extra: str) -> dict:
  proc = subprocess.run(
      [sys.executable, '-m', 'pipeline', 'run', '--source', f'replay:{replay}',
       '--window-size', str(WINDOW_S), '--allowed-lateness', str(LATENESS_S),
       '--output-dir', out, *extra],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(out, 'accounting.json'), encoding='utf-8') as f:
    accounting = json.load(f)
  with open(os.path.join(out, 'dead_letter.jsonl'), encoding='utf-8') as f:
    dead = [json.loads(line) for line in f]
  return {
      'accounting': accounting,
      'finals': {w: (p['count'], p['sum'], p['min'], p['max'])
                 for w, p in final_panes(os.path.join(out, 'aggregates.jsonl')).items()},
      'too_late': letters(dead, 'too_late'),
      'invalid': letters(dead, 'invalid'),
  }


@pytest.mark.integration
def test_a_replay_on_flink_equals_the_direct_runner_and_the_contract(tmp_path, flink_job_server):
  replay = str(tmp_path / 'incident.jsonl')
  traffic.write_replay(replay, traffic.Profile(
      messages=2000, seed=3, window_size_s=WINDOW_S, allowed_lateness_s=LATENESS_S))
  # The rule at exactly end + lateness differs between Beam Python and Java
  # windowing; Tidemark applies one rule on both, and this replay exercises it.
  assert _arrivals_at_exactly_end_plus_lateness(replay) >= 1

  direct = _run(replay, str(tmp_path / 'direct'), '--replay-mode', 'stream')
  bulk = _run(replay, str(tmp_path / 'bulk'), '--replay-mode', 'bulk')
  flink = _run(replay, str(tmp_path / 'flink'), '--replay-mode', 'stream',
               *flink_args(flink_job_server))

  expected = reference.compute(replay, WINDOW_S, LATENESS_S)
  assert expected.accounting['too_late'] > 0 and expected.accounting['duplicate'] > 0
  for outputs in (direct, bulk, flink):
    _assert_meets_the_contract(outputs, expected)
  assert flink == direct == bulk


def _assert_meets_the_contract(outputs: dict, expected) -> None:
  assert outputs['accounting'] == expected.accounting
  assert outputs['finals'] == expected.windows
  assert outputs['too_late'] == as_sent(expected.too_late)
  assert outputs['invalid'] == as_sent(expected.invalid)


def _panes(out: str) -> list:
  with open(os.path.join(out, 'aggregates.jsonl'), encoding='utf-8') as f:
    return sorted(tuple(sorted(json.loads(line).items())) for line in f)


@pytest.mark.integration
def test_a_bulk_replay_on_flink_batch_equals_the_direct_runner_pane_for_pane(
    tmp_path, flink_job_server):
  """The batch flow (``--replay-mode bulk``) as a Flink batch job at parallelism 2:
  every pane (early, on time, late) the DirectRunner's bulk run emits, and the
  contract's outcome."""
  replay = str(tmp_path / 'incident.jsonl')
  traffic.write_replay(replay, traffic.Profile(
      messages=3000, seed=11, window_size_s=WINDOW_S, allowed_lateness_s=LATENESS_S))
  early = ('--replay-mode', 'bulk', '--early-firing', '10')
  direct = _run(replay, str(tmp_path / 'direct'), *early)
  flink = _run(replay, str(tmp_path / 'flink'), *early, '--parallelism', '2',
               *flink_args(flink_job_server))
  expected = reference.compute(replay, WINDOW_S, LATENESS_S)
  assert expected.accounting['too_late'] > 0 and expected.accounting['duplicate'] > 0
  _assert_meets_the_contract(flink, expected)
  panes = _panes(str(tmp_path / 'flink'))
  assert {dict(p)['timing'] for p in panes} >= {'EARLY', 'ON_TIME', 'LATE'}
  assert panes == _panes(str(tmp_path / 'direct'))
  assert flink == direct


@pytest.mark.integration
def test_the_standard_flink_runner_runs_a_replay_exactly(tmp_path):
  """``--runner FlinkRunner`` as Beam documents it: Beam starts the job server
  from the jar scripts/stage-java.sh shaded into Beam's jar cache (nothing is
  downloaded), on an embedded Flink, with the worker in the launcher."""
  replay = str(tmp_path / 'small.jsonl')
  traffic.write_replay(replay, traffic.Profile(
      messages=600, seed=5, window_size_s=WINDOW_S, allowed_lateness_s=LATENESS_S))
  flink = _run(replay, str(tmp_path / 'flink'), '--replay-mode', 'stream',
               '--runner', 'FlinkRunner')
  expected = reference.compute(replay, WINDOW_S, LATENESS_S)
  assert expected.accounting['duplicate'] > 0 and expected.accounting['invalid'] > 0
  _assert_meets_the_contract(flink, expected)


def _republish_under_earlier_ids(replay: str, share: float, seed: int) -> int:
  """Rewrites the replay so that ``share`` of its valid events are published
  again a few lines later under the same ``event_id`` but in the next window
  (another value too): the contract's first copy is the one that arrived first,
  so each such copy is a duplicate while the first copy's window is open.
  Returns how many copies were added."""
  rng = random.Random(seed)
  lines = [json.loads(line) for line in open(replay, encoding='utf-8') if line.strip()]
  out, pending = [], []  # pending: (lines to wait, line)
  for line in lines:
    out.append(line)
    pending = [(n - 1, copy) for n, copy in pending]
    out.extend(copy for n, copy in pending if n <= 0)
    pending = [(n, copy) for n, copy in pending if n > 0]
    event = reference.validate(line['data']) if 'data' in line else None
    if event is not None and rng.random() < share:
      body = json.loads(line['data'])
      body.update(event_time=event[4] + WINDOW_S * 1000, value=12345.0)
      pending.append((rng.randint(1, 20), {'source': line['source'], 'data': json.dumps(body)}))
  out.extend(copy for _, copy in pending)
  with open(replay, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(line) + '\n' for line in out)
  return len(out) - len(lines)


@pytest.mark.integration
def test_on_a_parallel_flink_the_first_copy_is_the_first_to_arrive(tmp_path):
  """At parallelism 2 the replay's messages reach the gate over two workers;
  every copy of an id must still meet its first copy in arrival order."""
  replay = str(tmp_path / 'republished.jsonl')
  traffic.write_replay(replay, traffic.Profile(
      messages=2500, seed=11, window_size_s=WINDOW_S, allowed_lateness_s=LATENESS_S))
  assert _republish_under_earlier_ids(replay, 0.05, seed=11) >= 80
  flink = _run(replay, str(tmp_path / 'flink'), '--replay-mode', 'stream',
               '--runner', 'FlinkRunner', '--parallelism', '2')
  expected = reference.compute(replay, WINDOW_S, LATENESS_S)
  assert expected.accounting['duplicate'] >= 80
  wrong = {w for w in expected.windows.keys() | flink['finals'].keys()
           if flink['finals'].get(w) != expected.windows.get(w)}
  assert not wrong, f'{len(wrong)} windows differ from the reference, e.g. {sorted(wrong)[:3]}'
  assert flink['accounting'] == expected.accounting
