"""The stateless ceiling: read → parse → window → combine → write, nothing else.

The same sources, parsing, windowing and aggregation as the pipeline, without
too-late routing, dedup, dead letters or accounting: what the stack does with
one keyed exchange. ``bench drain`` runs it beside the pipeline on the same
backlog and runner, to price the exactness machinery.

  python -m tools.bench.ceiling --source kafka:BOOTSTRAP/TOPIC,... --kafka-max-records N
      --output-dir DIR [--window-size W --allowed-lateness L] [Beam options]
  python -m tools.bench.ceiling --source pubsub:SUBSCRIPTION,... --pubsub-max-messages N ...
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.launch.build import read_source
from pipeline.settings.config import RunConfig
from pipeline.launch.run import settle_live_options
from transforms.flow.aggregate import AggregateWindows
from transforms.flow.parse import ParseEvents
from transforms.connectors.writers import WriteJsonLines


def build_ceiling(p: beam.Pipeline, config: RunConfig) -> None:
  """The pipeline's source (Kafka or Pub/Sub, as ``--source`` says), parsing
  and windowed aggregation, written as JSON lines."""
  (p
   | 'Read' >> read_source(config)
   | 'Parse' >> ParseEvents()).events | 'Aggregate' >> AggregateWindows(
       config.window, config.early_firing_s) | 'Write' >> WriteJsonLines(config.aggregates_path)


def main(argv: Optional[List[str]] = None) -> int:
  options = PipelineOptions(sys.argv[1:] if argv is None else argv)
  options.view_as(StandardOptions).streaming = True
  config = RunConfig.from_options(options)
  if not config.unbounded:
    print('ceiling: --source must be kafka:... or pubsub:...', file=sys.stderr)
    return 2
  settle_live_options(options, config)
  os.makedirs(config.output_dir, exist_ok=True)
  p = beam.Pipeline(options=options)
  build_ceiling(p, config)
  p.run().wait_until_finish()
  return 0


if __name__ == '__main__':
  sys.exit(main())
