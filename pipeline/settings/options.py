"""Tidemark's pipeline options, read by Beam's own option parser (so they work
from the CLI, from templates and from ``PipelineOptions`` in code alike), and
the command line of ``python -m pipeline run`` read strictly: every argument
must be a Tidemark option or an option of a Beam ``PipelineOptions`` class."""

from __future__ import annotations

import argparse
import difflib
import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

from pipeline.settings.checks import (
    MAX_CHECKPOINT_INTERVAL_S, MAX_RECORDS, MAX_SECONDS, MAX_SHARDS, ConfigError)
from transforms.rules.model import CUSTOMER_ID_PATTERN

#: Options that are not Tidemark's, described in ``python -m pipeline run --help``.
BEAM_OPTIONS_HELP = (
    "Beam's pipeline options are accepted too: any option of a PipelineOptions "
    'class Beam registers (--runner, --streaming, --job_endpoint, --environment_type, '
    '--direct_num_workers, --experiments, ...). Anything else, a misspelt option or a '
    'stray argument, stops the run (exit 2). Exit codes: 0 the run finished and its '
    'outputs reconcile (committed); 1 the job failed; 2 a bad setting or input, nothing '
    'run or written; 3 the outputs did not reconcile (not committed); 130 / 143 stopped by '
    'SIGINT / SIGTERM (a replay is not committed; an unbounded run is committed as '
    'stopped).')

_WHOLE_NUMBER = re.compile(r'[+-]?[0-9]+\Z')


def whole_number(text: str) -> int:
  """A whole number in ASCII digits. (``int()`` also reads the digits of other
  scripts, underscores and surrounding spaces: ``int('٣٠') == 30``.)"""
  if not _WHOLE_NUMBER.match(text):
    raise argparse.ArgumentTypeError(f'{text!r} is not a whole number (digits 0-9)')
  return int(text)


class Option(NamedTuple):
  """One Tidemark option: the single definition its command-line flag, its
  Flex Template parameter (``templates/metadata.json``, generated from this by
  ``python -m tools.template_metadata``) and its help are made from. The
  values are checked further by ``RunConfig.from_options``."""
  dest: str
  #: the template parameter's label
  label: str
  #: what the template accepts (Dataflow checks it before launching)
  regex: str
  help: str
  #: a whole number in ASCII digits
  number: bool = False
  metavar: Optional[str] = None
  #: the flag may repeat
  repeated: bool = False
  #: the template's help, where it differs (a template's source is required)
  template_help: Optional[str] = None


def _at_most(limit: int, positive: bool = False) -> str:
  """A template regex's whole number of at most ``limit`` (at least 1 if
  ``positive``), bounded by its count of digits only: the regex lets through
  values up to the next power of ten, and RunConfig.from_options refuses those
  over ``limit`` with its own message (pipeline/settings/checks.py)."""
  digits = len(str(limit))
  return f'[1-9][0-9]{{0,{digits - 1}}}' if positive else f'[0-9]{{1,{digits}}}'


#: Template regexes that several options share.
_SECONDS = '^' + _at_most(MAX_SECONDS) + '$'
_POSITIVE_SECONDS = '^' + _at_most(MAX_SECONDS, positive=True) + '$'
_ROLLUP = f'{_at_most(MAX_SECONDS, positive=True)}:{_at_most(MAX_SECONDS)}'
_HOST_PORT = '^[A-Za-z0-9.-]+:[0-9]{1,5}$'
_SQL_IDENTIFIER = '^[A-Za-z_][A-Za-z0-9_]{0,62}$'
_BIGQUERY_TABLE = (
    '^([a-z][a-z0-9-]{4,28}[a-z0-9][:.])?[A-Za-z0-9_]{1,1024}\\.[A-Za-z0-9_-]{1,1024}$')

