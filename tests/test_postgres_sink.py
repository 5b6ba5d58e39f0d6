"""The PostgreSQL writers against a real server (scripts/postgres.sh): the
pane-aware upsert, customer scope, dead letters kept byte for byte, retries."""

import random
import time

import apache_beam as beam
import psycopg
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from psycopg import sql

from transforms.rules.model import DeadLetter, WindowAggregate, payload_bytes
from transforms.connectors.postgres import (
    Backoff, UpsertPostgres, WriteDeadLettersToPostgres, postgres_connect, with_backoff)
from transforms.connectors.sinks import check_identifier

pytestmark = pytest.mark.integration


def panes(window_start, customer='finserve', key='AAPL'):
  return [
      WindowAggregate(customer, key, window_start, window_start + 60000, n, float(n),
                      1.0, float(n), i, timing)
      for i, (n, timing) in enumerate([(1, 'EARLY'), (3, 'ON_TIME'), (4, 'LATE'), (6, 'LATE')])
  ]


def rows(dsn, table, columns='customer_id, window_start, window_size_ms, count, pane_index, timing'):
  with psycopg.connect(dsn) as conn:
    return conn.execute(sql.SQL('SELECT {} FROM {} ORDER BY 1, 2').format(
        sql.SQL(columns), sql.Identifier(table))).fetchall()


def run_pipeline(elements, transform, check=None):
  with test_pipeline.TestPipeline(runner='DirectRunner') as p:
    out = p | beam.Create(elements, reshuffle=False) | transform
    if check:
      check(out)


def test_panes_out_of_order_and_twice_leave_one_correct_row_per_window(postgres_dsn, pg_table):
  shuffled = panes(0) * 2 + panes(60000) * 2
  random.Random(7).shuffle(shuffled)
  highest_first = [panes(120000)[-1]] + panes(120000)[:-1] + [panes(120000)[-1]]
  run_pipeline(shuffled + highest_first, UpsertPostgres(postgres_dsn, pg_table))
  assert rows(postgres_dsn, pg_table) == [
      ('finserve', 0, 60000, 6, 3, 'LATE'), ('finserve', 60000, 60000, 6, 3, 'LATE'),
      ('finserve', 120000, 60000, 6, 3, 'LATE')]


def test_a_retried_or_stale_pane_in_a_later_bundle_changes_nothing(postgres_dsn, pg_table):
  for batch in ([panes(0)[1]], [panes(0)[1]], [panes(0)[0]], [panes(0)[2]], [panes(0)[1]]):
    run_pipeline(batch, UpsertPostgres(postgres_dsn, pg_table))
  assert rows(postgres_dsn, pg_table, 'count, pane_index, timing') == [(4, 2, 'LATE')]


def test_windows_of_different_sizes_are_different_rows(postgres_dsn, pg_table):
  hour = WindowAggregate('finserve', 'AAPL', 0, 3600000, 9, 9.0, 1.0, 1.0, 0, 'ON_TIME')
  run_pipeline([panes(0)[0], hour], UpsertPostgres(postgres_dsn, pg_table))
  assert [(r[2], r[3]) for r in rows(postgres_dsn, pg_table)] == [(60000, 1), (3600000, 9)]


def test_a_customer_scoped_sink_refuses_foreign_rows(postgres_dsn, pg_table):
  mine = panes(0, 'finserve')
  foreign = panes(0, 'dataflow-inc') + panes(60000, 'acme.io')
  mixed = mine + foreign
  random.Random(1).shuffle(mixed)

  def check(refused):
    assert_that(refused, equal_to(foreign))
  run_pipeline(mixed, UpsertPostgres(postgres_dsn, pg_table, customer_id='finserve'), check)
  assert rows(postgres_dsn, pg_table) == [('finserve', 0, 60000, 6, 3, 'LATE')]


