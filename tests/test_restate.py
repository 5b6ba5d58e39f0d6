"""python -m pipeline restate over a replay: the sinks end holding the no-lateness
truth of every window of the range (the reference's reading with a lateness no
event reaches), the audit names exactly the ids it recovers or moves, and a
second restatement writes nothing. Bad ranges and sources are refused before
anything is written."""

from __future__ import annotations

import glob
import json
import os
import sqlite3

import pytest

from conftest import data, mark, payload, write_replay
from pipeline.launch import restate as restate_command
from pipeline.launch import run as run_command
from tools import reference
from transforms.rules.model import final_panes_of

W, L = 10, 5
T0 = 1_700_000_000_000 - 1_700_000_000_000 % (W * 1000)  # a window start
#: The reference's lateness that no event reaches: every valid event counts, each id once.
NO_LATENESS = 10 * 365 * 24 * 3600


def _iso(millis: int) -> str:
  import datetime
  return datetime.datetime.fromtimestamp(millis / 1000, datetime.timezone.utc).strftime(
      '%Y-%m-%dT%H:%M:%SZ')


def _replay(path: str, more=()) -> str:
  lines = list(more)
  for i in range(30):  # three windows, in time
    lines.append(data('A', payload(f'e{i}', T0 + i * 1000, value=float(i), key=f'k{i % 2}')))
  lines.append(data('A', payload('e3', T0 + 3000, value=3.0, key='k1')))  # a redelivery
  lines.append(data('A', 'not json'))
  lines.append(mark('A', T0 + 3 * W * 1000 + L * 1000 + 1))  # windows 0..2 closed
  # too late live: new ids (recovered), and a redelivery of an aggregated id (a duplicate)
  lines.append(data('A', payload('late-1', T0 + 1500, value=100.0, key='k1')))
  lines.append(data('A', payload('late-2', T0 + W * 1000 + 10, value=200.0, key='k0')))
  lines.append(data('A', payload('e5', T0 + 5000, value=5.0, key='k1')))
  # too late live in window 0, then a copy in time in window 4: live counts it in
  # window 4, the restatement in window 0 (its first copy)
  lines.append(data('A', payload('moved', T0 + 2000, value=7.0, key='k0')))
  lines.append(data('A', payload('moved', T0 + 4 * W * 1000 + 1, value=7.0, key='k0')))
  lines.append(data('A', payload('e40', T0 + 4 * W * 1000 + 2, value=1.0, key='k0')))
  return write_replay(path, lines)


def _run(tmp_path, *extra, more=()) -> str:
  replay = _replay(str(tmp_path / 'replay.jsonl'), more)
  out = str(tmp_path / 'out')
  assert run_command.main([f'--source=replay:{replay}', f'--window-size={W}',
                           f'--allowed-lateness={L}', f'--output-dir={out}', *extra]) == 0
  return out


def _snapshot(folder: str) -> dict:
  files = {}
  for path in sorted(glob.glob(os.path.join(folder, '**'), recursive=True)):
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        files[os.path.relpath(path, folder)] = f.read()
  return files


def _finals(folder: str) -> dict:
  with open(os.path.join(folder, 'aggregates.jsonl'), encoding='utf-8') as f:
    finals = final_panes_of(json.loads(line) for line in f)
  return {w: (p['count'], p['sum'], p['min'], p['max']) for w, p in finals.items()}


def _sqlite(folder: str) -> dict:
  with sqlite3.connect(os.path.join(folder, 'aggregates.sqlite')) as db:
    rows = db.execute('SELECT customer_id, key, window_start, window_end, count, sum, min, max '
                      'FROM aggregates').fetchall()
  return {r[:4]: r[4:] for r in rows}