OPTIONS: Tuple[Option, ...] = (
    Option(
        'source', 'Event source', '^(pubsub|kafka|replay):\\S+$',
        'Where events come from: replay:PATH (a replay file, contract section 2), '
        'pubsub:[NAME=]projects/P/subscriptions/S[,...] (one subscription per source; '
        'NAME defaults to S) or kafka:BOOTSTRAP/TOPIC[,NAME=TOPIC...] (a topic per '
        'source). Default: the bundled incident replay.',
        metavar='KIND:TARGET',
        template_help=(
            'Where events come from: '
            'pubsub:[NAME=]projects/PROJECT/subscriptions/ID[,...] or '
            'kafka:HOST:PORT[,HOST:PORT]/TOPIC[,TOPIC] (replay:PATH is for local runs).')),
    Option(
        'window_size', 'Window size (s)', _POSITIVE_SECONDS,
        'Fixed window size in whole seconds, at most 100 years (the span of valid event '
        'times). Default: 60.',
        number=True, metavar='SECONDS'),
    Option(
        'allowed_lateness', 'Allowed lateness (s)', _SECONDS,
        'Allowed lateness in whole seconds, at most 100 years. Default: 30.',
        number=True, metavar='SECONDS'),
    Option(
        'early_firing', 'Early firing (s)', _SECONDS,
        'Emit an EARLY pane this many seconds of processing time after the first event of'
        ' a window; 0 turns early panes off. Default: 10.',
        number=True, metavar='SECONDS'),
    Option(
        'rollup', 'Rollups (size:lateness s)', f'^{_ROLLUP}(,{_ROLLUP})*$',
        'SIZE:LATENESS (whole seconds): also aggregate the same events in windows of '
        'SIZE, a multiple of --window-size, with their own allowed lateness, into '
        'OUTPUT_DIR/rollup-SIZEs/; OUTPUT_DIR/reconciliation.json then shows each rollup '
        'window equals the windows inside it, event by event. Repeat the flag or separate'
        ' with commas for several.',
        metavar='SIZE:LATENESS', repeated=True),
    Option(
        'output_dir', 'Output folder', '^(/|gs://)[^,]*$',
        'Folder for aggregates.jsonl, dead_letter.jsonl and accounting.json: a local '
        'path or any Beam filesystem\'s (gs://BUCKET/PATH; default: tidemark-output).',
        metavar='DIR'),
    Option(
        'sqlite', 'Local SQLite file', '^(none|/\\S+)$',
        'SQLite file of final aggregates (default: OUTPUT_DIR/aggregates.sqlite; "none" '
        'to skip). An existing file is replaced only if it is a Tidemark database.',
        metavar='PATH'),
    Option(
        'sample_memory_every', 'Memory sampling period', _POSITIVE_SECONDS,
        'Write the worker RSS to OUTPUT_DIR/memory.jsonl each time the watermark passes a'
        ' multiple of this many seconds of event time (soak benchmarks).',
        number=True, metavar='SECONDS'),
    Option(
        'shards', 'Shards', '^' + _at_most(MAX_SHARDS, positive=True) + '$',
        'Keys per window for too-late routing and dedup (parallelism). Default: 4.',
        number=True),
    Option(
        'sink', 'Database sink', '^(files|postgres|bigquery)$',
        'Database for final aggregates and dead letters, besides the local files: files '
        '(none, the default), postgres or bigquery.'),
    Option(
        # contract section 1's rule (transforms.rules.model); "$" also matches
        # before a trailing newline, which the run's checks refuse
        'customer_id', 'Customer id', '^' + CUSTOMER_ID_PATTERN + '$',
        'Scope the database sink to this customer: rows of any other customer are refused'
        ' (not written, listed in OUTPUT_DIR/refused.jsonl).'),
    Option(
        'postgres_dsn', 'PostgreSQL DSN', '^postgres(ql)?://\\S+$',
        '--sink postgres: libpq connection string or URI (a password may come from '
        'PGPASSWORD or ~/.pgpass instead).'),
    Option(
        'postgres_table', 'PostgreSQL aggregates table', _SQL_IDENTIFIER,
        '--sink postgres: aggregates table (default aggregates), created if missing.'),
    Option(
        'postgres_dead_letter_table', 'PostgreSQL dead-letter table', _SQL_IDENTIFIER,
        '--sink postgres: dead-letter table (default dead_letters), created if missing.'),
    Option(
        'bigquery_table', 'BigQuery aggregates table', _BIGQUERY_TABLE,
        '--sink bigquery: aggregates table [PROJECT:]DATASET.TABLE.'),
    Option(
        'bigquery_dead_letter_table', 'BigQuery dead-letter table', _BIGQUERY_TABLE,
        '--sink bigquery: dead-letter table [PROJECT:]DATASET.TABLE (also gets rows '
        'BigQuery refuses).'),
    Option(
        'bigquery_expansion_service', 'BigQuery expansion service', _HOST_PORT,
        '--sink bigquery: host:port of a running GCP expansion service (default: Beam '
        'starts its own).'),
    Option(
        'aggregates_topic', 'Aggregates topic', '^(kafka:[A-Za-z0-9.,:\\-]+/[A-Za-z0-9._\\-]{1,249}|pubsub:projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/topics/[A-Za-z][A-Za-z0-9._~+%\\-]{2,254})$',
        'Also publish every pane (early, on time, late) as contract JSON to a topic: '
        'kafka:BOOTSTRAP/TOPIC (record key the customer id) or pubsub:projects/P/topics/T'
        ' (attributes customer_id, pane_index, window_start). A pane log: consumers keep '
        'the highest pane_index per window.'),
    Option(
        'pubsub_id_label', 'Pub/Sub id attribute', '^[A-Za-z][A-Za-z0-9_.-]{0,255}$',
        'Pub/Sub attribute for runner-side redelivery dedup (default: event_id on runners'
        ' that support it, off on the DirectRunner; "none" to turn off).'),
    Option(
        'expected_skew', 'Expected skew (s)', _SECONDS,
        'pubsub: how many seconds behind the wall clock event times may be when they '
        "arrive (lagging sources, publish delays). The DirectRunner's Pub/Sub watermark "
        'is the wall clock, so a skew above the allowed lateness loses events to '
        "too_late. On Flink, how far each reader's watermark trails the newest event "
        'time it read (default 2): later arrivals are late, then too late.',
        number=True, metavar='SECONDS'),
    Option(
        'run_seconds', 'Run for (s)', _POSITIVE_SECONDS,
        'Unbounded sources: stop the run after this many seconds of wall time (default: '
        'run until interrupted).',
        number=True, metavar='SECONDS'),
    Option(
        'replay_mode', 'Replay mode', '^(stream|bulk)$',
        'replay sources: stream (the file as a TestStream on a streaming runner: '
        'watermarks advance and triggers fire as they would live) or bulk (the whole file'
        ' at once, in chunks, on a batch runner, the same rules applied along the '
        "replay's timeline: the same outputs, much faster). Default: bulk on the "
        'DirectRunner (stream when --sample-memory-every or --rollup need it), stream on '
        'other runners.'),
    Option(
        'serve_metrics', 'Serve live metrics at', '^[A-Za-z0-9.-]*:[0-9]{1,5}$',
        'HOST:PORT: while the run runs, serve its metrics at http://HOST:PORT/metrics and '
        'its report at /, read afresh from the run\'s files at every request (local runs; '
        'an unbounded run rewrites its accounting every 2 s).',
        metavar='HOST:PORT'),
    Option(
        'kafka_expansion_service', 'Kafka expansion service', _HOST_PORT,
        'HOST:PORT of the Java expansion service for Kafka IO (default: the one '
        'scripts/flink.sh starts, localhost:18096).'),
    Option(
        'pubsub_expansion_service', 'Pub/Sub expansion service', _HOST_PORT,
        'HOST:PORT of the Java expansion service that serves Tidemark\'s Pub/Sub read, on '
        'runners that read Pub/Sub in Java (Flink; default: the one scripts/flink.sh '
        'starts, localhost:18096).'),
    Option(
        'kafka_max_records', 'Kafka records per topic',
        '^' + _at_most(MAX_RECORDS, positive=True) + '$',
        "Stop each Kafka topic's read after this many records (a bounded read).",
        number=True),
    Option(
        'pubsub_max_messages', 'Pub/Sub messages per subscription',
        '^' + _at_most(MAX_RECORDS, positive=True) + '$',
        "Stop each Pub/Sub subscription's read after this many messages (a bounded read, "
        'on runners that read Pub/Sub in Java: Flink).',
        number=True),
    Option(
        'kafka_consumer_group', 'Kafka consumer group', '^[A-Za-z0-9._-]{1,249}$',
        'Kafka consumer group (group.id): offsets are committed to it when a checkpoint '
        'completes, so a new job of the same group starts where the last one stopped (a '
        'job restored from a checkpoint or savepoint starts from the offsets in it).'),
)


class TidemarkOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    for option in OPTIONS:
      # --dest-with-dashes, also spelled --dest_with_underscores as Beam's own are
      flags = ['--' + option.dest.replace('_', '-')]
      if '_' in option.dest:
        flags.append('--' + option.dest)
      kwargs = {'dest': option.dest, 'help': option.help}
      if option.number:
        kwargs.update(type=whole_number, metavar=option.metavar or 'N')
      elif option.metavar:
        kwargs['metavar'] = option.metavar
      if option.repeated:
        kwargs['action'] = 'append'
      parser.add_argument(*flags, **kwargs)


#: The Flex Template's description (templates/metadata.json).
TEMPLATE = {
    'name': 'Tidemark',
    'description': 'Exact event-time windowed aggregation: every event is aggregated, deduplicated or dead-lettered (invalid, too late), and accounted for. Pane-aware upserts into BigQuery or PostgreSQL.',
    'streaming': True,
    'supportsAtLeastOnce': False,
    'supportsExactlyOnce': True,
}


def template_metadata() -> dict:
  """``templates/metadata.json``: the template and one parameter per option."""
  return {**TEMPLATE, 'parameters': [
      {'name': o.dest, 'label': o.label, 'helpText': o.template_help or o.help,
       'isOptional': o.dest != 'source', 'regexes': [o.regex]} for o in OPTIONS]}


