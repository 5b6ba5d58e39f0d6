"""Whole runs with ``--sink postgres`` against a real PostgreSQL: the final
rows equal the SQLite sink's, dead letters land in their table, and a
customer-scoped run writes its own customer's rows only."""

import json
import os
import sqlite3
import subprocess
import sys
import uuid

import psycopg
import pytest
from psycopg import sql

from conftest import REPO
from tools import traffic
from transforms.rules.model import dead_letter_payload

pytestmark = pytest.mark.integration

COLUMNS = ('customer_id, key, window_start, window_size_ms, window_end, count, sum, min, '
           'max, pane_index, timing')


def cli(*args):
  env = {**os.environ, 'PYTHONPATH': REPO}
  return subprocess.run([sys.executable, '-m', 'pipeline', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope='module')
def replay(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('replay') / 'incident.jsonl')
  # ticks of processing time in the replay make early panes, so windows have
  # several panes, and stragglers make late ones
  traffic.write_replay(path, traffic.Profile(messages=1500, seed=5))
  return path


@pytest.fixture
def tables(postgres_dsn):
  suffix = uuid.uuid4().hex[:8]
  names = (f'agg_{suffix}', f'dead_{suffix}')
  yield names
  with psycopg.connect(postgres_dsn, autocommit=True) as conn:
    for name in names:
      conn.execute(sql.SQL('DROP TABLE IF EXISTS {}').format(sql.Identifier(name)))


def pg_rows(dsn, table, columns=COLUMNS):
  with psycopg.connect(dsn) as conn:
    return sorted(conn.execute(sql.SQL('SELECT {} FROM {}').format(
        sql.SQL(columns), sql.Identifier(table))).fetchall())


def sqlite_rows(path):
  with sqlite3.connect(path) as db:
    return sorted(db.execute(f'SELECT {COLUMNS} FROM aggregates').fetchall())


def run(replay, out, dsn, tables, *extra):
  result = cli('run', '--source', f'replay:{replay}', '--window-size', '60',
               '--allowed-lateness', '30', '--early-firing', '5', '--output-dir', str(out),
               '--sink', 'postgres', '--postgres-dsn', dsn, '--postgres-table', tables[0],
               '--postgres-dead-letter-table', tables[1], *extra)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_a_replay_run_leaves_the_same_final_rows_in_postgres_as_in_sqlite(
    replay, tmp_path, postgres_dsn, tables):
  out = tmp_path / 'out'
  run(replay, out, postgres_dsn, tables)
  expected = sqlite_rows(out / 'aggregates.sqlite')
  assert len(expected) > 20
  with open(out / 'aggregates.jsonl') as f:
    panes = [json.loads(line) for line in f]
  assert len(panes) > len(expected), 'the run should emit several panes per window'
  assert pg_rows(postgres_dsn, tables[0]) == expected
  assert {r[0] for r in expected} == {'finserve', 'dataflow-inc', 'acme.io'}

  with open(out / 'dead_letter.jsonl') as f:
    dead = sorted((d['reason'], d['source'], dead_letter_payload(d), d['detail'])
                  for d in map(json.loads, f))
  stored = sorted((r[0], r[1], bytes(r[2]), r[3])
                  for r in pg_rows(postgres_dsn, tables[1], 'reason, source, data, detail'))
  assert stored == dead and {d[0] for d in dead} == {'invalid', 'too_late'}
  assert not os.path.exists(out / 'refused.jsonl')


def test_a_customer_scoped_run_writes_only_its_customers_rows(
    replay, tmp_path, postgres_dsn, tables):
  out = tmp_path / 'out'
  run(replay, out, postgres_dsn, tables, '--customer-id', 'dataflow-inc')
  everything = sqlite_rows(out / 'aggregates.sqlite')
  mine = [r for r in everything if r[0] == 'dataflow-inc']
  assert mine and len(mine) < len(everything)
  assert pg_rows(postgres_dsn, tables[0]) == mine
  with open(out / 'refused.jsonl') as f:
    refused = [json.loads(line) for line in f]
  with open(out / 'aggregates.jsonl') as f:
    foreign = [p for p in map(json.loads, f) if p['customer_id'] != 'dataflow-inc']

  def key(p):
    return p['customer_id'], p['key'], p['window_start'], p['pane_index']

  assert sorted(map(key, (r for r in refused if 'reason' not in r))) == sorted(map(key, foreign))
  # Other customers' too-late dead letters are refused too, never stored.
  with open(out / 'dead_letter.jsonl') as f:
    too_late = [d for d in map(json.loads, f) if d['reason'] == 'too_late']
  foreign_late = sorted(d['data'] for d in too_late
                        if json.loads(d['data'])['customer_id'] != 'dataflow-inc')
  assert foreign_late and sorted(r['data'] for r in refused if 'reason' in r) == foreign_late


def test_rollups_share_the_tables_keyed_by_window_size(tmp_path, postgres_dsn, tables):
  replay = str(tmp_path / 'slow.jsonl')  # 10 minutes of event time, so rollups have windows
  traffic.write_replay(replay, traffic.Profile(messages=200, seed=11, rate_per_s=0.5, tick_s=60))
  out = tmp_path / 'out'
  run(replay, out, postgres_dsn, tables, '--rollup', '300:0')
  minutes = sqlite_rows(out / 'aggregates.sqlite')
  rollups = sqlite_rows(out / 'rollup-300s' / 'aggregates.sqlite')
  assert {r[3] for r in minutes} == {60000} and {r[3] for r in rollups} == {300000}
  assert pg_rows(postgres_dsn, tables[0]) == sorted(minutes + rollups)

  dead = []
  for path in (out / 'dead_letter.jsonl', out / 'rollup-300s' / 'dead_letter.jsonl'):
    with open(path) as f:  # lateness 0: the rollup has too-late events of its own
      dead += [(d['reason'], d['source'], dead_letter_payload(d), d['detail'])
               for d in map(json.loads, f)]
  stored = sorted((r[0], r[1], bytes(r[2]), r[3])
                  for r in pg_rows(postgres_dsn, tables[1], 'reason, source, data, detail'))
  assert stored == sorted(dead)
  with open(out / 'reconciliation.json') as f:
    assert json.load(f)['reconciled'] is True
