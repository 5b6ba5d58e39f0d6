"""The BigQuery writers without Google Cloud: construction and validation, the
explicit schemas, row conversion through Beam's own dict-to-Row conversion (the
step before the Storage Write API). Nothing here opens a network connection."""

import json

import apache_beam as beam

import pytest
from apache_beam.io.gcp import bigquery_tools
from apache_beam.io.gcp.bigquery import WriteToBigQuery

from transforms.rules.model import DeadLetter, WindowAggregate, payload_bytes
from transforms.connectors.bigquery import (
    AGGREGATES_BQ_CDC_SCHEMA, AGGREGATES_BQ_SCHEMA, BIGQUERY_WRITE_FAILED, DEAD_LETTERS_BQ_SCHEMA,
    WriteAggregatesToBigQuery, WriteDeadLettersToBigQuery, bigquery_cdc_row,
    bigquery_dead_letter_row, bigquery_failed_row)
from transforms.connectors.sinks import AGGREGATE_COLUMNS, AGGREGATE_KEY, aggregate_row

TABLE = 'tidemark-prod:finserve_aggregates.trading_1m'
DEAD = 'tidemark-prod:finserve_aggregates.dead_letters'
PANE = WindowAggregate('finserve', 'AAPL', 1705543200000, 1705543260000, 3, 4.5, 0.5, 2.0,
                       11, 'LATE')


def test_the_schema_is_explicit_and_matches_the_shared_columns():
  assert [f['name'] for f in AGGREGATES_BQ_SCHEMA['fields']] == list(AGGREGATE_COLUMNS)
  assert {f['name']: f['type'] for f in AGGREGATES_BQ_SCHEMA['fields']} == {
      'customer_id': 'STRING', 'key': 'STRING', 'window_start': 'INT64',
      'window_size_ms': 'INT64', 'window_end': 'INT64', 'count': 'INT64', 'sum': 'FLOAT64',
      'min': 'FLOAT64', 'max': 'FLOAT64', 'pane_index': 'INT64', 'timing': 'STRING'}
  assert all(f['mode'] == 'REQUIRED' for f in AGGREGATES_BQ_SCHEMA['fields'])
  assert [f['name'] for f in DEAD_LETTERS_BQ_SCHEMA['fields']] == [
      'reason', 'source', 'data', 'detail']


def test_the_aggregates_write_is_a_storage_write_api_upsert_keyed_by_window():
  sink = WriteAggregatesToBigQuery(TABLE, DEAD, customer_id='finserve')
  write = sink.aggregates_write()
  assert isinstance(write, WriteToBigQuery)
  assert write.method == WriteToBigQuery.Method.STORAGE_WRITE_API
  assert write.schema == AGGREGATES_BQ_CDC_SCHEMA
  assert write._use_cdc_writes and write._primary_key == list(AGGREGATE_KEY)
  assert write.use_at_least_once
  ref = write.table_reference
  assert (ref.projectId, ref.datasetId, ref.tableId) == (
      'tidemark-prod', 'finserve_aggregates', 'trading_1m')
  dead = sink.dead_letters_write()
  assert dead.method == WriteToBigQuery.Method.STORAGE_WRITE_API
  assert dead.schema == DEAD_LETTERS_BQ_SCHEMA
  assert dead.table_reference.tableId == 'dead_letters'
  standalone = WriteDeadLettersToBigQuery(DEAD).write()
  assert standalone.schema == DEAD_LETTERS_BQ_SCHEMA


def test_the_cdc_row_converts_to_a_beam_row_of_the_schema():
  row = bigquery_tools.beam_row_from_dict(bigquery_cdc_row(PANE), AGGREGATES_BQ_CDC_SCHEMA)
  assert row.row_mutation_info.mutation_type == 'UPSERT'
  assert tuple(row.record) == aggregate_row(PANE)
  assert row.record.window_size_ms == 60000


def test_the_sequence_number_orders_panes_as_their_index():
  # BigQuery compares change_sequence_number as hexadecimal numbers.
  seqs = [bigquery_cdc_row(PANE._replace(pane_index=i))['row_mutation_info']
          ['change_sequence_number'] for i in range(300)]
  assert [int(s, 16) for s in seqs] == list(range(300))
  assert all(s == s.upper() for s in seqs)


def test_dead_letters_and_failed_rows_become_dead_letter_rows():
  dead = DeadLetter('invalid', 'A', 'garbage \ud800', 'not UTF-8')
  row = bigquery_tools.beam_row_from_dict(bigquery_dead_letter_row(dead),
                                          DEAD_LETTERS_BQ_SCHEMA)
  assert row.data == payload_bytes(dead.data) == b'garbage \xed\xa0\x80'
  failed = bigquery_failed_row(TABLE, {
      'error_message': 'row too large', 'failed_row': bigquery_cdc_row(PANE)})
  assert failed['reason'] == BIGQUERY_WRITE_FAILED
  assert failed['source'] == f'bigquery:{TABLE}'
  assert json.loads(failed['data']) == PANE._replace().to_json_dict() | {
      'window_size_ms': 60000}
  assert failed['detail'] == 'row too large'


@pytest.mark.parametrize('table, dead, customer, match', [
    ('no_dataset', DEAD, None, 'table'),
    ('p:d.t; DROP', DEAD, None, 'table'),
    (TABLE, 'x', None, 'dead_letter_table'),
    (TABLE, TABLE, None, 'differ'),
    (TABLE, DEAD, 'fin serve', 'customer_id'),
])
def test_bad_arguments_fail_at_construction(table, dead, customer, match):
  with pytest.raises(ValueError, match=match):
    WriteAggregatesToBigQuery(table, dead, customer_id=customer)


def test_bigquery_dead_letters_are_scoped_to_the_customer_like_postgres():
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.util import assert_that, equal_to

  from tests.conftest import payload

  mine = DeadLetter('too_late', 'A', payload('m1', 1705543200000), 'window closed', 'kafka:t/0/1')
  foreign = DeadLetter('too_late', 'B', payload('f1', 1705543200000, customer_id='acme.io'),
                       'window closed', 'kafka:t/0/2')
  invalid = DeadLetter('invalid', 'C', 'not json', 'not JSON', 'kafka:t/0/3')

  class StoredRows(beam.PTransform):
    def expand(self, rows):
      assert_that(rows | beam.Map(lambda r: (r['reason'], r['data'])),
                  equal_to([('too_late', mine.data.encode())]), label='Stored')
      return rows

  class Scoped(WriteDeadLettersToBigQuery):
    def write(self):
      return StoredRows()

  with TestPipeline(runner='DirectRunner') as p:
    refused = (p | beam.Create([mine, foreign, invalid])
               | Scoped(DEAD, customer_id='finserve'))
    assert_that(refused | beam.Map(tuple), equal_to([tuple(foreign)]), label='Refused')
