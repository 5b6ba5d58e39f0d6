"""One window size, end to end: route too late → deduplicate → aggregate.

A run computes its primary window size and any number of rollups (larger
window sizes) from the same parsed events; each is one ``Rollup`` with its own
allowed lateness, so each decides its own too-late set and keeps its own dedup
state. Nothing is shared between them but the input.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import apache_beam as beam

from transforms.aggregate import AggregateWindows
from transforms.dedup import DeduplicateEvents
from transforms.lateness import RouteTooLate
from transforms.model import DUPLICATE, DeadLetter, Event, window_spec
from transforms.parse import millis_to_timestamp


class RollupOutputs(NamedTuple):
  """What one window size makes of the events."""
  #: WindowAggregate, every pane (early, on time, late)
  aggregates: beam.PCollection
  #: DeadLetter with reason ``too_late`` (this window size's lateness)
  too_late: beam.PCollection
  #: DeadLetter with reason ``duplicate``: later copies of an accepted event_id
  duplicates: beam.PCollection
  #: Event, the copies counted into the aggregates
  aggregated: beam.PCollection


def _duplicate_record(spec):

  def record(event: Event) -> DeadLetter:
    start = spec.start(event.event_time)
    detail = (
        f'event_id {event.event_id!r} was already aggregated in window '
        f'[{millis_to_timestamp(start).to_rfc3339()}, '
        f'{millis_to_timestamp(start + spec.size_ms).to_rfc3339()})')
    return DeadLetter(DUPLICATE, event.source, event.data, detail)

  return record


class Rollup(beam.PTransform):
  """Events to pane-aware aggregates of one fixed window size, with the
  events it did not aggregate (too late, duplicate) kept with their payloads.

  Returns a ``RollupOutputs``.
  """

  def __init__(
      self,
      window_size_s: int,
      allowed_lateness_s: int,
      shards: int = 1,
      arrival_watermarks: bool = False,
      early_firing_s: Optional[int] = None):
    super().__init__()
    self._spec = window_spec(window_size_s, allowed_lateness_s)  # validates
    self._route = RouteTooLate(window_size_s, allowed_lateness_s, shards, arrival_watermarks)
    self._dedup = DeduplicateEvents(window_size_s, allowed_lateness_s)
    self._aggregate = AggregateWindows(window_size_s, allowed_lateness_s, early_firing_s)

  def expand(self, events: beam.PCollection[Event]) -> RollupOutputs:
    routed = events | 'RouteTooLate' >> self._route
    unique = routed.on_time | 'Deduplicate' >> self._dedup
    aggregates = unique.unique | 'Aggregate' >> self._aggregate
    duplicates = unique.duplicate | 'DuplicateRecords' >> beam.Map(
        _duplicate_record(self._spec)).with_output_types(DeadLetter)
    return RollupOutputs(aggregates, routed.too_late, duplicates, unique.unique)