def test_dead_letters_are_stored_exactly_even_when_not_utf8(postgres_dsn, pg_table):
  letters = [
      DeadLetter('invalid', 'A', '{"broken', 'payload is not JSON'),
      DeadLetter('invalid', 'B', 'nul\x00 and lone \ud800 surrogate', 'not UTF-8'),
      DeadLetter('too_late', 'A', '{"event_id": "e1"}', 'window closed at ...'),
  ]
  run_pipeline(letters, WriteDeadLettersToPostgres(postgres_dsn, pg_table))
  with psycopg.connect(postgres_dsn) as conn:
    stored = conn.execute(sql.SQL(
        'SELECT reason, source, data, detail, written_at FROM {}').format(
            sql.Identifier(pg_table))).fetchall()
  assert sorted((r[0], r[1], bytes(r[2]), r[3]) for r in stored) == sorted(
      (d.reason, d.source, payload_bytes(d.data), d.detail) for d in letters)
  assert all(r[4] is not None for r in stored)


def test_table_names_must_be_plain_identifiers():
  for bad in ('aggregates; DROP TABLE x', 'a-b', '1abc', '', 'x' * 64, 'a"b'):
    with pytest.raises(ValueError, match='identifier'):
      UpsertPostgres('postgresql://h/db', bad)
    with pytest.raises(ValueError, match='identifier'):
      WriteDeadLettersToPostgres('postgresql://h/db', bad)
  assert check_identifier('finserve_aggregates_1m') == 'finserve_aggregates_1m'
  with pytest.raises(ValueError, match='dsn'):
    UpsertPostgres('', 'aggregates')
  with pytest.raises(ValueError, match='customer'):
    UpsertPostgres('postgresql://h/db', 'aggregates', customer_id='fin serve!')


def test_connecting_retries_with_exponential_backoff_then_fails(postgres_dsn):
  closed_port = postgres_dsn.replace(':15433/', ':1/')
  started = time.monotonic()
  with pytest.raises(psycopg.OperationalError):
    postgres_connect(closed_port, Backoff(attempts=4, initial_s=0.1, max_s=0.25))
  # 0.1 + 0.2 + 0.25 seconds of backoff between four attempts
  assert 0.5 <= time.monotonic() - started < 10
  assert Backoff(attempts=5, initial_s=0.5, max_s=3).delays() == [0.5, 1.0, 2.0, 3.0]


def test_a_transient_failure_is_retried_until_it_succeeds(postgres_dsn):
  attempts, slept = [], []

  def flaky():
    attempts.append(1)
    if len(attempts) < 3:
      # a real connection refused by the server: wrong password
      return psycopg.connect(postgres_dsn.replace('tidemark:tidemark@', 'tidemark:wrong@'))
    return psycopg.connect(postgres_dsn)
  conn = with_backoff(flaky, Backoff(attempts=4, initial_s=0.01), 'connect',
                      (psycopg.OperationalError,), sleep=slept.append)
  with conn:
    assert conn.execute('SELECT 1').fetchone() == (1,)
  assert len(attempts) == 3 and slept == [0.01, 0.02]


def test_parallel_writers_with_overlapping_windows_converge_on_the_highest_pane(
    postgres_dsn, pg_table):
  # Four workers, each with every pane of 150 windows in its own random order,
  # in bundles of 40: no deadlock, no lost update, the highest pane wins.
  import threading

  from transforms.connectors.postgres import (
      _PostgresBatchFn, postgres_aggregates_ddl, postgres_upsert)
  from transforms.connectors.sinks import row_lock_order, aggregate_row
  everything = [p for w in range(150) for p in panes(w * 60000, key=f'K{w % 7}')]
  errors = []

  def worker(seed):
    try:
      fn = _PostgresBatchFn(postgres_dsn, pg_table, Backoff(), aggregate_row,
                            postgres_aggregates_ddl, postgres_upsert, sort_key=row_lock_order)
      fn.setup()
      mine = list(everything)
      random.Random(seed).shuffle(mine)
      for start in range(0, len(mine), 40):
        fn.start_bundle()
        for pane in mine[start:start + 40]:
          fn.process(pane)
        fn.finish_bundle()
      fn.teardown()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  stored = rows(postgres_dsn, pg_table, 'key, window_start, count, pane_index, timing')
  assert len(stored) == 150
  assert {(r[2], r[3], r[4]) for r in stored} == {(6, 3, 'LATE')}


