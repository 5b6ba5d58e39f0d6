"""Tidemark's pipeline options, read by Beam's own option parser (so they work
from the CLI, from templates and from ``PipelineOptions`` in code alike)."""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions


class TidemarkOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
        '--source',
        help='Where events come from: replay:PATH (a replay file, contract section 2) '
        'or pubsub:[NAME=]projects/P/subscriptions/S[,...] (one subscription per '
        'source; NAME defaults to S).')
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
        '--pubsub-id-label', '--pubsub_id_label', dest='pubsub_id_label',
        help='Pub/Sub attribute for runner-side redelivery dedup (default: event_id '
        'on runners that support it, off on the DirectRunner; "none" to turn off).')
    parser.add_argument(
        '--expected-skew', '--expected_skew', dest='expected_skew', type=int,
        help='pubsub: how many seconds behind the wall clock event times may be when '
        'they arrive (lagging sources, publish delays). The DirectRunner\'s Pub/Sub '
        'watermark is the wall clock, so a skew above the allowed lateness loses '
        'events to too_late.')
    parser.add_argument(
        '--run-seconds', '--run_seconds', dest='run_seconds', type=int,
        help='Unbounded sources: stop the run after this many seconds of wall time '
        '(default: run until interrupted).')
