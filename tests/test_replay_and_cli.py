"""The replay file and the CLI: bad operator input stops the run before it
starts; a good replay's outputs equal an independent reading of the contract."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from conftest import MINUTE, T0, as_sent, data, letters, mark, payload, tick, write_replay
from tools import reference, traffic
from pipeline.readback.reconciliation import final_panes
from transforms.rules.replay import (
    Messages, ProcessingTime, ReplayError, Watermark, compile_replay)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, cwd=None, module='pipeline'):
  """``python -m pipeline ARGS`` (or ``module``: ``tools`` for the development tools)."""
  env = {**os.environ, 'PYTHONPATH': REPO}
  return subprocess.run(
      [sys.executable, '-m', module, *args], cwd=cwd or REPO, capture_output=True,
      text=True, timeout=900, env=env)


@pytest.mark.parametrize('bad_line, reason', [
    ('not json', 'not JSON'),
    ('[1]', 'JSON object'),
    ('{"source": "A"}', 'unknown line shape'),
    ('{"source": "A", "data": 5}', '"data" must be a string'),
    ('{"source": "", "data": "x"}', '"source"'),
    ('{"source": "A", "watermark": 1.5}', 'integer'),
    ('{"source": "A", "watermark": 100}', 'moves backwards'),
    ('{"advance_processing_time": -1}', 'non-negative'),
    ('{"source": "A", "data": "x", "watermark": 1}', 'unknown line shape'),
])
def test_a_bad_line_is_refused_with_its_number(tmp_path, bad_line, reason):
  path = write_replay(tmp_path / 'r.jsonl', [
      data('A', payload('e', T0)), '', mark('A', 200), bad_line])
  with pytest.raises(ReplayError) as e:
    compile_replay(path)
  assert e.value.line == 4
  assert reason in str(e.value)


def test_compile_takes_the_minimum_watermark_over_every_named_source(tmp_path):
  path = write_replay(tmp_path / 'r.jsonl', [
      data('C', payload('c', T0)),  # C is named, so it counts from the start
      mark('A', T0 + 5 * MINUTE),
      data('A', payload('a', T0)),
      mark('C', T0 + MINUTE),
      tick(3),
      data('A', payload('b', T0)),
      mark('C', T0 + 10 * MINUTE),
  ])
  replay = compile_replay(path)
  assert replay.sources == ('C', 'A') and replay.messages == 3
  assert [type(s).__name__ for s in replay.steps] == [
      'Messages', 'Watermark', 'ProcessingTime', 'Messages', 'Watermark', 'Watermark']
  assert [m.watermark for s in replay.steps if isinstance(s, Messages) for m in s.batch] == [
      None, None, T0 + MINUTE]
  assert [s.millis for s in replay.steps if isinstance(s, Watermark)] == [
      T0 + MINUTE, T0 + 5 * MINUTE, None]
  assert [s.seconds for s in replay.steps if isinstance(s, ProcessingTime)] == [3]
  assert replay.max_watermark_lag_ms == {'C': 4 * MINUTE, 'A': 5 * MINUTE}


def test_the_cli_stops_before_running_and_writes_nothing(tmp_path):
  replay = write_replay(tmp_path / 'r.jsonl', [data('A', payload('e', T0)), '{oops'])
  out = tmp_path / 'out'
  result = cli('run', '--source', f'replay:{replay}', '--window-size', '60',
               '--allowed-lateness', '30', '--output-dir', str(out))
  assert result.returncode != 0
  assert f'{replay}:2:' in result.stderr
  assert not out.exists()


@pytest.mark.parametrize('flag, value, field', [
    ('--window-size', '0', '--window-size'),
    ('--allowed-lateness', '-5', '--allowed-lateness'),
    ('--source', 'carrier-pigeon:coop', '--source'),
])
def test_a_bad_setting_is_refused_naming_the_field(tmp_path, flag, value, field):
  args = {'--source': f'replay:{tmp_path}/none.jsonl', '--window-size': '60',
          '--allowed-lateness': '30', '--output-dir': str(tmp_path / 'out')}
  write_replay(tmp_path / 'none.jsonl', [])
  args[flag] = value
  result = cli('run', *[x for kv in args.items() for x in kv])
  assert result.returncode == 2
  assert field in result.stderr


@pytest.mark.parametrize('mode', ['stream', 'bulk'])
def test_cli_outputs_equal_the_contract_on_a_generated_incident_replay(tmp_path, mode):
  window, lateness = 60, 30
  replay = str(tmp_path / 'incident.jsonl')
  traffic.write_replay(replay, traffic.Profile(
      messages=2500, seed=11, window_size_s=window, allowed_lateness_s=lateness))
  out = tmp_path / 'out'
  result = cli('run', '--source', f'replay:{replay}', '--window-size', str(window),
               '--allowed-lateness', str(lateness), '--output-dir', str(out),
               '--replay-mode', mode)
  assert result.returncode == 0, result.stderr[-3000:]

  expected = reference.compute(replay, window, lateness)
  kinds = expected.accounting
  assert all(kinds[k] > 0 for k in kinds), f'the replay lacks some trouble: {kinds}'
  with open(out / 'accounting.json') as f:
    assert json.load(f) == expected.accounting

  finals = final_panes(str(out / 'aggregates.jsonl'))
  assert {w: (p['count'], p['sum'], p['min'], p['max']) for w, p in finals.items()} == (
      expected.windows)
  assert {p['timing'] for p in finals.values()} <= {'ON_TIME', 'LATE'}

  with open(out / 'dead_letter.jsonl') as f:
    dead = [json.loads(line) for line in f]
  assert letters(dead, 'too_late') == as_sent(expected.too_late)
  assert letters(dead, 'invalid') == as_sent(expected.invalid)
  assert all(d['detail'] for d in dead)

  with sqlite3.connect(out / 'aggregates.sqlite') as db:
    rows = db.execute(
        'SELECT customer_id, key, window_start, window_end, count, sum, min, max, pane_index '
        'FROM aggregates').fetchall()
  assert {(r[0], r[1], r[2], r[3]): (r[4], r[5], r[6], r[7]) for r in rows} == expected.windows
  assert {(r[0], r[1], r[2], r[3]): r[8] for r in rows} == {
      w: p['pane_index'] for w, p in finals.items()}
  assert 'unaccounted' in result.stdout


def test_the_default_run_needs_no_arguments(tmp_path):
  result = cli('run', cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  out = tmp_path / 'tidemark-output'
  with open(out / 'accounting.json') as f:
    accounting = json.load(f)
  assert accounting['received'] == 3000
  assert accounting == reference.compute(
      os.path.join(REPO, 'pipeline', 'data', 'incident-replay.jsonl'), 60, 30).accounting
  assert (out / 'aggregates.sqlite').exists()


def test_the_replay_benchmark_prints_one_json_line_of_figures(tmp_path):
  result = cli('bench', 'replay', '--messages', '400', '--workdir', str(tmp_path),
               module='tools')
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  assert figures['bench'] == 'replay' and figures['messages'] == 400
  assert figures['outputs_equal_reference'] is True
  assert figures['events_per_s'] > 0 and figures['peak_rss_mib'] > 0
  assert figures['ratio_to_reference'] > 0
  assert figures['cores'] == 1  # 400 messages: one worker
  assert figures['decode_limit_events_per_s'] > figures['events_per_s']
  assert 0 < figures['speed_vs_decode_limit'] < 1
  # (reference_wall_s is rounded to milliseconds: a few ms for 400 messages)
  assert figures['speed_vs_reference'] == pytest.approx(
      figures['reference_wall_s'] / figures['wall_s'], rel=0.3)


def test_an_empty_replay_accounts_for_nothing(tmp_path):
  replay = write_replay(tmp_path / 'empty.jsonl', ['', '   '])
  result = cli('run', '--source', f'replay:{replay}', '--output-dir', str(tmp_path / 'out'))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'out' / 'accounting.json') as f:
    assert json.load(f) == dict(received=0, invalid=0, too_late=0, duplicate=0, aggregated=0)


def test_the_runners_late_drops_are_read_from_the_jobs_metrics():
  from apache_beam.metrics.execution import MetricKey, MetricResult
  from apache_beam.metrics.metricbase import MetricName

  from pipeline.launch.summary import RUNNER_LATE_DROPS, runner_late_drops

  class Finished:
    def __init__(self, counters):
      self._counters = counters

    def metrics(self):
      return self

    def query(self, _filter=None):
      return {'counters': self._counters, 'distributions': [], 'gauges': []}

  def counter(step, namespace, name, value):
    return MetricResult(MetricKey(step, MetricName(namespace, name)), value, value)

  received = counter('Parse', 'tidemark', 'received', 10)
  assert runner_late_drops(Finished([])) is None  # nothing reported: not known
  assert runner_late_drops(Finished([received])) == 0  # reported, nothing dropped
  assert runner_late_drops(Finished([
      received, counter('Aggregate/GroupByKey', *RUNNER_LATE_DROPS, 2),
      counter('Rollup/GroupByKey', *RUNNER_LATE_DROPS, 1)])) == 3


def test_the_product_cli_lists_only_product_commands_and_points_to_the_tools(tmp_path):
  shown = cli('--help')
  assert shown.returncode == 0
  commands = [line.split()[0] for line in shown.stdout.splitlines()
              if line.startswith('  ') and not line.startswith('   ')]
  assert commands == ['run', 'restate', 'deploy', 'report']
  for tool in ('generate', 'simulate', 'bench'):
    refused = cli(tool, '--help', cwd=str(tmp_path))  # from any folder
    assert refused.returncode == 2 and 'Traceback' not in refused.stderr
    assert f'python -m tools {tool}' in refused.stderr
  tools = cli('--help', module='tools')
  assert tools.returncode == 0
  assert [line.split()[0] for line in tools.stdout.splitlines()
          if line.startswith('  ') and not line.startswith('   ')] == [
              'generate', 'simulate', 'bench']
  written = cli('generate', '--out', str(tmp_path / 'r.jsonl'), '--messages', '50',
                module='tools')
  assert written.returncode == 0, written.stderr[-2000:]
  assert (tmp_path / 'r.jsonl').stat().st_size > 0
