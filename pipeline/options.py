"""Tidemark's pipeline options, read by Beam's own option parser (so they work
from the CLI, from templates and from ``PipelineOptions`` in code alike)."""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions


class TidemarkOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
        '--source',
        help='Where events come from: replay:PATH (a replay file, contract section 2), '
        'pubsub:[NAME=]projects/P/subscriptions/S[,...] (one subscription per source; '
        'NAME defaults to S) or kafka:BOOTSTRAP/TOPIC[,NAME=TOPIC...] (a topic per source).')
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
        '--sample-memory-every', '--sample_memory_every', dest='sample_memory_every',
        type=int,
        help='Write the worker RSS to OUTPUT_DIR/memory.jsonl each time the watermark '
        'passes a multiple of this many seconds of event time (soak benchmarks).')
    parser.add_argument(
        '--shards', dest='shards', type=int,
        help='Keys per window for too-late routing and dedup (parallelism).')
    # Sinks: where final aggregates and dead letters go besides the local files.
    parser.add_argument(
        '--sink', dest='sink',
        help='Database for final aggregates and dead letters, besides the local files: '
        'files (none, the default), postgres or bigquery.')
    parser.add_argument(
        '--customer-id', '--customer_id', dest='customer_id',
        help='Scope the database sink to this customer: rows of any other customer are '
        'refused (not written, listed in OUTPUT_DIR/refused.jsonl).')
    parser.add_argument(
        '--postgres-dsn', '--postgres_dsn', dest='postgres_dsn',
        help='--sink postgres: libpq connection string or URI (a password may come '
        'from PGPASSWORD or ~/.pgpass instead).')
    parser.add_argument(
        '--postgres-table', '--postgres_table', dest='postgres_table',
        help='--sink postgres: aggregates table (default aggregates), created if missing.')
    parser.add_argument(
        '--postgres-dead-letter-table', '--postgres_dead_letter_table',
        dest='postgres_dead_letter_table',
        help='--sink postgres: dead-letter table (default dead_letters), created if missing.')
    parser.add_argument(
        '--bigquery-table', '--bigquery_table', dest='bigquery_table',
        help='--sink bigquery: aggregates table [PROJECT:]DATASET.TABLE.')
    parser.add_argument(
        '--bigquery-dead-letter-table', '--bigquery_dead_letter_table',
        dest='bigquery_dead_letter_table',
        help='--sink bigquery: dead-letter table [PROJECT:]DATASET.TABLE (also gets rows '
        'BigQuery refuses).')
    parser.add_argument(
        '--bigquery-expansion-service', '--bigquery_expansion_service',
        dest='bigquery_expansion_service',
        help='--sink bigquery: host:port of a running GCP expansion service (default: '
        'Beam starts its own).')
    parser.add_argument(
        '--aggregates-topic', '--aggregates_topic', dest='aggregates_topic',
        help='Also publish every pane (early, on time, late) as contract JSON to a topic: '
        'kafka:BOOTSTRAP/TOPIC (record key the customer id) or '
        'pubsub:projects/P/topics/T (attributes customer_id, pane_index, window_start). '
        'A pane log: consumers keep the highest pane_index per window.')
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
    parser.add_argument(
        '--kafka-expansion-service', '--kafka_expansion_service',
        dest='kafka_expansion_service',
        help='HOST:PORT of the Java expansion service for Kafka IO (default: the '
        'one scripts/flink.sh starts, localhost:18096).')
    parser.add_argument(
        '--kafka-max-records', '--kafka_max_records', dest='kafka_max_records', type=int,
        help='Stop each Kafka topic\'s read after this many records (a bounded read).')