def test_a_customer_scoped_dead_letter_writer_refuses_other_customers_payloads(
    postgres_dsn, pg_table, caplog):
  from conftest import payload
  mine = [DeadLetter('too_late', 'A', payload(f'm{i}', 1705543200000 + i), 'window closed')
          for i in range(3)]
  foreign = [DeadLetter('too_late', 'B', payload(f'f{i}', 1705543200000, customer_id=c),
                        'window closed')
             for i, c in enumerate(['acme.io', 'dataflow-inc', 'acme.io', 'acme.io'])]
  # Invalid payloads name no customer one can trust, even one that says finserve.
  invalid = [DeadLetter('invalid', 'A', '{"customer_id": "finserve", "value": "x"}', 'value'),
             DeadLetter('invalid', 'C', 'not json', 'not JSON')]
  letters = mine + foreign + invalid
  random.Random(5).shuffle(letters)

  def check(refused):
    assert_that(refused, equal_to(foreign))
  with caplog.at_level('WARNING', logger='transforms.connectors.sinks'):
    run_pipeline(letters, WriteDeadLettersToPostgres(
        postgres_dsn, pg_table, customer_id='finserve'), check)
  stored = rows(postgres_dsn, pg_table, 'reason, source, data, detail')
  assert sorted((r[0], r[1], bytes(r[2]).decode(), r[3]) for r in stored) == sorted(
      tuple(d)[:4] for d in mine)
  summaries = [r.getMessage() for r in caplog.records if 'scoped to customer' in r.getMessage()]
  assert len(summaries) == 1  # one bundle, one line
  assert 'refused 4 dead letters' in summaries[0] and 'acme.io: 3' in summaries[0]
  assert '2 invalid payloads' in summaries[0]


def test_an_unscoped_dead_letter_writer_stores_every_dead_letter(postgres_dsn, pg_table):
  from conftest import payload
  letters = [DeadLetter('too_late', 'B', payload('f', 1705543200000, customer_id='acme.io'),
                        'window closed'), DeadLetter('invalid', 'C', 'not json', 'not JSON')]

  def check(refused):
    assert_that(refused, equal_to([]))
  run_pipeline(letters, WriteDeadLettersToPostgres(postgres_dsn, pg_table), check)
  assert sorted(r[0] for r in rows(postgres_dsn, pg_table, 'reason, source')) == [
      'invalid', 'too_late']


def test_in_fire_order_the_restored_historys_panes_replace_the_rolled_back_ones(
    postgres_dsn, pg_table):
  # A run writes panes 0-3 of a window before the checkpoint that holds them,
  # then is restored from an earlier checkpoint and fires the window again:
  # fewer, fuller panes under lower indices. The table must end with those.
  for pane in panes(0):
    run_pipeline([pane], UpsertPostgres(postgres_dsn, pg_table, in_fire_order=True))
  restored = [pane._replace(count=7) for pane in panes(0)[:2]]
  run_pipeline(restored, UpsertPostgres(postgres_dsn, pg_table, in_fire_order=True))
  assert rows(postgres_dsn, pg_table, 'count, pane_index, timing') == [(7, 1, 'ON_TIME')]
  # the pane-index guard would have kept the rolled-back history's pane 3
  run_pipeline(panes(0), UpsertPostgres(postgres_dsn, pg_table))
  assert rows(postgres_dsn, pg_table, 'count, pane_index, timing') == [(6, 3, 'LATE')]
  run_pipeline(restored, UpsertPostgres(postgres_dsn, pg_table))
  assert rows(postgres_dsn, pg_table, 'count, pane_index, timing') == [(6, 3, 'LATE')]


def test_in_fire_order_a_bundle_keeps_each_windows_panes_in_the_order_they_came(
    postgres_dsn, pg_table):
  # one bundle, windows interleaved, each window's panes in firing order: the
  # writer sorts by window only, so every window ends at its last pane
  windows = [panes(start) for start in (120000, 0, 60000)]
  bundle = [pane for fired in zip(*windows) for pane in fired]
  run_pipeline(bundle, UpsertPostgres(postgres_dsn, pg_table, in_fire_order=True))
  assert rows(postgres_dsn, pg_table) == [
      ('finserve', 0, 60000, 6, 3, 'LATE'), ('finserve', 60000, 60000, 6, 3, 'LATE'),
      ('finserve', 120000, 60000, 6, 3, 'LATE')]