def _audit(folder: str) -> dict:
  (path,) = glob.glob(os.path.join(folder, 'restated', '*.json'))
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def test_a_restated_replay_holds_the_no_lateness_truth_in_every_sink(tmp_path, capsys):
  out = _run(tmp_path)
  replay = str(tmp_path / 'replay.jsonl')
  live = reference.compute(replay, W, L)
  truth = reference.compute(replay, W, NO_LATENESS).windows
  assert _finals(out) == live.windows != truth
  span = ('--from', _iso(T0), '--to', _iso(T0 + 5 * W * 1000))

  assert restate_command.main([out, *span]) == 0
  assert _finals(out) == truth
  assert _sqlite(out) == truth
  panes = [json.loads(line) for line in open(os.path.join(out, 'aggregates.jsonl'))]
  restated = [p for p in panes if p['timing'] == 'RESTATED']
  for pane in restated:  # each supersedes the live panes of its window
    live_panes = [p['pane_index'] for p in panes if p['timing'] != 'RESTATED' and (
        p['customer_id'], p['key'], p['window_start']) == (
            pane['customer_id'], pane['key'], pane['window_start'])]
    assert pane['pane_index'] == max(live_panes, default=-1) + 1

  audit = _audit(out)
  added = {(w['window_start'], a['event_id'], a['reason'])
           for w in audit['windows'] for a in w['added']}
  removed = {(w['window_start'], r['event_id'], r['reason'])
             for w in audit['windows'] for r in w['removed']}
  assert added == {(T0, 'late-1', 'too_late_live'), (T0 + W * 1000, 'late-2', 'too_late_live'),
                   (T0, 'moved', 'too_late_live')}
  assert removed == {(T0 + 4 * W * 1000, 'moved', 'later_copy_counted_live')}
  assert all(w['explained'] for w in audit['windows'])
  assert audit['too_late_live'] == audit['too_late_read'] == 4
  assert audit['too_late_recovered'] == 3  # e5's late copy is a duplicate of its first
  counts = audit['accounting']
  assert counts['read'] == counts['invalid'] + counts['duplicate'] + counts['aggregated'] + \
      counts['outside_range'] == 38
  assert counts['invalid'] == 1 and counts['duplicate'] == 3
  accounting = json.load(open(os.path.join(out, 'accounting.json')))
  assert accounting['aggregated'] == sum(v[0] for v in truth.values())
  assert accounting['received'] == sum(accounting[k] for k in (
      'invalid', 'too_late', 'duplicate', 'aggregated')) == live.accounting['received']
  assert accounting['too_late'] == 0
  assert 'restated' in capsys.readouterr().out
  page = open(os.path.join(out, 'report.html'), encoding='utf-8').read()
  assert 'Restated windows' in page and 'after its restatements' in page
  metrics = open(os.path.join(out, 'metrics.prom'), encoding='utf-8').read()
  written = sum(1 for w in audit['windows'] if w['written'])
  assert written == audit['windows_changed'] == len(restated)
  assert f'tidemark_restated_windows_total {float(written)}' in metrics
  assert 'tidemark_restated_events_total{reason="too_late_live"} 3.0' in metrics

  before = _snapshot(out)  # a second restatement writes nothing
  assert restate_command.main([out, *span]) == 0
  assert _snapshot(out) == before
  assert 'nothing to restate' in capsys.readouterr().out


def test_a_narrower_range_leaves_the_windows_outside_it(tmp_path):
  out = _run(tmp_path)
  replay = str(tmp_path / 'replay.jsonl')
  live = reference.compute(replay, W, L).windows
  truth = reference.compute(replay, W, NO_LATENESS).windows
  assert restate_command.main([out, '--from', _iso(T0 + W * 1000),
                               '--to', _iso(T0 + 2 * W * 1000)]) == 0
  inside = {w for w in truth if w[2] == T0 + W * 1000}
  assert {w: v for w, v in _finals(out).items() if w in inside} == {w: truth[w] for w in inside}
  assert {w: v for w, v in _finals(out).items() if w not in inside} == {
      w: v for w, v in live.items() if w not in inside}


@pytest.mark.parametrize('args, field', [
    (['--from', '2023-11-14T22:13:25Z', '--to', '2023-11-14T22:14:00Z'], 'not a window boundary'),
    (['--from', '2023-11-14T22:14:00Z', '--to', '2023-11-14T22:13:00Z'], 'at or before'),
    (['--from', 'yesterday', '--to', '2023-11-14T22:14:00Z'], '--from'),
    (['--from', '2023-11-14T22:13:00Z', '--to', '2023-11-14T22:14:00Z',
      '--source', 'replay:/nonexistent.jsonl'], '--source'),
    (['--from', '2023-11-14T22:13:00Z', '--to', '2023-11-14T22:14:00Z',
      '--source', 'kafka:127.0.0.1:9/topic'], 'Kafka at 127.0.0.1:9'),
    (['--from', '2023-11-14T22:13:00Z', '--to', '2023-11-14T22:14:00Z',
      '--margin', '-1'], '--margin'),
    (['--from', '2023-11-14T22:13:00Z', '--to', '2023-11-14T22:14:00Z',
      '--window-size', '30'], "takes the run's own"),
    (['--from', '2023-11-14T22:13:00Z', '--to', '2023-11-14T22:14:00Z',
      '--margn', '30'], 'neither a Tidemark option nor a Beam pipeline option'),
])
def test_bad_ranges_and_sources_are_refused_before_anything_is_written(
    tmp_path, capsys, args, field):
  out = _run(tmp_path)
  before = _snapshot(out)
  assert restate_command.main([out, *args]) == 2
  err = capsys.readouterr().err
  assert field in err and 'Traceback' not in err
  assert _snapshot(out) == before


