"""Tidemark's pipeline options, read by Beam's own option parser (so they work
from the CLI, from templates and from ``PipelineOptions`` in code alike)."""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions


class TidemarkOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):

    def option(dest: str, **kwargs) -> None:
      """``--dest-with-dashes``, also spelled ``--dest_with_underscores`` as Beam's
      own options are."""
      flags = ['--' + dest.replace('_', '-')]
      if '_' in dest:
        flags.append('--' + dest)
      parser.add_argument(*flags, dest=dest, **kwargs)

    option('source',
        help='Where events come from: replay:PATH (a replay file, contract section 2), '
        'pubsub:[NAME=]projects/P/subscriptions/S[,...] (one subscription per source; '
        'NAME defaults to S) or kafka:BOOTSTRAP/TOPIC[,NAME=TOPIC...] (a topic per source).')
    option('window_size', type=int,
        help='Fixed window size in whole seconds.')
    option('allowed_lateness', type=int,
        help='Allowed lateness in whole seconds.')
    option('early_firing', type=int,
        help='Emit an EARLY pane this many seconds of processing time after the '
        'first event of a window; 0 turns early panes off.')
    option('rollup', action='append',
        help='SIZE:LATENESS (whole seconds): also aggregate the same events in windows of '
        'SIZE, a multiple of --window-size, with their own allowed lateness, into '
        'OUTPUT_DIR/rollup-SIZEs/; OUTPUT_DIR/reconciliation.json then shows each rollup '
        'window equals the windows inside it, event by event. Repeat the flag or '
        'separate with commas for several.')
    option('output_dir', help='Folder for aggregates.jsonl, dead_letter.jsonl and accounting.json.')
    option('sqlite', help='SQLite file of final aggregates (default: OUTPUT_DIR/aggregates.sqlite; '
        '"none" to skip).')
    option('sample_memory_every', type=int,
        help='Write the worker RSS to OUTPUT_DIR/memory.jsonl each time the watermark '
        'passes a multiple of this many seconds of event time (soak benchmarks).')
    option('shards', type=int,
        help='Keys per window for too-late routing and dedup (parallelism).')
    # Sinks: where final aggregates and dead letters go besides the local files.
    option('sink', help='Database for final aggregates and dead letters, besides the local files: '
        'files (none, the default), postgres or bigquery.')
    option('customer_id', help='Scope the database sink to this customer: rows of any other customer are '
        'refused (not written, listed in OUTPUT_DIR/refused.jsonl).')
    option('postgres_dsn', help='--sink postgres: libpq connection string or URI (a password may come '
        'from PGPASSWORD or ~/.pgpass instead).')
    option('postgres_table', help='--sink postgres: aggregates table (default aggregates), created if missing.')
    option('postgres_dead_letter_table', help='--sink postgres: dead-letter table (default dead_letters), created if missing.')
    option('bigquery_table', help='--sink bigquery: aggregates table [PROJECT:]DATASET.TABLE.')
    option('bigquery_dead_letter_table', help='--sink bigquery: dead-letter table [PROJECT:]DATASET.TABLE (also gets rows '
        'BigQuery refuses).')
    option('bigquery_expansion_service', help='--sink bigquery: host:port of a running GCP expansion service (default: '
        'Beam starts its own).')
    option('aggregates_topic', help='Also publish every pane (early, on time, late) as contract JSON to a topic: '
        'kafka:BOOTSTRAP/TOPIC (record key the customer id) or '
        'pubsub:projects/P/topics/T (attributes customer_id, pane_index, window_start). '
        'A pane log: consumers keep the highest pane_index per window.')
    option('pubsub_id_label', help='Pub/Sub attribute for runner-side redelivery dedup (default: event_id '
        'on runners that support it, off on the DirectRunner; "none" to turn off).')
    option('expected_skew', type=int,
        help='pubsub: how many seconds behind the wall clock event times may be when '
        'they arrive (lagging sources, publish delays). The DirectRunner\'s Pub/Sub '
        'watermark is the wall clock, so a skew above the allowed lateness loses '
        'events to too_late.')
    option('run_seconds', type=int,
        help='Unbounded sources: stop the run after this many seconds of wall time '
        '(default: run until interrupted).')
    option('replay_mode',
        help='replay sources: stream (the file as a TestStream on a streaming runner: '
        'watermarks advance and triggers fire as they would live) or bulk (the whole file '
        'at once, in chunks, on a batch runner, the same rules applied along the '
        'replay\'s timeline: the same outputs, much faster). Default: bulk on the '
        'DirectRunner (stream when --sample-memory-every or --rollup need it), stream '
        'on other runners.')
    option('kafka_expansion_service', help='HOST:PORT of the Java expansion service for Kafka IO (default: the '
        'one scripts/flink.sh starts, localhost:18096).')
    option('kafka_max_records', type=int,
        help='Stop each Kafka topic\'s read after this many records (a bounded read).')
