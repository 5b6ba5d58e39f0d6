"""``AwaitCheckpoint``: elements pass on only once the runner has made them
durable, so what a sink writes never has to be taken back.

After a failure a checkpointing runner (Flink) restores its state and replays
its input from the last checkpoint. Everything computed since then is computed
again, and need not come out the same: an accumulating window fires its panes
when bundles end, so the replayed run may fire fewer, fuller panes under the
same pane indices. A sink that had written the lost run's panes would keep a
higher index of a smaller pane. Beam's answer is a DoFn that *requires stable
input*: the runner buffers its input and hands it over only after the
checkpoint that holds it completes (Flink: ``BufferingDoFnRunner``); after a
restore the buffered elements are handed over again, unchanged. Downstream of
this step a sink sees each element of one history only, perhaps twice, never
a different one, so an idempotent write (the pane-aware upsert, the
replace-whole-file accounting) is exactly once.

The price is latency: an element waits for the next completed checkpoint
(at most one checkpoint interval). A writer that needs no single history can
skip the wait: PostgreSQL's upsert taking panes in the order they fired
(``UpsertPostgres(in_fire_order=True)``) ends with the restored history's. Runners that do not checkpoint (the
DirectRunner) do not support the requirement; use it only when the run is
checkpointed.
"""

from __future__ import annotations

from typing import Iterable

import apache_beam as beam
from apache_beam.portability import common_urns


class _PassFn(beam.DoFn):

  def process(self, element) -> Iterable:
    yield element


class _StableParDo(beam.ParDo):
  """A ParDo whose payload declares ``requires_stable_input`` (Beam Python has
  no decorator for it; the field and the requirement are the runner API's)."""

  def to_runner_api_parameter(self, context, **extra_kwargs):
    urn, payload = super().to_runner_api_parameter(context, **extra_kwargs)
    payload.requires_stable_input = True
    context.add_requirement(common_urns.requirements.REQUIRES_STABLE_INPUT.urn)
    return urn, payload


class AwaitCheckpoint(beam.PTransform):
  """Passes every element on, once the checkpoint that holds it is complete.

  The runner buffers a whole fused stage's input, so the step first moves its
  elements to a stage of their own (a Reshuffle): fused into the stage of the
  gate or of a source, it would hold back everything those do as well.
  """

  def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
    return (
        pcoll
        | 'OwnStage' >> beam.Reshuffle()
        | 'Stable' >> _StableParDo(_PassFn()).with_output_types(pcoll.element_type))