#: Beam Java's ``FlinkPipelineOptions`` (Beam 2.62.0) that Beam Python does not
#: declare: the job server reads them from the pipeline options it is sent.
FLINK_RUNNER_OPTIONS = (
    'allow_non_restored_state', 'attached_mode', 'auto_watermark_interval', 'checkpoint_timeout_millis',
    'checkpointing_interval', 'checkpointing_mode', 'disable_metrics',
    'enable_stable_input_drain', 'execution_retry_delay', 'fail_on_checkpointing_errors',
    'finish_bundle_before_checkpointing', 'flink_conf_dir', 'force_unaligned_checkpoint_enabled',
    'job_check_interval_in_secs', 'latency_tracking_interval', 'max_bundle_size',
    'max_bundle_time_mills', 'min_pause_between_checkpoints', 'num_concurrent_checkpoints',
    'number_of_execution_retries', 'object_reuse', 'operator_chaining',
    'report_checkpoint_duration', 'retain_externalized_checkpoints_on_cancellation',
    'savepoint_path', 'shutdown_sources_after_idle_ms', 'state_backend',
    'state_backend_storage_path', 'unaligned_checkpoint_enabled')


class FlinkRunnerJavaOptions(PipelineOptions):
  """Flink runner options only its Java side knows, passed through to the job
  server as given (so a misspelt one is still refused by name)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    for dest in FLINK_RUNNER_OPTIONS:
      parser.add_argument(f'--{dest}', dest=dest, default=None,
                          help='Flink runner (Beam Java FlinkPipelineOptions).')


class JavaPubsubOptions(PipelineOptions):
  """Beam Java's ``PubsubOptions`` and ``GcpOptions`` that the Java Pub/Sub read
  reads on the workers (Flink), under the names Java knows them by."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
        '--java_pubsub_root_url', dest='pubsub_root_url', default=None,
        help='Java Pub/Sub read: the service root URL (default: Google\'s; with '
        'PUBSUB_EMULATOR_HOST set, the emulator\'s).')
    parser.add_argument(
        '--credential_factory_class', dest='credential_factory_class', default=None,
        help='Java Pub/Sub read: Beam Java credential factory class.')


