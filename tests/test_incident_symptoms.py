"""One test per symptom of the incident, on the real pipeline with TestStream.

Each replay is a TestStream (watermark steps, processing-time steps, late
arrivals) executed by the streaming DirectRunner; the asserts look at the pane
index and timing, not only the figures.
"""

from apache_beam.testing.util import assert_that, equal_to

from conftest import MINUTE, SECOND, T0, as_sent, data, letters, mark, panes_of, payload, tick
from transforms.rules.model import WindowAggregate

W0 = T0  # window [02:00, 02:01)
W1 = T0 + MINUTE  # window [02:01, 02:02)


def test_event_exactly_on_a_boundary_lands_only_in_the_window_it_starts(run):
  lines = [
      data('A', payload('on-boundary', W1)),  # exactly 02:01:00.000
      data('A', payload('just-before', W1 - 1)),
      mark('A', W1 + 2 * MINUTE),
  ]

  def check(built):
    assert_that(
        built.aggregates,
        equal_to([
            WindowAggregate('finserve', 'AAPL', W0, W1, 1, 1.0, 1.0, 1.0, 0, 'ON_TIME'),
            WindowAggregate('finserve', 'AAPL', W1, W1 + MINUTE, 1, 1.0, 1.0, 1.0, 0,
                            'ON_TIME'),
        ]))

  out = run(lines, check=check)
  assert out.accounting == dict(
      received=2, invalid=0, too_late=0, duplicate=0, aggregated=2)


def test_late_event_within_lateness_yields_a_late_pane_with_accumulated_figures(run):
  lines = [
      data('A', payload('e1', W0 + 10 * SECOND, 2.0)),
      data('A', payload('e2', W0 + 20 * SECOND, 3.0)),
      mark('A', W1 + 10 * SECOND),  # past the end: ON_TIME pane
      data('A', payload('late', W0 + 59 * SECOND, 5.0)),  # 10 s late, lateness 30 s
      mark('A', W1 + 20 * SECOND),
      data('A', payload('later', W0 + 1 * SECOND, -1.0)),  # still within lateness
  ]
  out = run(lines, allowed_lateness_s=30)
  assert panes_of(out.aggregates, W0) == [
      (0, 'ON_TIME', 2, 5.0),
      (1, 'LATE', 3, 10.0),
      (2, 'LATE', 4, 9.0),
  ]
  final = max((a for a in out.aggregates if a['window_start'] == W0),
              key=lambda a: a['pane_index'])
  assert (final['min'], final['max']) == (-1.0, 5.0)
  assert out.dead_letters == []
  assert out.accounting['aggregated'] == 4


def test_event_past_the_allowed_lateness_goes_to_the_dead_letter(run):
  too_late = payload('too-late', W0 + 30 * SECOND, 100.0)
  lines = [
      data('A', payload('e1', W0 + 10 * SECOND)),
      mark('A', W1 + 30 * SECOND + 1),  # 1 ms past end + lateness: closed
      data('A', too_late),
  ]
  out = run(lines, allowed_lateness_s=30)
  assert panes_of(out.aggregates, W0) == [(0, 'ON_TIME', 1, 1.0)]
  assert [(d['reason'], d['source'], d['data']) for d in out.dead_letters] == [
      ('too_late', 'A', too_late)]
  assert 'closed at 2024-01-18T02:01:30' in out.dead_letters[0]['detail']
  assert out.accounting == dict(
      received=2, invalid=0, too_late=1, duplicate=0, aggregated=1)


def test_at_exactly_end_plus_lateness_the_window_is_still_open(run):
  # Beam Python's rule: a window expires once the watermark is strictly past
  # end + lateness, so an event arriving at exactly that instant still counts.
  lines = [
      data('A', payload('e1', W0 + 10 * SECOND)),
      mark('A', W1 + 30 * SECOND),
      data('A', payload('last-chance', W0 + 50 * SECOND)),
  ]
  out = run(lines, allowed_lateness_s=30)
  assert panes_of(out.aggregates, W0) == [(0, 'ON_TIME', 1, 1.0), (1, 'LATE', 2, 2.0)]
  assert out.accounting['too_late'] == 0


