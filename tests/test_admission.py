"""The gate (too late, duplicate, admitted) on every path, with TestStream.

Each replay runs three ways (``run``): streaming with the watermark the replay
states, streaming as a live source whose watermark the gate learns from its own
timers, and in bulk. The asserts look at pane index and timing, the accounting
and the duplicates' records.
"""

from __future__ import annotations

import json
import os
import random

import apache_beam as beam
import pytest
from apache_beam.testing.test_stream import TestStream as ReplayedStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from conftest import (
    MINUTE, SECOND, T0, data, mark, panes_of, payload, streaming_pipeline)
from pipeline.readback.reconciliation import final_panes
from tools import reference
from transforms.rules.admission import AdmissionRules
from transforms.flow.gate import Grid, RouteAndDeduplicate
from transforms.rules.model import AGGREGATED, DUPLICATE, TOO_LATE, Event, window_spec

W0 = T0  # window [02:00, 02:01)
W1 = T0 + MINUTE
W2 = T0 + 2 * MINUTE


def test_a_redelivery_in_another_window_is_a_duplicate_until_the_first_copys_window_closes(
    run, tmp_path):
  lines = [
      data('A', payload('e1', W0 + 5 * SECOND, 1.0)),
      data('A', payload('e1', W1 + 5 * SECOND, 2.0)),  # W0 open: duplicate, in W1 though
      data('A', payload('e1', W2 + 5 * SECOND, 3.0)),  # still a duplicate, in W2
      mark('A', W1 + 30 * SECOND + 1),  # W0 closed (end + 30 s passed): e1 forgotten
      data('A', payload('e1', W1 + 10 * SECOND, 4.0)),  # judged afresh: admitted in W1
      data('A', payload('e1', W2 + 10 * SECOND, 8.0)),  # W1 open: a duplicate again
  ]
  out = run(lines, allowed_lateness_s=30)
  assert panes_of(out.aggregates, W0) == [(0, 'ON_TIME', 1, 1.0)]
  assert panes_of(out.aggregates, W1) == [(0, 'ON_TIME', 1, 4.0)]
  assert panes_of(out.aggregates, W2) == []
  assert out.accounting == dict(received=5, invalid=0, too_late=0, duplicate=3, aggregated=2)
  assert out.dead_letters == []
  expected = reference.compute(str(tmp_path / 'replay.jsonl'), 60, 30)
  assert expected.accounting == out.accounting


def test_a_duplicate_is_recorded_with_the_window_of_the_first_copy():
  first = Event('e1', 'finserve', 'AAPL', 1.0, W0 + 5 * SECOND, 'A', 'first copy')
  copy = Event('e1', 'finserve', 'AAPL', 2.0, W1 + 5 * SECOND, 'B', 'second copy', None,
               'kafka:t/0/7')
  stream = ReplayedStream().add_elements(
      [TimestampedValue(e, e.event_time / 1000) for e in (first, copy)]
  ).advance_watermark_to_infinity()
  with streaming_pipeline() as p:
    out = p | stream | RouteAndDeduplicate(window_spec(60, 30))
    assert_that(out.duplicates | beam.Map(tuple), equal_to([(
        DUPLICATE, 'B', 'second copy',
        "event_id 'e1' was already aggregated in window [2024-01-18T02:00:00Z, "
        '2024-01-18T02:01:00Z), which had not closed when this copy arrived',
        'kafka:t/0/7')]))
    assert_that(out.admitted | 'Ids' >> beam.Map(lambda e: e.data), equal_to(['first copy']),
                label='admitted')


def test_after_a_jump_of_many_windows_old_events_are_too_late_and_recent_ones_late(run):
  jump = 500 * MINUTE  # 500 windows in one step: the ladder catches up in ~9 rounds
  lines = [
      data('A', payload('first', W0 + SECOND)),
      mark('A', W0 + jump),
      data('A', payload('old', W0 + 400 * MINUTE + SECOND, 10.0)),
      data('A', payload('recent', W0 + jump - 50 * SECOND, 5.0)),  # closes at jump + 30 s
      mark('A', W0 + jump + 10 * SECOND),
      data('A', payload('now', W0 + jump + 20 * SECOND, 2.0)),
  ]
  out = run(lines, allowed_lateness_s=30)
  assert panes_of(out.aggregates, W0) == [(0, 'ON_TIME', 1, 1.0)]
  assert panes_of(out.aggregates, W0 + jump - MINUTE) == [(0, 'LATE', 1, 5.0)]
  assert panes_of(out.aggregates, W0 + jump) == [(0, 'ON_TIME', 1, 2.0)]
  assert [(d['reason'], json.loads(d['data'])['event_id']) for d in out.dead_letters] == [
      ('too_late', 'old')]
  assert out.accounting == dict(received=4, invalid=0, too_late=1, duplicate=0, aggregated=3)