def checkpoint_interval_ms(options: PipelineOptions) -> Optional[int]:
  """The run's ``--checkpointing_interval`` (ms), checked; None when unset."""
  text = options.view_as(FlinkRunnerJavaOptions).checkpointing_interval
  if text is None or str(text) == '-1':
    return None
  try:
    interval = whole_number(str(text))
  except argparse.ArgumentTypeError:
    interval = 0
  if not 0 < interval <= MAX_CHECKPOINT_INTERVAL_S * 1000:
    raise ConfigError(
        '--checkpointing_interval', 'must be a whole number of milliseconds, 1 to '
        f'{MAX_CHECKPOINT_INTERVAL_S * 1000}, got {text!r}')
  return interval


def tidemark_parser(prog: str = 'python -m pipeline run') -> argparse.ArgumentParser:
  """A parser of Tidemark's options alone (their help, their names)."""
  parser = argparse.ArgumentParser(
      prog=prog, epilog=BEAM_OPTIONS_HELP,
      description='Run the pipeline: read events, window and aggregate them, account for '
      'every one. A bad setting stops the run before it starts (exit 2, the option named, '
      'nothing written).')
  TidemarkOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  return parser


def option_dests() -> Dict[str, str]:
  """``{dest: --flag}`` of every Tidemark option."""
  parser = argparse.ArgumentParser(add_help=False)
  TidemarkOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  return {dest: '--' + dest.replace('_', '-') for dest in vars(parser.parse_args([]))}


class _StrictParser(_BeamArgumentParser):
  """Beam's parser over every registered option class, raising instead of exiting."""

  def error(self, message):
    raise argparse.ArgumentError(None, message)

  def unknown(self, arg: str) -> ConfigError:
    """The error for the first argument no option class knows."""
    if not arg.startswith('-') or arg == '-':
      return ConfigError(
          repr(arg), 'unexpected argument: settings are options (--name VALUE); see '
          'python -m pipeline run --help')
    name = arg.split('=', 1)[0]
    close = difflib.get_close_matches(name, list(self._option_string_actions), n=1)
    if close and close[0].replace('_', '-') in self._option_string_actions:
      close = [close[0].replace('_', '-')]  # Tidemark's flags, as documented
    hint = f' (did you mean {close[0]}?)' if close else ''
    return ConfigError(
        name, f'is neither a Tidemark option nor a Beam pipeline option{hint}; see '
        'python -m pipeline run --help')


def parse_args(argv: Sequence[str]) -> PipelineOptions:
  """``argv`` as PipelineOptions, each argument checked against every option
  class Beam registers (TidemarkOptions among them) and with no abbreviations;
  ConfigError names the first unknown or malformed one. (Beam itself drops an
  unknown option with a warning and runs on the defaults.)"""
  arguments: List[str] = list(argv)
  parser = _StrictParser(allow_abbrev=False, add_help=False, exit_on_error=False)
  # As PipelineOptions.get_all_options does: the last class of each name.
  classes = {str(cls): cls for cls in PipelineOptions.__subclasses__()}
  for cls in classes.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  try:
    _, unknown = parser.parse_known_args(arguments)
  except argparse.ArgumentError as e:
    field = (e.argument_name or 'arguments').split('/')[0]
    raise ConfigError(field, e.message) from None
  if unknown:
    raise parser.unknown(unknown[0])
  return PipelineOptions(arguments)
