"""Dead letters every tool and sink accepts, with the exact payload bytes: every
invalid payload of the 100,000-payload fuzz (bytes that are not UTF-8, lone
surrogates, NUL, control characters) written by the product's own writers,
then loaded by jq (libjq), DuckDB, PostgreSQL and Beam's BigQuery row
conversion, each giving back the bytes that were received (contract section 5).
"""

from __future__ import annotations

import base64
import re
from typing import List

import apache_beam as beam
import duckdb
import jq
import psycopg
import pytest
from apache_beam.coders import RowCoder
from apache_beam.io.gcp import bigquery_tools
from psycopg import sql

from test_fuzz import payloads
from transforms.connectors.bigquery import DEAD_LETTERS_BQ_SCHEMA, bigquery_dead_letter_row
from transforms.rules.model import INVALID, DeadLetter, dead_letter_payload, payload_bytes
from transforms.rules.payload import InvalidPayload, parse_payload
from transforms.connectors.postgres import (
    PostgresDeadLetterRow, postgres_dead_letter_insert, postgres_dead_letters_ddl)
from transforms.connectors.sources import decode_payload
from transforms.connectors.writers import json_line


def _fuzz_dead_letters(n: int = 100_000) -> List[DeadLetter]:
  """The fuzz's invalid payloads as the sources hand them over (undecodable
  bytes as surrogate escapes), dead-lettered as parsing refuses them."""
  letters = []
  for i, (_, body) in enumerate(payloads(seed=20240118, n=n)):
    text = decode_payload(body) if isinstance(body, bytes) else body
    try:
      parse_payload(text)
    except InvalidPayload as e:
      letters.append(DeadLetter(INVALID, 'AB'[i % 2], text, str(e), f'replay:fuzz/{i + 1}'))
  return letters


@pytest.fixture(scope='module')
def letters() -> List[DeadLetter]:
  return _fuzz_dead_letters()


@pytest.fixture(scope='module')
def jsonl(letters, tmp_path_factory) -> str:
  """The fuzz's dead letters as the run's writer writes them to dead_letter.jsonl."""
  path = tmp_path_factory.mktemp('letters') / 'dead_letter.jsonl'
  path.write_bytes(''.join(map(json_line, letters)).encode('utf-8'))
  return str(path)


def _exact(letters: List[DeadLetter]) -> dict:
  return {d.message_id: payload_bytes(d.data) for d in letters}


def test_the_fuzz_has_every_kind_of_hostile_payload(letters):
  assert len(letters) > 30_000
  texts = [d.data for d in letters]
  assert sum('\x00' in t for t in texts) > 100
  undecodable, escaped = re.compile('[\udc80-\udcff]'), re.compile('[\ud800-\udc7f]')
  assert sum(bool(undecodable.search(t)) for t in texts) > 1000  # bytes that are not UTF-8
  assert sum(bool(escaped.search(t)) for t in texts) > 100  # lone surrogate escapes


def test_a_payload_that_is_not_utf8_has_valid_text_and_its_exact_bytes():
  raw = b'{"event_id": "x\xff\xfe", "nul": "\x00"}'
  record = DeadLetter(INVALID, 'A', decode_payload(raw), 'not UTF-8').to_json_dict()
  assert record['data'] == '{"event_id": "x\ufffd\ufffd", "nul": "\x00"}'
  assert base64.b64decode(record['data_base64']) == raw == dead_letter_payload(record)
  escaped = DeadLetter(INVALID, 'A', 'lone \ud800 high', 'not UTF-8').to_json_dict()
  assert escaped['data'] == 'lone \ufffd\ufffd\ufffd high'
  assert dead_letter_payload(escaped) == b'lone \xed\xa0\x80 high'
  valid = DeadLetter(INVALID, 'A', '{"caf\u00e9": \x00}', 'not JSON').to_json_dict()
  assert 'data_base64' not in valid and dead_letter_payload(valid) == '{"caf\u00e9": \x00}'.encode()


def test_jq_loads_every_dead_letter_and_the_exact_bytes_come_back(letters, jsonl):
  with open(jsonl, 'rb') as f:
    text = f.read().decode('utf-8')  # strict: the file is valid UTF-8
  records = jq.compile('{message_id, data, data_base64}').input_text(text).all()
  assert len(records) == len(letters)
  got = {r['message_id']: dead_letter_payload({k: v for k, v in r.items() if v is not None})
         for r in records}
  assert got == _exact(letters)
  assert sum(r['data_base64'] is not None for r in records) > 1000


def test_duckdb_loads_every_dead_letter_and_the_exact_bytes_come_back(letters, jsonl):
  rows = duckdb.execute(
      'SELECT message_id, data, from_base64(data_base64) AS exact '
      "FROM read_json(?, format = 'newline_delimited')", [jsonl]).fetchall()
  assert len(rows) == len(letters)
  got = {m: bytes(exact) if exact is not None else data.encode('utf-8')
         for m, data, exact in rows}
  assert got == _exact(letters)


@pytest.mark.integration
def test_postgresql_stores_every_dead_letter_and_the_exact_bytes_come_back(
    letters, postgres_dsn, pg_table):
  # the statements and rows of WriteDeadLettersToPostgres (which
  # test_postgres_sink.py runs end to end), for all the fuzz's letters at once
  to_row = PostgresDeadLetterRow(window_size_ms=60000)
  with psycopg.connect(postgres_dsn) as conn:
    for statement in postgres_dead_letters_ddl(pg_table):
      conn.execute(statement)
    with conn.cursor() as cursor:
      cursor.executemany(postgres_dead_letter_insert(pg_table), map(to_row, letters))
  table = pg_table
  with psycopg.connect(postgres_dsn) as conn:
    rows = conn.execute(sql.SQL('SELECT message_id, data FROM {}').format(
        sql.Identifier(table))).fetchall()
  assert len(rows) == len(letters)
  assert {m: bytes(data) for m, data in rows} == _exact(letters)


def test_the_bigquery_row_conversion_takes_every_dead_letter_byte_for_byte(letters):
  schema_type = bigquery_tools.get_beam_typehints_from_tableschema(
      bigquery_tools.get_bq_tableschema(DEAD_LETTERS_BQ_SCHEMA))
  coder = RowCoder.from_type_hint(
      beam.typehints.row_type.RowTypeConstraint.from_fields(schema_type), None)
  for dead in letters:
    row = bigquery_tools.beam_row_from_dict(bigquery_dead_letter_row(dead),
                                            DEAD_LETTERS_BQ_SCHEMA)
    assert coder.decode(coder.encode(row)).data == payload_bytes(dead.data)
