"""Tidemark's pipeline options, read by Beam's own option parser (so they work
from the CLI, from templates and from ``PipelineOptions`` in code alike)."""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions


class TidemarkOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
        '--source',
        help='Where events come from: replay:PATH (a replay file, contract section 2) or '
        'kafka:BOOTSTRAP/TOPIC[,TOPIC...] (a topic per source; NAME=TOPIC names the source).')
    parser.add_argument(
        '--window-size', '--window_size', dest='window_size', type=int,
        help='Fixed window size in whole seconds.')
    parser.add_argument(
        '--allowed-lateness', '--allowed_lateness', dest='allowed_lateness', type=int,
        help='Allowed lateness in whole seconds.')
    parser.add_argument(
        '--early-firing', '--early_firing', dest='early_firing', type=int,
        help='Emit an EARLY pane this many seconds of processing time after the '
        'first event of a window; 0 turns early panes off.')
    parser.add_argument(
        '--output-dir', '--output_dir', dest='output_dir',
        help='Folder for aggregates.jsonl, dead_letter.jsonl and accounting.json.')
    parser.add_argument(
        '--sqlite', dest='sqlite',
        help='SQLite file of final aggregates (default: OUTPUT_DIR/aggregates.sqlite; '
        '"none" to skip).')
    parser.add_argument(
        '--shards', dest='shards', type=int,
        help='Keys per window for too-late routing and dedup (parallelism).')
    parser.add_argument(
        '--kafka-expansion-service', '--kafka_expansion_service',
        dest='kafka_expansion_service',
        help='HOST:PORT of the Java expansion service for Kafka IO (default: the '
        'one scripts/flink.sh starts, localhost:18096).')
    parser.add_argument(
        '--kafka-max-records', '--kafka_max_records', dest='kafka_max_records', type=int,
        help='Stop each Kafka topic\'s read after this many records (a bounded read).')
    parser.add_argument(
        '--accounting-every', '--accounting_every', dest='accounting_every', type=int,
        help='Rewrite accounting.json every this many seconds of processing time '
        '(default: 5 for Kafka, at the end only for replays; 0: at the end only).')
