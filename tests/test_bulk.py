"""Bulk replays: the same outputs as the streaming pipeline, pane for pane.

The incident-symptom tests also run in bulk (the ``run`` fixture); here: the
chunked reading of a replay, the trigger along the replay's timeline, equality
with the streaming DirectRunner on generated incident replays, with the
reference on a larger one, and the CLI.
"""

from __future__ import annotations

import json
import os
import zlib

import msgspec
import numpy as np
import pytest
from apache_beam.transforms import trigger

from conftest import (
    MINUTE, SECOND, T0, as_sent, data, letters, mark, payload, run_replay, write_replay)
from tools import reference, traffic
from pipeline.readback.reconciliation import final_panes
from test_replay_and_cli import cli
from transforms.flow import aggregate, bulk, chunks
from transforms.flow.bulk import AggregateWindowsInBulk, fire_panes
from transforms.flow.replay_panes import evaluated_early_firing
from transforms.rules.model import stable_shard, stable_shards, window_spec
from transforms.rules.replay import Messages, ReplayError, compile_replay
from transforms.rules.replay_index import (
    decode_lines, index_replay, read_chunk, read_chunk_columns)


def _generated(tmp_path, messages: int, seed: int, **profile) -> str:
  path = str(tmp_path / f'generated-{seed}.jsonl')
  traffic.write_replay(path, traffic.Profile(messages=messages, seed=seed, **profile))
  return path


