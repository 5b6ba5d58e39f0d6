"""Rollups: larger windows from the same run, reconciled against the primary
windows inside them event by event.

A hand-made replay has events too late for the 1-minute windows but on time
for the hour (and for the 10 minutes), one on time for the minute but too
late for the 10 minutes (lateness 0), redeliveries that are too late for one
size and duplicates for the other (they must cancel, not count as
differences), and events too late for every size. The run is the real CLI on
the streaming DirectRunner; every output is checked against the independent
oracle (tools/reference.py) and the hour's finals against the minutes'.
"""

import json
import math
import os
import subprocess
import sys

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from conftest import (
    MINUTE, SECOND, T0, as_sent, data, letters, mark, payload, read_jsonl, write_replay)
from tools import reference, traffic
from pipeline.settings.checks import parse_rollups
from pipeline.settings.config import BUNDLED_REPLAY, ConfigError, RunConfig
from pipeline.readback.reconciliation import final_panes, reconcile_rollups
from pipeline.readback.reconciliation import Reconciliation, reconcile_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOUR = 60 * MINUTE
W, L = 60, 10  # the primary: 1-minute windows, 10 s allowed lateness
ROLLUPS = ((600, 0), (3600, 900))  # 10 minutes with no lateness; the hour with 15 min


def cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'pipeline', *args], cwd=REPO, capture_output=True, text=True,
      timeout=900, env={**os.environ, 'PYTHONPATH': REPO})


def at(minutes: float, hours: int = 0) -> int:
  """02:00 + hours + minutes, epoch ms."""
  return T0 + hours * HOUR + int(minutes * MINUTE)


def ev(event_id, t, value, key='AAPL'):
  return data('A', payload(event_id, t, value=value, key=key))


def hand_made_replay(path) -> str:
  on_time = [ev(f'e{i}', at(i / 2), i + 1) for i in range(24)]  # 02:00:00 .. 02:11:30
  return write_replay(path, [
      mark('A', T0),
      *on_time,
      *[ev(f'm{i}', at(i * 50 / 60), 10 * (i + 1), key='MSFT') for i in range(10)],
      mark('A', at(5) + 5 * SECOND),  # 02:05:05
      ev('late-ok', at(4 + 40 / 60), 7),  # minute closes 02:05:10: a LATE pane everywhere
      mark('A', at(5.5)),  # 02:05:30
      ev('late-minute', at(4 + 50 / 60), -100),  # too late for the minute only
      on_time[3],  # e3 again: too late for the minute, a duplicate for 10 min and hour
      mark('A', at(10) + 5 * SECOND),  # 02:10:05: [02:00, 02:10) closed at 02:10 (lateness 0)
      ev('only-minute', at(9.5), 1000),  # minute [02:09, 02:10) open until 02:10:10
      ev('late-both', at(8), 5),  # too late for the minute and the 10 minutes
      on_time[19],  # e19 (02:09:30) again: duplicate for minute and hour, too late for 10 min
      mark('A', at(20, hours=1)),  # 03:20: the 02:00 hour closed at 03:15
      ev('too-late-all', at(30), 9),
      *[ev(f'h{i}', at(20 + i / 6, hours=1), 2) for i in range(10)],  # 03:20:00 .. 03:21:30
      mark('A', at(30, hours=1) + 5 * SECOND),  # 03:30:05
      ev('hour-only', at(21, hours=1), 50),  # too late for minute and 10 min, not the hour
      data('A', 'not json'),
  ])


#: per rollup size: {(customer, key, rollup window start): (only in the rollup,
#: only in the primary)}, by event id, each with the other side's reason
EXPECTED = {
    600: {
        ('finserve', 'AAPL', T0): (['late-minute'], ['only-minute']),
    },
    3600: {
        ('finserve', 'AAPL', T0): (['late-both', 'late-minute'], []),
        ('finserve', 'AAPL', T0 + HOUR): (['hour-only'], []),
    },
}


def figures(finals):
  return {w: (p['count'], p['sum'], p['min'], p['max']) for w, p in finals.items()}


def dead(path, reason):
  return letters(read_jsonl(path), reason)


@pytest.fixture(scope='module')
def hand_made_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('rollups')
  replay = hand_made_replay(tmp / 'replay.jsonl')
  out = tmp / 'out'
  result = cli('run', '--source', f'replay:{replay}', '--window-size', str(W),
               '--allowed-lateness', str(L), '--early-firing', '0', '--output-dir', str(out),
               *[x for size, lateness in ROLLUPS for x in ('--rollup', f'{size}:{lateness}')])
  return replay, out, result