def _random_replay(seed: int, messages: int = 400) -> list:
  """Redeliveries across windows, stragglers, two sources whose watermarks
  advance unevenly: every rule of section 3 in play at once."""
  rng = random.Random(seed)
  lines, marks, clock = [], {'A': None, 'B': None}, T0
  for _ in range(messages):
    clock += rng.randrange(0, 2 * SECOND)
    source = rng.choice('AB')
    if rng.random() < 0.08:
      marks[source] = max(marks[source] or 0, clock - rng.randrange(0, 40 * SECOND))
      lines.append(mark(source, marks[source]))
    event_id = f'e{rng.randrange(messages // 3)}'  # about three copies of every id
    t = clock - rng.choice((0, 5 * SECOND, 45 * SECOND, 3 * MINUTE))
    lines.append(data(source, payload(event_id, t, float(rng.randrange(-5, 6)),
                                      key=rng.choice(('AAPL', 'MSFT')))))
  return lines


@pytest.mark.parametrize('seed', [1, 2])
def test_random_traffic_matches_the_reference_on_every_path(run, tmp_path, seed):
  out = run(_random_replay(seed), window_size_s=30, allowed_lateness_s=60)
  expected = reference.compute(str(tmp_path / 'replay.jsonl'), 30, 60)
  assert out.accounting == expected.accounting
  assert expected.accounting['duplicate'] > 20 and expected.accounting['too_late'] > 5
  finals = {w: (p['count'], p['sum'], p['min'], p['max'])
            for w, p in final_panes(os.path.join(str(tmp_path), 'out', 'aggregates.jsonl'))
            .items()}
  assert finals == expected.windows


def test_shards_do_not_change_what_the_gate_decides():
  spec_rules = AdmissionRules(window_spec(60, 30))
  events = [
      Event(f'e{i % 7}', 'finserve', 'AAPL', 1.0, t, 'A', payload(f'e{i % 7}', t))
      for i, t in enumerate(T0 + (i * 7919) % (3 * MINUTE) for i in range(60))
  ]

  def gate(shards: int):
    stream = ReplayedStream().add_elements(
        [TimestampedValue(e, e.event_time / 1000) for e in events[:30]]
    ).advance_watermark_to((T0 + MINUTE + 30 * SECOND + 1) / 1000).add_elements(
        [TimestampedValue(e, e.event_time / 1000) for e in events[30:]]
    ).advance_watermark_to_infinity()
    with streaming_pipeline() as p:
      out = p | stream | RouteAndDeduplicate(window_spec(60, 30), shards=shards)

      def ids(pc, label):
        return pc | label >> beam.Map(
            lambda x: getattr(x, 'event_id', None) or json.loads(x.data)['event_id'])

      assert_that(ids(out.admitted, 'A'), equal_to(expected[AGGREGATED]), label='admitted')
      assert_that(ids(out.too_late, 'T'), equal_to(expected[TOO_LATE]), label='too_late')
      assert_that(ids(out.duplicates, 'D'), equal_to(expected[DUPLICATE]), label='dups')

  # What the rules say, event by event, under the watermark the stream states.
  expected = {AGGREGATED: [], TOO_LATE: [], DUPLICATE: []}
  first = {}
  for i, e in enumerate(events):
    known = None if i < 30 else T0 + MINUTE + 30 * SECOND + 1
    if e.event_id in first and known is not None and first[e.event_id] <= known:
      del first[e.event_id]
    outcome = spec_rules.decide(e.event_time, known, first.get(e.event_id))
    if outcome == AGGREGATED:
      first[e.event_id] = spec_rules.spec.closing(e.event_time)
    expected[outcome].append(e.event_id)
  assert expected[TOO_LATE] and expected[DUPLICATE]
  for shards in (1, 4):
    gate(shards)


def test_the_ladder_catches_up_in_logarithmically_many_rounds():
  grid = Grid(window_spec(10, 5))
  for closed, target in ((grid.first, grid.first + 1), (grid.first + 3, grid.first + 1000),
                         (grid.first, grid.last - 7), (grid.last - 3, grid.last + 50)):
    rounds, c = 0, closed
    while c < min(target, grid.last):
      # One watermark round: every armed rung at or below the target fires.
      fired = [grid.rung(c, j) for j in range(grid.rungs) if grid.rung(c, j) <= target]
      assert fired, 'rung 0 is always the next window'
      c = max(fired)
      rounds += 1
    assert c == min(target, grid.last)
    assert rounds <= (target - closed).bit_length() + 1


def test_rules_at_the_closing_instant_and_after():
  rules = AdmissionRules(window_spec(60, 30))
  closing = rules.spec.closing(W0)
  assert not rules.too_late(W0 + 1, None)
  assert not rules.too_late(W0 + 1, closing - 1)
  assert rules.too_late(W0 + 1, closing)
  assert rules.duplicate(closing, None) and rules.duplicate(closing, closing - 1)
  assert not rules.duplicate(closing, closing) and not rules.duplicate(None, None)