def test_an_unfinished_run_or_other_folder_is_refused(tmp_path, capsys):
  empty = tmp_path / 'empty'
  empty.mkdir()
  span = ['--from', _iso(T0), '--to', _iso(T0 + W * 1000)]
  assert restate_command.main([str(empty), *span]) == 2
  assert 'not a Tidemark output folder' in capsys.readouterr().err
  out = _run(tmp_path)
  manifest_path = os.path.join(out, 'run.json')
  manifest = json.load(open(manifest_path))
  manifest['status'] = 'incomplete'
  json.dump(manifest, open(manifest_path, 'w'))
  before = _snapshot(out)
  assert restate_command.main([out, *span]) == 2
  assert 'did not finish' in capsys.readouterr().err
  assert _snapshot(out) == before


def test_a_restated_postgres_table_holds_the_truth_of_its_customer_only(
    tmp_path, postgres_dsn, pg_table):
  import psycopg
  other = data('A', payload('acme-1', T0 + 100, value=9.0, customer_id='acme.io', key='k0'))
  out = _run(tmp_path, '--sink=postgres', f'--postgres-dsn={postgres_dsn}',
             f'--postgres-table={pg_table}', f'--postgres-dead-letter-table={pg_table}_dl',
             '--customer-id=finserve', more=[other])
  every = reference.compute(str(tmp_path / 'replay.jsonl'), W, NO_LATENESS).windows
  truth = {w: v for w, v in every.items() if w[0] == 'finserve'}
  assert truth != every  # the files hold acme.io's window too; PostgreSQL does not
  span = ['--from', _iso(T0), '--to', _iso(T0 + 5 * W * 1000)]
  assert restate_command.main([out, *span]) == 2  # the DSN is not in run.json
  assert restate_command.main([out, *span, f'--postgres-dsn={postgres_dsn}']) == 0

  def stored():
    with psycopg.connect(postgres_dsn) as db:
      rows = db.execute(f'SELECT customer_id, key, window_start, window_end, count, sum, min, '
                        f'max, pane_index, timing FROM {pg_table}').fetchall()
    return {r[:4]: r[4:] for r in rows}

  first = stored()
  assert {w: v[:4] for w, v in first.items()} == truth
  assert _finals(out) == every
  assert {v[5] for w, v in first.items()} >= {'RESTATED'}
  assert restate_command.main([out, *span, f'--postgres-dsn={postgres_dsn}']) == 0
  assert stored() == first
  with psycopg.connect(postgres_dsn, autocommit=True) as db:
    db.execute(f'DROP TABLE IF EXISTS {pg_table}_dl')


def test_a_restatement_that_fails_while_writing_is_finished_by_running_it_again(
    tmp_path, capsys, monkeypatch):
  from pipeline.readback import stored
  out = _run(tmp_path)
  truth = reference.compute(str(tmp_path / 'replay.jsonl'), W, NO_LATENESS).windows
  span = ['--from', _iso(T0), '--to', _iso(T0 + 5 * W * 1000)]

  def broken(self, rows):
    raise OSError('disk full')
  with monkeypatch.context() as patched:
    patched.setattr(stored.SqliteSink, 'add', broken)
    assert restate_command.main([out, *span]) == 1
  err = capsys.readouterr().err
  assert 'disk full' in err and 'run the same restatement again' in err and 'Traceback' not in err
  assert _finals(out) == truth  # the files were written first
  assert _sqlite(out) != truth and not os.path.exists(os.path.join(out, 'restated'))

  assert restate_command.main([out, *span]) == 0
  assert _finals(out) == truth and _sqlite(out) == truth
  audit = _audit(out)
  assert audit['rows_written'] == {'files': 0, 'sqlite': audit['windows_changed']}
  accounting = json.load(open(os.path.join(out, 'accounting.json')))
  assert accounting['aggregated'] == sum(v[0] for v in truth.values())

