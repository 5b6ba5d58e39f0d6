"""Each composite on its own, in the style of Beam's own transform tests: a
TestStream on the streaming DirectRunner (which executes it) and assert_that
on the composite's own outputs, pane timing and index included.

End-to-end runs that read the sink files back are in the other test modules.
"""

from __future__ import annotations

import json

import apache_beam as beam
from apache_beam.testing.test_stream import TestStream as ReplayedStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from conftest import MINUTE, SECOND, T0, payload, streaming_pipeline
from transforms.flow.accounting import CountOutcomes
from transforms.flow.aggregate import AggregateWindows
from transforms.rules.model import INVALID, Event, RawMessage, WindowAggregate, window_spec
from transforms.flow.parse import ParseEvents
from transforms.flow.rollup import Rollup


def _event(event_id: str, event_time: int, value: float, key: str = 'AAPL') -> Event:
  body = payload(event_id, event_time, value, key=key)
  return Event(event_id, 'finserve', key, value, event_time, 'A', body)


def _stamped(*events: Event):
  return [TimestampedValue(e, e.event_time / 1000) for e in events]


def _pane(start: int, count: int, total: float, low: float, high: float, index: int,
          timing: str, key: str = 'AAPL') -> WindowAggregate:
  return WindowAggregate('finserve', key, start, start + MINUTE, count, total, low, high,
                         index, timing)


def test_parse_events_stamps_valid_payloads_and_dead_letters_the_rest():
  good = payload('e1', T0 + 5 * SECOND, 2.5)
  stream = (ReplayedStream()
            .add_elements([RawMessage('A', good), RawMessage('B', '{"event_id": "e2"'),
                           RawMessage('A', json.dumps({'event_id': 'e3'}))])
            .advance_watermark_to_infinity())
  with streaming_pipeline() as p:
    parsed = p | stream | ParseEvents()
    assert_that(parsed.events | beam.Map(lambda e, t=beam.DoFn.TimestampParam: (e, t.micros)),
                equal_to([(Event('e1', 'finserve', 'AAPL', 2.5, T0 + 5 * SECOND, 'A', good),
                           (T0 + 5 * SECOND) * 1000)]), label='events')
    assert_that(parsed[INVALID] | beam.Map(lambda d: (d.reason, d.source, d.data[:10])),
                equal_to([(INVALID, 'B', '{"event_id'), (INVALID, 'A', '{"event_id')]),
                label='invalid')


def test_aggregate_windows_fires_early_on_time_and_late_panes_that_accumulate():
  stream = (ReplayedStream()
            .advance_watermark_to(T0 / 1000)
            .add_elements(_stamped(_event('a', T0 + 1 * SECOND, 1.0)))
            .advance_processing_time(11)  # early firing 10 s after the pane's first event
            .add_elements(_stamped(_event('b', T0 + 2 * SECOND, 2.0)))
            .advance_watermark_to((T0 + MINUTE) / 1000)  # the window's end: on time
            .add_elements(_stamped(_event('c', T0 + 3 * SECOND, 4.0)))  # late, in lateness
            .advance_watermark_to((T0 + MINUTE + 10 * SECOND) / 1000)
            .add_elements(_stamped(_event('d', T0 + 4 * SECOND, -8.0)))  # late again
            .advance_watermark_to_infinity())
  with streaming_pipeline() as p:
    panes = p | stream | AggregateWindows(window_spec(60, 30), early_firing_s=10)
    assert_that(panes, equal_to([
        _pane(T0, 1, 1.0, 1.0, 1.0, 0, 'EARLY'),
        _pane(T0, 2, 3.0, 1.0, 2.0, 1, 'ON_TIME'),
        _pane(T0, 3, 7.0, 1.0, 4.0, 2, 'LATE'),
        _pane(T0, 4, -1.0, -8.0, 4.0, 3, 'LATE'),
    ]))


def test_aggregate_windows_keeps_keys_and_windows_apart():
  stream = (ReplayedStream()
            .add_elements(_stamped(_event('a', T0 + 59 * SECOND, 1.0),
                                   _event('b', T0 + MINUTE, 2.0),  # the next window: half-open
                                   _event('c', T0 + 59 * SECOND, 4.0, key='MSFT')))
            .advance_watermark_to_infinity())
  with streaming_pipeline() as p:
    panes = p | stream | AggregateWindows(window_spec(60, 30))
    assert_that(panes, equal_to([
        _pane(T0, 1, 1.0, 1.0, 1.0, 0, 'ON_TIME'),
        _pane(T0 + MINUTE, 1, 2.0, 2.0, 2.0, 0, 'ON_TIME'),
        _pane(T0, 1, 4.0, 4.0, 4.0, 0, 'ON_TIME', key='MSFT'),
    ]))


def test_rollup_routes_too_late_and_duplicates_before_it_aggregates():
  stream = (ReplayedStream()
            .advance_watermark_to(T0 / 1000)
            .add_elements(_stamped(_event('a', T0 + 1 * SECOND, 1.0),
                                   _event('a', T0 + 2 * SECOND, 5.0)))  # a redelivery
            .advance_watermark_to((T0 + 2 * MINUTE) / 1000)  # past end + 30 s: closed
            .add_elements(_stamped(_event('z', T0 + 3 * SECOND, 9.0)))  # too late
            .advance_watermark_to_infinity())
  with streaming_pipeline() as p:
    out = p | stream | Rollup(window_spec(60, 30), shards=2)
    assert_that(out.aggregates, equal_to([_pane(T0, 1, 1.0, 1.0, 1.0, 0, 'ON_TIME')]),
                label='aggregates')
    assert_that(out.aggregated | 'AggregatedIds' >> beam.Map(lambda e: e.event_id),
                equal_to(['a']), label='aggregated')
    assert_that(out.duplicates | 'DuplicateIds' >> beam.Map(
        lambda d: (d.reason, json.loads(d.data)['value'])), equal_to([('duplicate', 5.0)]),
                label='duplicates')
    assert_that(out.too_late | 'TooLateIds' >> beam.Map(
        lambda d: (d.reason, json.loads(d.data)['event_id'])), equal_to([('too_late', 'z')]),
                label='too_late')


def test_count_outcomes_counts_each_category_once_the_input_ends():
  messages = ReplayedStream().add_elements(['m1', 'm2', 'm3']).advance_watermark_to_infinity()
  with streaming_pipeline() as p:
    received = p | 'Received' >> messages
    invalid = received | 'OneInvalid' >> beam.Filter(lambda m: m == 'm2')
    aggregated = received | 'TwoAggregated' >> beam.Filter(lambda m: m != 'm2')
    accounting = {'received': received, 'invalid': invalid,
                  'aggregated': aggregated} | CountOutcomes()
    assert_that(accounting, equal_to([
        {'received': 3, 'invalid': 1, 'too_late': 0, 'duplicate': 0, 'aggregated': 2}]))