def test_first_event_of_a_window_that_already_closed_is_too_late(run):
  # No event of [02:00, 02:01) arrived before its window closed: the first one
  # that does must still be caught, not dropped silently by the GroupByKey.
  stray = payload('stray', W0 + 5 * SECOND)
  lines = [
      data('A', payload('e1', W1 + 5 * SECOND)),
      mark('A', W1 + 45 * SECOND),  # [02:00, 02:01) closed at 02:01:30
      data('A', stray),
      data('A', payload('e2', W1 + 6 * SECOND)),  # same batch, open window
  ]
  out = run(lines, allowed_lateness_s=30)
  assert [d['data'] for d in out.dead_letters] == [stray]
  assert panes_of(out.aggregates, W1) == [(0, 'ON_TIME', 2, 2.0)]
  assert out.accounting == dict(
      received=3, invalid=0, too_late=1, duplicate=0, aggregated=2)


def test_stragglers_after_a_window_was_freed_are_still_too_late(run):
  lines = [
      data('A', payload('e1', W0 + 1 * SECOND)),
      mark('A', W1 + 31 * SECOND),  # window state freed here
      data('A', payload('s1', W0 + 2 * SECOND)),
      mark('A', W1 + 5 * MINUTE),
      data('A', payload('s2', W0 + 3 * SECOND)),
  ]
  out = run(lines, allowed_lateness_s=30)
  assert sorted(d['reason'] for d in out.dead_letters) == ['too_late', 'too_late']
  assert panes_of(out.aggregates, W0) == [(0, 'ON_TIME', 1, 1.0)]


def test_a_lagging_source_holds_the_watermark_back_for_everyone(run):
  # Sources A and B are at 02:05; C is still at 02:00:10. The pipeline
  # watermark is C's, so A's and B's events for 02:00 are on time, not late.
  lines = [
      mark('A', T0 + 5 * MINUTE),
      mark('B', T0 + 5 * MINUTE),
      mark('C', T0 + 10 * SECOND),
      data('A', payload('a', W0 + 30 * SECOND, 1.0)),
      data('B', payload('b', W0 + 40 * SECOND, 2.0)),
      data('C', payload('c', W0 + 15 * SECOND, 4.0)),
      mark('C', W1 + 1),  # now the window [02:00, 02:01) is complete
      data('A', payload('a-late', W0 + 50 * SECOND, 8.0)),
  ]
  out = run(lines, allowed_lateness_s=30)
  assert out.dead_letters == []
  assert panes_of(out.aggregates, W0) == [(0, 'ON_TIME', 3, 7.0), (1, 'LATE', 4, 15.0)]


def test_early_panes_fire_on_processing_time_then_the_on_time_pane(run):
  lines = [
      mark('A', W0),
      data('A', payload('e1', W0 + 1 * SECOND, 1.0)),
      tick(11),  # early firing after 10 s of processing time
      data('A', payload('e2', W0 + 2 * SECOND, 2.0)),
      tick(11),
      mark('A', W1),
  ]
  out = run(lines, early_firing_s=10)
  assert panes_of(out.aggregates, W0) == [
      (0, 'EARLY', 1, 1.0),
      (1, 'EARLY', 2, 3.0),
      (2, 'ON_TIME', 2, 3.0),
  ]


def test_redelivered_events_count_once(run):
  first = payload('same', W0 + 5 * SECOND, 7.0)
  lines = [
      data('A', first),
      data('A', first),  # redelivered in the same batch
      mark('A', W0 + 30 * SECOND),
      data('B', first),  # and again later, through another source
      mark('A', W1 + 1),
      mark('B', W1 + 1),
      data('A', first),  # and once more, late but within lateness
  ]
  out = run(lines)
  assert panes_of(out.aggregates, W0) == [(0, 'ON_TIME', 1, 7.0)]
  assert out.accounting == dict(
      received=4, invalid=0, too_late=0, duplicate=3, aggregated=1)


def test_the_end_of_the_replay_closes_every_window(run):
  lines = [data('A', payload(f'e{i}', W0 + i * MINUTE)) for i in range(3)]
  out = run(lines)  # no watermark line at all: only the end-of-file flush
  assert sorted((a['window_start'], a['pane_index'], a['timing']) for a in out.aggregates) == [
      (W0 + i * MINUTE, 0, 'ON_TIME') for i in range(3)]


def test_garbage_of_every_kind_goes_to_the_dead_letter_and_nothing_crashes(run):
  from tools.traffic import _garbage
  garbage = [_garbage(None, n, W0 + n) for n in range(20)]
  lines = [data('A', g) for g in garbage] + [data('B', payload('ok', W0 + 1))]
  out = run(lines)
  assert letters(out.dead_letters, 'invalid') == as_sent(('A', g) for g in garbage)
  assert {d['reason'] for d in out.dead_letters} == {'invalid'}
  assert all(d['source'] == 'A' and d['detail'] for d in out.dead_letters)
  assert out.accounting == dict(
      received=21, invalid=20, too_late=0, duplicate=0, aggregated=1)