def test_the_primary_outputs_are_those_of_a_run_without_rollups(hand_made_run):
  replay, out, result = hand_made_run
  assert result.returncode == 0, result.stderr[-3000:]
  expected = reference.compute(replay, W, L)
  with open(out / 'accounting.json') as f:
    assert json.load(f) == expected.accounting
  assert expected.accounting == dict(
      received=53, invalid=1, too_late=5, duplicate=1, aggregated=46)
  assert figures(final_panes(str(out / 'aggregates.jsonl'))) == expected.windows
  assert dead(out / 'dead_letter.jsonl', 'too_late') == as_sent(expected.too_late)
  assert dead(out / 'dead_letter.jsonl', 'invalid') == as_sent(expected.invalid)
  assert {d['reason'] for d in read_jsonl(out / 'dead_letter.jsonl')} == {'invalid', 'too_late'}
  # Besides the contract's files: SQLite, the evidence, each rollup's folder, the report.
  assert sorted(os.listdir(out)) == [
      'accounting.json', 'aggregates.jsonl', 'aggregates.sqlite', 'dead_letter.jsonl',
      'duplicates.jsonl', 'metrics.prom', 'reconciliation.json', 'report.html', 'rollup-3600s',
      'rollup-600s', 'run.json']
  assert [json.loads(d['data'])['event_id'] for d in read_jsonl(out / 'duplicates.jsonl')] == [
      'e19']


@pytest.mark.parametrize('size, lateness', ROLLUPS)
def test_each_rollup_is_a_run_of_its_own_size(hand_made_run, size, lateness):
  replay, out, result = hand_made_run
  assert result.returncode == 0, result.stderr[-3000:]
  rollup = out / f'rollup-{size}s'
  expected = reference.compute(replay, size, lateness)
  with open(rollup / 'accounting.json') as f:
    assert json.load(f) == expected.accounting  # invalid counted, so it adds up
  assert figures(final_panes(str(rollup / 'aggregates.jsonl'))) == expected.windows
  assert all(p['window_end'] - p['window_start'] == size * 1000
             for p in read_jsonl(rollup / 'aggregates.jsonl'))
  # Its own too-late events only; invalid payloads stay in the primary's file.
  assert dead(rollup / 'dead_letter.jsonl', 'too_late') == as_sent(expected.too_late)
  assert {d['reason'] for d in read_jsonl(rollup / 'dead_letter.jsonl')} <= {'too_late'}
  assert f'rollup {size} s (lateness {lateness} s)' in result.stdout


@pytest.mark.parametrize('size, lateness', ROLLUPS)
def test_the_minutes_plus_the_explained_events_are_the_rollup_exactly(
    hand_made_run, size, lateness):
  """Computed here from the output files and the oracle's accepted events, not
  from reconciliation.json."""
  replay, out, _ = hand_made_run
  minutes = final_panes(str(out / 'aggregates.jsonl'))
  rollup = final_panes(str(out / f'rollup-{size}s' / 'aggregates.jsonl'))
  only = reference.rollup_differences(replay, W, L, size, lateness)
  assert {w: d for w, d in only.items()} == EXPECTED[size]
  values = {e[0]: e[4] for e in reference.compute(replay, size, lateness).accepted +
            reference.compute(replay, W, L).accepted}
  windows = {(c, k, s - s % (size * 1000)) for c, k, s, _ in minutes} | {
      (c, k, s) for c, k, s, _ in rollup}
  for customer, key, start in windows:
    inside = [p for (c, k, s, _), p in minutes.items()
              if (c, k) == (customer, key) and start <= s < start + size * 1000]
    added, removed = only.get((customer, key, start), ([], []))
    count = sum(p['count'] for p in inside) + len(added) - len(removed)
    total = sum(p['sum'] for p in inside) + sum(values[e] for e in added) - sum(
        values[e] for e in removed)
    final = rollup[customer, key, start, start + size * 1000]
    assert (final['count'], final['sum']) == (count, total), (customer, key, start)
  # The differences are real: without them the minutes do not add up.
  assert any(added or removed for added, removed in only.values())


