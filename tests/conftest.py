"""Shared helpers: write replays, run the real pipeline on the streaming
DirectRunner (which executes TestStream), and read what it left behind."""

from __future__ import annotations

import json
import os
from typing import Iterable, List, NamedTuple, Optional

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline

from pipeline.launch.build import Built, build, build_bulk
from pipeline.settings.config import RunConfig
from transforms.flow.bulk import ReadReplayInChunks
from transforms.rules.model import dead_letter_payload, payload_bytes
from transforms.rules.replay_index import index_replay
from transforms.connectors.sources import ReadReplay

T0 = 1705543200000  # 2024-01-18T02:00:00Z
SECOND = 1000
MINUTE = 60 * SECOND


def payload(event_id: str, event_time, value: float = 1.0, customer_id: str = 'finserve',
            key: str = 'AAPL') -> str:
  return json.dumps({
      'event_id': event_id, 'customer_id': customer_id, 'key': key, 'value': value,
      'event_time': event_time})


def data(source: str, body: str) -> dict:
  return {'source': source, 'data': body}


def mark(source: str, millis: int) -> dict:
  return {'source': source, 'watermark': millis}


def tick(seconds: float) -> dict:
  return {'advance_processing_time': seconds}


def write_replay(path: str, lines: Iterable) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + '\n')
  return str(path)


class Outputs(NamedTuple):
  aggregates: List[dict]
  dead_letters: List[dict]
  accounting: dict


def streaming_pipeline() -> TestPipeline:
  """A TestPipeline on the streaming DirectRunner: it runs TestStream for real
  (the test-only direct runner would cancel a streaming run at once and run nothing)."""
  return TestPipeline(
      runner='DirectRunner', options=PipelineOptions(streaming=True), blocking=True)


