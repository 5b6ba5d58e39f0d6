"""The output files' writers under what a checkpointing runner does: records
that reach the accounting writer out of order, and a restore that replays the
input written since the last checkpoint."""

import json
import os
import random

import hypothesis

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline

from transforms.flow.accounting import accounting_progress
from transforms.rules.model import CATEGORIES
from transforms.connectors import writers
from transforms.connectors.writers import WriteJsonLines, WriteLatestJson, _AppendFromCheckpointFn


def _record(n: int) -> dict:
  """The n-th accounting record of a run: each counts what the one before did, and more."""
  return dict(zip(CATEGORIES, (2 * n, n // 4, n // 4, n // 4, n - 3 * (n // 4))))


def test_the_accounting_file_keeps_the_record_that_counts_most_whatever_the_order(tmp_path):
  path = str(tmp_path / 'accounting.json')
  records = [_record(n) for n in range(0, 400, 7)]
  random.Random(5).shuffle(records)
  assert records[-1] != _record(399 // 7 * 7)  # the last written is not the latest
  with TestPipeline(runner='DirectRunner') as p:
    _ = (p | beam.Create(records, reshuffle=False)
         | WriteLatestJson(path, order=accounting_progress))
  with open(path, encoding='utf-8') as f:
    assert json.load(f) == _record(399 // 7 * 7)


def test_an_older_record_never_replaces_the_file_and_a_newer_one_does(tmp_path):
  path = str(tmp_path / 'accounting.json')
  for n, expected in ((10, 10), (4, 10), (10, 10), (12, 12)):
    with TestPipeline(runner='DirectRunner') as p:
      _ = p | beam.Create([_record(n)]) | WriteLatestJson(path, order=accounting_progress)
    with open(path, encoding='utf-8') as f:
      assert json.load(f) == _record(expected)
  # without an order the last record written wins, as before
  with TestPipeline(runner='DirectRunner') as p:
    _ = p | beam.Create([_record(1)]) | WriteLatestJson(path)
  with open(path, encoding='utf-8') as f:
    assert json.load(f) == _record(1)


class _State:
  """A ReadModifyWrite state cell, as a runner hands it to the DoFn."""

  def __init__(self, value=None):
    self.value = value

  def read(self):
    return self.value

  def write(self, value):
    self.value = value


def test_after_a_restore_the_file_is_cut_back_to_the_checkpoint_and_written_once(tmp_path):
  path = str(tmp_path / 'out' / 'dead_letter.jsonl')
  writer = _AppendFromCheckpointFn()
  live = _State()
  list(writer.process((path, None), live))  # the seed: the file is new
  list(writer.process((path, b'a1\na2\n'), live))
  checkpoint = _State(live.read())  # the state a checkpoint takes now
  list(writer.process((path, b'b1\n'), live))  # written, then the worker dies
  list(writer.process((path, b'b2\nb3\n'), live))
  # restored: the state is the checkpoint's; the input since then comes again,
  # perhaps in other batches
  list(writer.process((path, b'b1\nb2\n'), checkpoint))
  list(writer.process((path, b'b3\n'), checkpoint))
  with open(path, 'rb') as f:
    assert f.read() == b'a1\na2\nb1\nb2\nb3\n'
  assert checkpoint.read() == os.path.getsize(path)


def test_a_new_job_appends_to_what_the_file_held_when_it_started(tmp_path):
  path = str(tmp_path / 'refused.jsonl')
  with open(path, 'wb') as f:
    f.write(b'old\n')
  writer, state = _AppendFromCheckpointFn(), _State()
  list(writer.process((path, None), state))
  assert state.read() == 4
  list(writer.process((path, b'new\n'), state))
  list(writer.process((path, None), state))  # a seed replayed later changes nothing
  assert state.read() == 8
  with open(path, 'rb') as f:
    assert f.read() == b'old\nnew\n'


def test_the_exactly_once_writer_writes_every_line_once_on_a_runner(tmp_path):
  path = str(tmp_path / 'lines.jsonl')
  records = [{'n': n} for n in range(500)]
  with TestPipeline(runner='DirectRunner') as p:
    _ = p | beam.Create(records) | WriteJsonLines(path, exactly_once=True)
  with open(path, encoding='utf-8') as f:
    assert sorted(json.loads(line)['n'] for line in f) == list(range(500))


def test_the_exactly_once_writer_takes_windowed_elements(tmp_path):
  from apache_beam.transforms.window import FixedWindows, TimestampedValue
  path = str(tmp_path / 'panes.jsonl')
  with TestPipeline(runner='DirectRunner') as p:
    _ = (p | beam.Create(range(10)) | beam.Map(lambda n: TimestampedValue({'n': n}, n))
         | beam.WindowInto(FixedWindows(3)) | WriteJsonLines(path, exactly_once=True))
  with open(path, encoding='utf-8') as f:
    assert sorted(json.loads(line)['n'] for line in f) == list(range(10))


def test_the_graph_of_a_scoped_checkpointed_run_flattens_only_like_windowed_inputs(
    tmp_path, caplog):
  import dataclasses
  import logging

  from conftest import data, make_config, payload, write_replay
  from pipeline.launch.build import build
  from transforms.connectors.sources import ReadReplay
  replay = write_replay(str(tmp_path / 'r.jsonl'), [data('A', payload('e1', 1705543200000))])
  config = dataclasses.replace(
      make_config(tmp_path, replay), sink='postgres', customer_id='finserve',
      postgres_dsn='postgresql://tidemark@127.0.0.1:1/tidemark', checkpointed=True,
      rollups=((120, 60),))
  caplog.set_level(logging.WARNING)
  p = TestPipeline(runner='DirectRunner')
  build(p, config, ReadReplay(replay))
  assert 'must have the same window' not in caplog.text


def test_the_accounting_writer_never_waits_for_the_run_lock_of_its_folder(tmp_path):
  """A run writing in place (workers that do not share the launcher's staging)
  replaces OUTPUT_DIR/accounting.json while its launcher holds the folder's lock."""
  import re
  import threading

  from pipeline.runfolder.files import RunFolder
  out = tmp_path / 'out'
  run = RunFolder(str(out), ('accounting.json',), re.compile('rollup'), staged=False).open()
  done = threading.Event()

  def write():
    with TestPipeline(runner='DirectRunner') as p:
      _ = (p | beam.Create([_record(3)])
           | WriteLatestJson(str(out / 'accounting.json'), order=accounting_progress))
    done.set()

  try:
    threading.Thread(target=write, daemon=True).start()
    assert done.wait(120), 'the writer is waiting for the run lock'
  finally:
    run.release()
  with open(out / 'accounting.json', encoding='utf-8') as f:
    assert json.load(f) == _record(3)


def test_a_bundle_larger_than_the_write_size_is_appended_in_whole_lines(tmp_path, monkeypatch):
  monkeypatch.setattr(writers._BundleLinesFn, '_WRITE_EVERY', 100)
  writes = []
  append = writers._AppendLinesFn._write
  monkeypatch.setattr(writers._AppendLinesFn, '_write',
                      lambda fn, data: (writes.append(data), append(fn, data)))
  path = str(tmp_path / 'lines.jsonl')
  records = [{'n': n, 'text': 'x' * (n % 7)} for n in range(200)]
  with TestPipeline() as p:
    _ = p | beam.Create(records) | writers.WriteJsonLines(path)
  with open(path, encoding='utf-8') as f:
    lines = f.read().split('\n')
  assert lines[-1] == ''
  assert sorted((json.loads(line) for line in lines[:-1]), key=lambda r: r['n']) == records
  assert len(writes) > 20 and all(data.endswith(b'\n') for data in writes)


def test_a_checkpointed_run_upserts_postgres_rows_as_panes_fire_and_the_rest_at_checkpoints(
    tmp_path):
  import dataclasses

  from conftest import data, make_config, payload, write_replay
  from pipeline.launch.build import build
  from transforms.connectors.sources import ReadReplay
  replay = write_replay(str(tmp_path / 'r.jsonl'), [data('A', payload('e1', 1705543200000))])
  config = dataclasses.replace(
      make_config(tmp_path, replay), sink='postgres', customer_id='finserve',
      postgres_dsn='postgresql://tidemark@127.0.0.1:1/tidemark', checkpointed=True)
  p = TestPipeline(runner='DirectRunner')
  build(p, config, ReadReplay(replay))
  steps, producers = [], {}

  class Producers(beam.pipeline.PipelineVisitor):

    def visit_transform(self, node):
      steps.append(node)
      for out in node.outputs.values():
        producers[out] = node

  p.visit(Producers())

  def awaits_checkpoint(label: str) -> bool:
    """Whether the step ``label`` is downstream of an AwaitCheckpoint."""
    [node] = [n for n in steps if n.full_label.endswith(label)]
    seen, todo = set(), list(node.inputs)
    while todo:
      pcoll = todo.pop()
      step = producers.get(pcoll)
      if step is None or step.full_label in seen:
        continue
      if 'AwaitCheckpoint' in step.full_label:
        return True
      seen.add(step.full_label)
      todo.extend(step.inputs)
    return False

  assert not awaits_checkpoint('PrimaryWrite/UpsertPostgres/Write')
  for label in ('PrimaryWrite/DeadLettersPostgres/Append', 'PrimaryWrite/WriteAggregates/Collect',
                'PrimaryWrite/WriteDeadLetters/Collect', 'PrimaryWrite/WriteRefused/Collect',
                'PrimaryWrite/WriteAccounting/Replace'):
    assert awaits_checkpoint(label), label


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(hypothesis.strategies.dictionaries(
    hypothesis.strategies.text(max_size=8),
    hypothesis.strategies.one_of(hypothesis.strategies.text(), hypothesis.strategies.none(),
                                 hypothesis.strategies.integers()), max_size=5))
def test_a_json_line_is_what_the_standard_library_writes(record):
  # dead letters take a faster encoder: same line, ASCII, for any strings
  # (control characters, DEL, non-ASCII, lone surrogates)
  line = writers.json_line(record)
  assert line == json.dumps(record, separators=(',', ':'), allow_nan=False) + '\n'
  assert line.isascii()


def test_a_dead_letters_json_line_is_what_the_standard_library_writes():
  from transforms.rules.model import DeadLetter
  for data in ('{"event_id": "e1"}', 'caf\u00e9 \x7f \x01 "q" \\', '\udcff\udc80garbage'):
    letter = DeadLetter('invalid', 'A', data, 'not JSON', 'replay:abc/1')
    assert writers.json_line(letter) == json.dumps(
        letter.to_json_dict(), separators=(',', ':'), allow_nan=False) + '\n'