def test_reconciliation_lists_each_differing_event_with_its_reason(hand_made_run):
  replay, out, result = hand_made_run
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / 'reconciliation.json') as f:
    report = json.load(f)
  assert report['reconciled'] is True
  assert report['primary'] == {'window_size_s': W, 'allowed_lateness_s': L}
  assert [(r['window_size_s'], r['allowed_lateness_s'], r['output_dir'])
          for r in report['rollups']] == [(600, 0, 'rollup-600s'), (3600, 900, 'rollup-3600s')]
  for rollup in report['rollups']:
    size = rollup['window_size_s']
    listed = {
        (d['customer_id'], d['key'], d['window_start']): (
            [e['event_id'] for e in d['only_in_rollup']],
            [e['event_id'] for e in d['only_in_primary']])
        for d in rollup['differences']}
    assert listed == EXPECTED[size]
    assert listed == reference.rollup_differences(replay, W, L, size, rollup['allowed_lateness_s'])
    assert rollup['windows_unexplained'] == 0 and rollup['problems'] == []
    assert rollup['events_only_in_rollup'] == sum(len(a) for a, _ in EXPECTED[size].values())
    assert rollup['events_only_in_primary'] == sum(len(b) for _, b in EXPECTED[size].values())
    # AAPL 02:00-02:10, 02:10-02:20, 03:20-03:30 and MSFT 02:00-02:10; the hours 02 and 03
    assert rollup['windows'] == {600: 4, 3600: 3}[size]
    for window in rollup['differences']:
      assert window['reconciled'] is True and 'problems' not in window
      assert window['explained']['count'] == window['rollup']['count']
      assert window['explained']['sum'] == window['rollup']['sum']
      for e in window['only_in_rollup']:
        assert (e['primary'], e['rollup']) == ('too_late', 'aggregated')
        assert 'allowed lateness 10 s' in e['detail']
      for e in window['only_in_primary']:
        assert (e['primary'], e['rollup']) == ('aggregated', 'too_late')
        assert 'allowed lateness 0 s' in e['detail']
  hour = {(d['window_start']): d for d in report['rollups'][1]['differences']}[T0]
  assert hour['primary'] == {'windows': 12, 'count': 26, 'sum': 1307.0, 'min': 1.0, 'max': 1000.0}
  assert hour['rollup'] == {'count': 28, 'sum': 1212.0, 'min': -100.0, 'max': 1000.0}
  assert [(e['event_id'], e['value']) for e in hour['only_in_rollup']] == [
      ('late-both', 5.0), ('late-minute', -100.0)]
  # The 10 minutes lost the minute's largest value (only-minute, 1000): its
  # max is only bounded by the figures, and it lies within the bounds.
  tens = report['rollups'][0]['differences'][0]
  assert tens['explained']['max'] == 1000.0 and tens['explained']['max_at_least'] == 18.0
  assert tens['rollup']['max'] == 20.0
  assert 'reconciliation:' in result.stdout


def test_an_event_missing_from_the_evidence_is_unexplained(hand_made_run, tmp_path):
  """Tampered outputs: the primary's dead letter loses one too-late event, so
  the hour holds an event nothing explains; the run's check fails (exit 3)."""
  import shutil
  _, out, _ = hand_made_run
  copy = tmp_path / 'out'
  shutil.copytree(out, copy)
  lines = (copy / 'dead_letter.jsonl').read_text().splitlines(keepends=True)
  kept = [line for line in lines if '"late-both' not in line.replace('\\"', '"')]
  assert len(kept) == len(lines) - 1
  (copy / 'dead_letter.jsonl').write_text(''.join(kept))
  config = RunConfig.from_options(PipelineOptions([
      f'--source=replay:{BUNDLED_REPLAY}', f'--window-size={W}', f'--allowed-lateness={L}',
      f'--output-dir={copy}', '--rollup=600:0,3600:900']))
  with pytest.raises(Reconciliation) as e:
    reconcile_run(config)
  assert 'rollup 3600 s: 1 windows' in str(e.value)
  with open(copy / 'reconciliation.json') as f:
    report = json.load(f)
  assert report['reconciled'] is False
  for rollup in report['rollups']:
    window = {d['window_start']: d for d in rollup['differences']}[T0]
    assert window['reconciled'] is False
    assert any(p.startswith('count: rollup') for p in window['problems'])


def test_a_generated_incident_replay_reconciles_like_the_oracle(tmp_path):
  replay = str(tmp_path / 'incident.jsonl')
  traffic.write_replay(replay, traffic.Profile(
      messages=200, seed=11, rate_per_s=0.5, tick_s=60, window_size_s=W,
      allowed_lateness_s=L))
  out = tmp_path / 'out'
  result = cli('run', '--source', f'replay:{replay}', '--window-size', str(W),
               '--allowed-lateness', str(L), '--output-dir', str(out), '--rollup', '600:120')
  assert result.returncode == 0, result.stderr[-3000:]
  primary, rollup = reference.compute(replay, W, L), reference.compute(replay, 600, 120)
  with open(out / 'accounting.json') as f:
    assert json.load(f) == primary.accounting
  with open(out / 'rollup-600s' / 'accounting.json') as f:
    assert json.load(f) == rollup.accounting
  assert figures(final_panes(str(out / 'aggregates.jsonl'))) == primary.windows
  finals = final_panes(str(out / 'rollup-600s' / 'aggregates.jsonl'))
  assert figures(finals) == rollup.windows
  with open(out / 'reconciliation.json') as f:
    report = json.load(f)
  assert report['reconciled'] is True
  (section,) = report['rollups']
  expected = reference.rollup_differences(replay, W, L, 600, 120)
  assert sum(len(a) for a, _ in expected.values()) >= 3  # the replay has some
  assert {(d['customer_id'], d['key'], d['window_start']): (
      [e['event_id'] for e in d['only_in_rollup']],
      [e['event_id'] for e in d['only_in_primary']]) for d in section['differences']} == expected
  for d in section['differences']:  # real-valued sums: exact to the rounding of the figures
    assert math.isclose(d['explained']['sum'], d['rollup']['sum'], rel_tol=1e-12)