def read_jsonl(path: str) -> List[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def letters(records: Iterable[dict], reason: str) -> list:
  """``(source, exact payload bytes)`` of the dead letters with ``reason``, sorted
  (contract section 5: ``data_base64`` when the payload is not UTF-8)."""
  return sorted((d['source'], dead_letter_payload(d)) for d in records if d['reason'] == reason)


class LiveOutcome(NamedTuple):
  """What the contract makes of live traffic whose too-late events are known."""
  accounting: dict
  windows: dict  # (customer, key, start, end) -> (count, sum, min, max)
  invalid: list  # (source, payload) in publish order
  too_late: list


def live_outcome(sent: Iterable[tuple], window_s: int, too_late_ids=frozenset()) -> LiveOutcome:
  """Contract section 3 over ``(source, payload)`` in arrival order, the
  events named in ``too_late_ids`` too late (a live source's watermark decides
  that; the caller knows which ones it sent beyond the lateness): invalid, else
  too late, else duplicate (by event_id, the first copy counted), else aggregated."""
  from tools import reference
  counts = dict(received=0, invalid=0, too_late=0, duplicate=0, aggregated=0)
  values: dict = {}
  seen: set = set()
  invalid, too_late = [], []
  for source, data in sent:
    counts['received'] += 1
    fields = reference.validate(data)
    if fields is None:
      counts['invalid'] += 1
      invalid.append((source, data))
      continue
    event_id, customer, key, value, t = fields
    if event_id in too_late_ids:
      counts['too_late'] += 1
      too_late.append((source, data))
      continue
    if event_id in seen:
      counts['duplicate'] += 1
      continue
    seen.add(event_id)
    counts['aggregated'] += 1
    start = t - t % (window_s * 1000)
    values.setdefault((customer, key, start, start + window_s * 1000), []).append(value)
  windows = {w: (len(v), sum(v), min(v), max(v)) for w, v in values.items()}
  return LiveOutcome(counts, windows, invalid, too_late)


def as_sent(pairs: Iterable[tuple]) -> list:
  """``(source, payload)`` pairs as ``letters`` gives them back, sorted."""
  return sorted((source, payload_bytes(body)) for source, body in pairs)


def make_config(tmp_path, replay_path: str, window_size_s: int = 60,
                allowed_lateness_s: int = 30, early_firing_s: Optional[int] = None,
                shards: int = 1, sample_memory_s: Optional[int] = None,
                aggregates_topic: Optional[str] = None, rollups=()) -> RunConfig:
  out = os.path.join(str(tmp_path), 'out')
  os.makedirs(out, exist_ok=True)
  return RunConfig(
      source=f'replay:{replay_path}', window_size_s=window_size_s,
      allowed_lateness_s=allowed_lateness_s, early_firing_s=early_firing_s,
      output_dir=out, sqlite_path=os.path.join(out, 'aggregates.sqlite'), shards=shards,
      sample_memory_s=sample_memory_s, aggregates_topic=aggregates_topic,
      rollups=tuple(rollups))


def run_replay(tmp_path, lines, check=None, arrival_watermarks=True, bulk=False,
               **config_kwargs) -> Outputs:
  """Runs the whole pipeline (build()) on a replay; ``check(built)`` may add
  in-pipeline assertions (assert_that) before it runs. With
  ``arrival_watermarks=False`` the replay behaves like a live source and
  too-late routing probes the runner's watermark. With ``bulk`` it runs the
  bulk flow (build_bulk()) on the batch DirectRunner instead."""
  replay = write_replay(os.path.join(str(tmp_path), 'replay.jsonl'), lines)
  config = make_config(tmp_path, replay, **config_kwargs)
  if bulk:
    with TestPipeline(runner='DirectRunner', blocking=True) as p:
      built = build_bulk(p, config, ReadReplayInChunks(index_replay(replay, chunk_messages=3)))
      if check is not None:
        check(built)
  else:
    with streaming_pipeline() as p:
      built: Built = build(p, config, ReadReplay(replay, arrival_watermarks=arrival_watermarks))
      if check is not None:
        check(built)
  with open(config.accounting_path, encoding='utf-8') as f:
    accounting = json.load(f)
  return Outputs(
      read_jsonl(config.aggregates_path), read_jsonl(config.dead_letter_path), accounting)


def panes_of(aggregates: List[dict], window_start: int, customer_id='finserve',
             key='AAPL') -> List[tuple]:
  """``(pane_index, timing, count, sum)`` of one window, in pane order."""
  return sorted(
      (a['pane_index'], a['timing'], a['count'], a['sum']) for a in aggregates
      if a['window_start'] == window_start and a['customer_id'] == customer_id and
      a['key'] == key)


@pytest.fixture(params=['replay-watermark', 'probed-watermark', 'bulk'])
def run(tmp_path, request):
  """Runs a replay three ways: streaming, routing by the watermark the replay
  states; streaming, as a live source whose watermark the router probes; and
  in bulk on the batch runner."""
  def _run(lines, **kwargs) -> Outputs:
    return run_replay(
        tmp_path, lines, arrival_watermarks=request.param != 'probed-watermark',
        bulk=request.param == 'bulk', **kwargs)
  return _run


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSTGRES_SCRIPT = os.path.join(REPO, 'scripts', 'postgres.sh')


@pytest.fixture(scope='session')
def postgres_dsn():
  """A real PostgreSQL 15 started by scripts/postgres.sh (installed with apt on
  a fresh machine); stopped at the end unless it was already running."""
  import subprocess
  was_running = subprocess.run(
      [POSTGRES_SCRIPT, 'status'], capture_output=True, timeout=60).returncode == 0
  started = subprocess.run(
      [POSTGRES_SCRIPT, 'start'], capture_output=True, text=True, timeout=1200)
  if started.returncode != 0:
    pytest.fail(f'scripts/postgres.sh start failed:\n{started.stderr[-3000:]}')
  yield started.stdout.strip().splitlines()[-1]
  if not was_running:
    subprocess.run([POSTGRES_SCRIPT, 'stop'], check=True, timeout=120)


@pytest.fixture
def pg_table(postgres_dsn, request):
  """A fresh table name in the test database; the table is dropped afterwards."""
  import re
  import uuid

  import psycopg
  from psycopg import sql
  name = re.sub(r'\W', '_', request.node.name)[:40].lower() + '_' + uuid.uuid4().hex[:8]
  yield name
  with psycopg.connect(postgres_dsn, autocommit=True) as conn:
    conn.execute(sql.SQL('DROP TABLE IF EXISTS {}').format(sql.Identifier(name)))