@pytest.mark.parametrize('chunk_messages', [1, 7, 250, 100000])
def test_chunks_read_back_every_message_with_its_arrival_watermark(tmp_path, chunk_messages):
  replay = _generated(tmp_path, 600, seed=5)
  compiled = [m for s in compile_replay(replay).steps if isinstance(s, Messages) for m in s.batch]
  index = index_replay(replay, chunk_messages)
  assert index.messages == len(compiled) == 600
  assert len(index.chunks) == -(-600 // chunk_messages)
  read = [m for chunk in index.chunks for m in read_chunk(replay, chunk)]
  assert [m[0] for m in read] == list(range(600))
  assert [(m[4], m[5], m[2]) for m in read] == [(m.source, m.data, m.watermark) for m in compiled]
  # Steps never go backwards and processing time only grows.
  assert all(a[1] <= b[1] and a[3] <= b[3] for a, b in zip(read, read[1:]))


def test_index_refuses_a_bad_line_naming_it(tmp_path):
  replay = write_replay(tmp_path / 'r.jsonl', [
      data('A', payload('e', T0)), mark('A', T0 + MINUTE), mark('A', T0)])
  with pytest.raises(ReplayError) as e:
    index_replay(str(replay))
  assert e.value.line == 3 and 'backwards' in e.value.reason


def _row(seq: int, step: int, arrived_at: float, value: float) -> tuple:
  """The ``seq``-th event's arrival, as ``fire_panes`` takes it."""
  return (step, arrived_at, value)


def test_the_trigger_along_the_timeline_early_on_time_then_one_late_pane_per_step():
  end = T0 + MINUTE
  # steps: 0 messages, 1 pt=10, 2 messages, 3 wm=end-1, 4 pt=25, 5 wm=end, 6 msgs, 7 msgs
  watermark_steps = [(3, end - 1), (5, end), (8, None)]
  processing_time_steps = [(1, 10.0), (4, 25.0)]
  rows = [_row(0, 0, 0.0, 1.0), _row(1, 2, 10.0, 2.0), _row(2, 6, 25.0, 4.0),
          _row(3, 6, 25.0, 8.0), _row(4, 7, 25.0, 16.0)]
  panes = fire_panes(rows, end, 10, watermark_steps, processing_time_steps)
  assert panes == [
      ('EARLY', (1, 1.0, 1.0, 1.0)),  # pt 10 >= 0 + 10
      ('EARLY', (2, 3.0, 1.0, 2.0)),  # pt 25 >= 10 + 10
      ('ON_TIME', (2, 3.0, 1.0, 2.0)),  # watermark reaches the end at step 5
      ('LATE', (4, 15.0, 1.0, 8.0)),  # both events of step 6 in one pane
      ('LATE', (5, 31.0, 1.0, 16.0)),
  ]
  assert [t for t, _ in fire_panes(rows, end, None, watermark_steps, processing_time_steps)] == [
      'ON_TIME', 'LATE', 'LATE']


def test_the_bulk_replay_evaluates_the_trigger_the_windows_declare():
  assert evaluated_early_firing(aggregate.pane_trigger(10), aggregate.PANE_ACCUMULATION) == 10
  assert evaluated_early_firing(aggregate.pane_trigger(None), aggregate.PANE_ACCUMULATION) is None
  for other, mode in [
      (trigger.AfterWatermark(late=trigger.AfterCount(2)), aggregate.PANE_ACCUMULATION),
      (trigger.AfterWatermark(early=trigger.AfterCount(5), late=trigger.AfterCount(1)),
       aggregate.PANE_ACCUMULATION),
      (trigger.AfterWatermark(), aggregate.PANE_ACCUMULATION),
      (trigger.AfterCount(1), aggregate.PANE_ACCUMULATION),
      (aggregate.pane_trigger(10), trigger.AccumulationMode.DISCARDING)]:
    with pytest.raises(ValueError, match='the bulk replay evaluates'):
      evaluated_early_firing(other, mode)


def test_a_changed_window_trigger_stops_the_bulk_replay_from_building(monkeypatch, tmp_path):
  monkeypatch.setattr(aggregate, 'pane_trigger', lambda early_firing_s: trigger.AfterWatermark(
      late=trigger.AfterCount(2)))
  index = index_replay(write_replay(str(tmp_path / 'replay.jsonl'), [data('A', payload('a', T0))]))
  with pytest.raises(ValueError, match='late=AfterCount\\(2\\)'):
    AggregateWindowsInBulk(window_spec(60, 30), None, index)


def test_a_window_whose_events_all_came_after_its_end_starts_with_a_late_pane():
  end = T0 + MINUTE
  panes = fire_panes([_row(0, 2, 0.0, 5.0)], end, 10, [(1, end + SECOND), (3, None)], [])
  assert panes == [('LATE', (1, 5.0, 5.0, 5.0))]


def _multiset(outputs, name):
  return sorted(json.dumps(o, sort_keys=True) for o in getattr(outputs, name))


@pytest.mark.parametrize('seed, early_firing_s', [(11, 10), (12, None)])
def test_bulk_equals_the_streaming_runner_pane_for_pane(tmp_path, seed, early_firing_s):
  replay = _generated(tmp_path, 1500, seed)
  with open(replay, encoding='utf-8') as f:
    lines = [line.rstrip('\n') for line in f]
  assert any('advance_processing_time' in line for line in lines)
  (tmp_path / 'stream').mkdir()
  (tmp_path / 'bulk').mkdir()
  streamed = run_replay(tmp_path / 'stream', lines, early_firing_s=early_firing_s)
  bulk = run_replay(tmp_path / 'bulk', lines, bulk=True, early_firing_s=early_firing_s)
  timings = {a['timing'] for a in streamed.aggregates}
  assert timings == ({'EARLY', 'ON_TIME', 'LATE'} if early_firing_s else {'ON_TIME', 'LATE'})
  assert bulk.accounting == streamed.accounting
  assert _multiset(bulk, 'aggregates') == _multiset(streamed, 'aggregates')
  assert _multiset(bulk, 'dead_letters') == _multiset(streamed, 'dead_letters')


def test_a_replay_too_large_for_eight_dedup_shards_gets_more_with_the_same_outputs(
    tmp_path, monkeypatch):
  assert bulk.shards_for(1) == bulk.shards_for(8 * bulk.ROWS_PER_SHARD) == 8
  assert bulk.shards_for(8 * bulk.ROWS_PER_SHARD + 1) == 9
  replay = _generated(tmp_path, 1500, seed=14)
  with open(replay, encoding='utf-8') as f:
    lines = [line.rstrip('\n') for line in f]
  (tmp_path / 'eight').mkdir()
  (tmp_path / 'many').mkdir()
  eight = run_replay(tmp_path / 'eight', lines, bulk=True)
  monkeypatch.setattr(bulk, 'ROWS_PER_SHARD', 100)  # 15 shards
  many = run_replay(tmp_path / 'many', lines, bulk=True)
  assert many.accounting == eight.accounting == reference.compute(replay, 60, 30).accounting
  assert eight.accounting['duplicate'] > 0
  assert _multiset(many, 'aggregates') == _multiset(eight, 'aggregates')
  assert _multiset(many, 'dead_letters') == _multiset(eight, 'dead_letters')


def test_the_bulk_cli_equals_the_contract_on_a_larger_replay(tmp_path):
  replay = _generated(tmp_path, 30000, seed=21, window_size_s=30, allowed_lateness_s=10)
  out = tmp_path / 'out'
  result = cli('run', '--replay-mode', 'bulk', '--source', f'replay:{replay}',
               '--window-size', '30', '--allowed-lateness', '10', '--output-dir', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  expected = reference.compute(replay, 30, 10)
  with open(out / 'accounting.json', encoding='utf-8') as f:
    assert json.load(f) == expected.accounting
  finals = final_panes(str(out / 'aggregates.jsonl'))
  assert {w: (p['count'], p['sum'], p['min'], p['max']) for w, p in finals.items()} == (
      expected.windows)
  with open(out / 'dead_letter.jsonl', encoding='utf-8') as f:
    dead = [json.loads(line) for line in f]
  assert letters(dead, 'too_late') == as_sent(expected.too_late)
  assert letters(dead, 'invalid') == as_sent(expected.invalid)
  assert os.path.exists(out / 'aggregates.sqlite')


def test_a_bad_line_stops_a_bulk_run_before_it_starts(tmp_path):
  replay = write_replay(tmp_path / 'r.jsonl', [data('A', payload('e', T0)), '{"source": 1}'])
  out = tmp_path / 'out'
  result = cli('run', '--replay-mode', 'bulk', '--source', f'replay:{replay}',
               '--output-dir', str(out))
  assert result.returncode == 2
  assert f'{replay}:2:' in result.stderr
  assert not out.exists()


@pytest.mark.parametrize('args, field', [
    (['--replay-mode', 'sideways'], '--replay-mode'),
    (['--replay-mode', 'bulk', '--source', 'pubsub:projects/p-1234/subscriptions/sub-a'],
     '--replay-mode'),
    (['--replay-mode', 'bulk', '--sample-memory-every', '3600'], '--sample-memory-every'),
    (['--replay-mode', 'bulk', '--rollup', '3600:600'], '--rollup'),
])
def test_bulk_settings_that_cannot_work_are_refused_naming_the_field(tmp_path, args, field):
  result = cli('run', '--output-dir', str(tmp_path / 'out'), *args)
  assert result.returncode == 2
  assert field in result.stderr


def test_probing_the_watermark_gives_what_the_replay_states_on_a_generated_replay(tmp_path):
  # The live-source path (timer probes whose floor rises as windows close) must
  # decide exactly as the replay's own watermarks do, over many windows.
  replay = _generated(tmp_path, 1500, seed=13)
  with open(replay, encoding='utf-8') as f:
    lines = [line.rstrip('\n') for line in f]
  (tmp_path / 'stated').mkdir()
  (tmp_path / 'probed').mkdir()
  stated = run_replay(tmp_path / 'stated', lines)
  probed = run_replay(tmp_path / 'probed', lines, arrival_watermarks=False)
  expected = reference.compute(replay, 60, 30)
  assert probed.accounting == stated.accounting == expected.accounting
  assert expected.accounting['too_late'] > 0
  assert _multiset(probed, 'aggregates') == _multiset(stated, 'aggregates')
  assert _multiset(probed, 'dead_letters') == _multiset(stated, 'dead_letters')


def _awkward_replay(tmp_path) -> str:
  """A generated replay with lines msgspec refuses and the standard library
  takes (a lone surrogate escape, an integer beyond 64 bits), blank and
  whitespace-only lines, and a CRLF ending."""
  replay = _generated(tmp_path, 900, seed=21)
  with open(replay, encoding='utf-8') as f:
    lines = f.read().splitlines()
  odd = [
      '{"source": "A", "data": "garbage \\ud800 lone surrogate"}',
      '',
      '   \t',
      '\x0c',
      '{"data": "{\\"event_id\\": \\"x\\"}", "source": "B"}\r',
      '{"source": "A", "data": "\\udc80\\ud83d\\ude00"}',
      '{"advance_processing_time": 100000000000000000000}',
  ]
  mixed = []
  for i, line in enumerate(lines):
    mixed.append(line)
    if i % 97 == 5:
      mixed.append(odd[i % len(odd)])
  path = str(tmp_path / 'awkward.jsonl')
  with open(path, 'w', encoding='utf-8', newline='') as f:
    f.write('\n'.join(mixed) + '\n')
  return path


@pytest.mark.parametrize('chunk_messages', [1, 50, 100000])
def test_chunks_read_as_columns_hold_what_a_line_by_line_read_holds(tmp_path, chunk_messages):
  replay = _awkward_replay(tmp_path)
  index = index_replay(replay, chunk_messages)
  for chunk in index.chunks:
    lines = list(read_chunk(replay, chunk))
    columns = read_chunk_columns(replay, chunk)
    assert len(columns) == len(lines) == chunk.messages
    assert [(columns.first + i, step, source, data) for i, (step, source, data) in enumerate(
        zip(columns.step, columns.source, columns.data))] == [
            (seq, step, source, data) for seq, step, _, _, source, data in lines]


@pytest.mark.parametrize('parts', [2, 3, 7])
def test_an_index_checked_in_parts_equals_one_checked_whole(tmp_path, parts):
  replay = _awkward_replay(tmp_path)
  whole, split = index_replay(replay, 200, parts=1), index_replay(replay, 200, parts=parts)
  assert any(c.first_message % 200 for c in split.chunks)  # a part starts a chunk of its own
  for field in ('sources', 'messages', 'watermark_steps', 'processing_time_steps', 'digest'):
    assert getattr(split, field) == getattr(whole, field), field
  assert split.arrivals.to_json_dict() == whole.arrivals.to_json_dict()
  assert [m for c in split.chunks for m in read_chunk(replay, c)] == [
      m for c in whole.chunks for m in read_chunk(replay, c)]


def test_a_bad_line_in_a_later_part_is_named_by_its_line_in_the_file(tmp_path):
  replay = _awkward_replay(tmp_path)
  with open(replay, encoding='utf-8') as f:
    lines = f.read().split('\n')
  bad = len(lines) * 3 // 4
  lines[bad] = '{"source": "A", "watermark": "soon"}'
  with open(replay, 'w', encoding='utf-8', newline='') as f:
    f.write('\n'.join(lines))
  for parts in (1, 2, 4):
    with pytest.raises(ReplayError) as e:
      index_replay(replay, parts=parts)
    assert e.value.line == bad + 1 and 'watermark' in e.value.reason


def test_lines_decoded_together_leave_out_only_what_msgspec_refuses():
  good = [b'{"source": "A", "data": "x"}', b'{"source": "B", "watermark": 5}',
          b'{"advance_processing_time": 1.5}']
  refused = [b'{"advance_processing_time": NaN}',  # malformed for msgspec: a byte position
             b'{"advance_processing_time": 1e400}',  # out of range: an element
             b'{"source": "A", "data": "\\ud800"}']  # a lone surrogate: read alone
  lines = [good[0], refused[0], good[1], good[2], refused[1], good[0], refused[2], good[1]]
  decoded = decode_lines(lines)
  assert [line is None for line in decoded] == [line in refused for line in lines]
  assert [(d.source, d.data, d.watermark) for d in decoded if d is not None] == [
      ('A', 'x', msgspec.UNSET), ('B', msgspec.UNSET, 5), (msgspec.UNSET,) * 3,
      ('A', 'x', msgspec.UNSET), ('B', msgspec.UNSET, 5)]


def test_the_bulk_shards_an_id_as_the_streaming_gate_does():
  ids = ['e1', 'g-60063', 'é-ü', '', 'x' * 200, '\U0001f600']
  # the same in every process and run: the crc32 of the id's UTF-8 bytes
  crc = [zlib.crc32(i.encode('utf-8')) % 57 for i in ids]
  assert stable_shards(ids, 57).tolist() == crc
  assert [stable_shard(i, 57) for i in ids] == crc
  assert all(type(stable_shard(i, 57)) is int for i in ids)  # a key the gate encodes as int
  assert stable_shards(ids, 1).tolist() == [0] * len(ids) == [stable_shard(i, 1) for i in ids]


@pytest.mark.parametrize('positions', [[], [3], [0, 2, 4], [0, 1, 2, 3, 4]])
def test_rows_taken_keep_each_event_with_its_columns(positions):
  rows = chunks.Rows(
      100, np.arange(5), np.array([0, 1, 0, 1, 0], dtype=np.int32), [('c', 'a'), ('c', 'b')],
      np.arange(5) * 1.5, np.arange(5) * 1000, [f'e{i}' for i in range(5)])
  taken = rows.take(np.array(positions, dtype=np.int64))
  assert taken.event_id == [f'e{i}' for i in positions]
  assert taken.value.tolist() == [i * 1.5 for i in positions]
  assert taken.event_time.tolist() == [i * 1000 for i in positions]
  assert taken.first == 100 + (positions[0] if positions else 0)