# ---------------------------------------------------------------------------
# Settings: bad rollups are refused naming the field, before anything runs.

@pytest.mark.parametrize('values, reason', [
    (['90:10'], 'must be a multiple of the window size (60 s)'),
    (['60:10'], 'must be a multiple of the window size (60 s) larger than it'),
    (['30:0'], 'larger than it'),
    (['0:0'], 'positive'),
    (['3600:-1'], 'zero or a positive number'),
    (['3600:900', '3600:60'], 'given twice'),
    (['600:0,600:0'], 'given twice'),
    (['3600'], 'is not SIZE:LATENESS'),
    (['1h:15m'], 'is not SIZE:LATENESS'),
    (['3600:900,'], 'is not SIZE:LATENESS'),
])
def test_a_bad_rollup_names_the_field(values, reason):
  with pytest.raises(ConfigError) as e:
    parse_rollups(values, 60)
  assert e.value.field == '--rollup'
  assert reason in str(e.value)


def test_rollups_are_read_from_repeated_flags_and_comma_lists():
  config = RunConfig.from_options(PipelineOptions([
      f'--source=replay:{BUNDLED_REPLAY}', '--window-size=60', '--rollup=86400:3600',
      '--rollup', '600:0,3600:900']))
  assert config.rollups == ((600, 0), (3600, 900), (86400, 3600))
  hour = config.rollup(3600, 900)
  assert hour.output_dir == os.path.join(config.output_dir, 'rollup-3600s')
  assert (hour.window_size_s, hour.allowed_lateness_s, hour.rollups) == (3600, 900, ())
  assert hour.sqlite_path == os.path.join(hour.output_dir, 'aggregates.sqlite')
  assert RunConfig.from_options(PipelineOptions([
      f'--source=replay:{BUNDLED_REPLAY}'])).rollups == ()


def test_the_cli_refuses_a_bad_rollup_before_running(tmp_path):
  replay = write_replay(tmp_path / 'r.jsonl', [data('A', payload('e', T0))])
  out = tmp_path / 'out'
  result = cli('run', '--source', f'replay:{replay}', '--window-size', '60',
               '--rollup', '3600:900', '--rollup', '90:0', '--output-dir', str(out))
  assert result.returncode == 2
  assert '--rollup: 90:0: size 90 s must be a multiple of the window size (60 s)' in result.stderr
  assert not out.exists()


def test_reconciliation_of_a_run_without_events_is_empty_and_reconciled(tmp_path):
  out = tmp_path / 'out'
  config = RunConfig.from_options(PipelineOptions([
      f'--source=replay:{BUNDLED_REPLAY}', f'--output-dir={out}', '--rollup=3600:0']))
  report = reconcile_rollups(config)
  assert report['reconciled'] is True
  assert report['rollups'][0]['windows'] == 0 and report['rollups'][0]['differences'] == []


def test_rollups_reconcile_when_sums_are_beyond_the_range_of_a_double(tmp_path):
  replay = write_replay(tmp_path / 'huge.jsonl', [
      ev('a', at(0.1), 1e308), ev('b', at(0.2), 1e308),  # this minute's sum is clamped
      ev('c', at(1.1), -1e308), ev('d', at(2.1), 5.0),
  ])
  out = tmp_path / 'out'
  run = cli('run', f'--source=replay:{replay}', f'--window-size={W}', f'--allowed-lateness={L}',
            f'--output-dir={out}', '--rollup=600:0', '--sqlite=none')
  assert run.returncode == 0, run.stderr[-2000:]
  finals = final_panes(str(out / 'rollup-600s' / 'aggregates.jsonl'))
  assert [(p['count'], p['sum']) for p in finals.values()] == [(4, 1e308 + 5.0)]
  minute = final_panes(str(out / 'aggregates.jsonl'))
  assert sorted(p['sum'] for p in minute.values()) == [-1e308, 5.0, sys.float_info.max]
