"""One window size, end to end: route too late and deduplicate → aggregate.

A run computes its primary window size and any number of rollups (larger
window sizes) from the same parsed events; each is one ``Rollup`` with its own
allowed lateness, so each decides its own too-late set and keeps its own dedup
state. Nothing is shared between them but the input.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import apache_beam as beam

from transforms.flow.gate import RouteAndDeduplicate
from transforms.flow.aggregate import AggregateWindows
from transforms.rules.model import Event, WindowSpec


class RollupOutputs(NamedTuple):
  """What one window size makes of the events."""
  #: WindowAggregate, every pane (early, on time, late)
  aggregates: beam.PCollection
  #: DeadLetter with reason ``too_late`` (this window size's lateness)
  too_late: beam.PCollection
  #: DeadLetter with reason ``duplicate``: later copies of an admitted event_id
  duplicates: beam.PCollection
  #: Event, the copies counted into the aggregates
  aggregated: beam.PCollection


class Rollup(beam.PTransform):
  """Events to pane-aware aggregates of one fixed window size, with the
  events it did not aggregate (too late, duplicate) kept with their payloads.

  Returns a ``RollupOutputs``.
  """

  def __init__(self, window: WindowSpec, shards: int = 4,
               early_firing_s: Optional[int] = None):
    super().__init__()
    self._admit = RouteAndDeduplicate(window, shards)
    self._aggregate = AggregateWindows(window, early_firing_s)

  def expand(self, events: beam.PCollection[Event]) -> RollupOutputs:
    admitted = events | 'RouteLateAndDedup' >> self._admit
    aggregates = admitted.admitted | 'Aggregate' >> self._aggregate
    return RollupOutputs(
        aggregates, admitted.too_late, admitted.duplicates, admitted.admitted)
