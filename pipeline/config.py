"""The one place where a run's settings are read and checked.

A bad setting stops the run before it starts, with the field named.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.options import TidemarkOptions

#: The embedded default: a bundled incident-like replay.
BUNDLED_REPLAY = os.path.join(os.path.dirname(__file__), 'data', 'incident-replay.jsonl')
DEFAULT_WINDOW_SIZE_S = 60
DEFAULT_ALLOWED_LATENESS_S = 30
DEFAULT_EARLY_FIRING_S = 10
#: Keys of the too-late and dedup gate (each holds its own ids; a handful keeps
#: the per-bundle work per key small and still spreads over a few workers).
DEFAULT_SHARDS = 4
DEFAULT_OUTPUT_DIR = 'tidemark-output'
SOURCE_KINDS = ('replay', 'pubsub', 'kafka')
ACCOUNTING_UPDATE_S = 2
#: The attribute publishers set to the event id, for runners that deduplicate
#: Pub/Sub redeliveries themselves (Dataflow); the DirectRunner refuses it.
DEFAULT_PUBSUB_ID_LABEL = 'event_id'
#: The Python SDK's own runners (everything runs in this process or its workers).
DIRECT_RUNNERS = ('DirectRunner', 'BundleBasedDirectRunner', 'SwitchingDirectRunner')
RUNNERS_WITHOUT_PUBSUB_ID_LABEL = DIRECT_RUNNERS
#: The expansion service for Kafka IO started by scripts/flink.sh (EMBEDDED Java env).
DEFAULT_KAFKA_EXPANSION_SERVICE = 'localhost:' + os.environ.get('KAFKA_EXPANSION_PORT', '18096')
#: How often an unbounded run (Kafka) rewrites accounting.json, in seconds.

#: How a replay runs: as a stream (TestStream) or in bulk (batch, chunked).
REPLAY_MODES = ('stream', 'bulk')
#: Runners on which a replay runs in bulk unless told otherwise: the
#: DirectRunner's streaming mode manages a few hundred events per second.
BULK_REPLAY_RUNNERS = DIRECT_RUNNERS
#: Runners that cannot advance processing time in a TestStream (Flink refuses
#: with "Advancing Processing time is not supported by the Flink Runner").
NO_PROCESSING_TIME_TEST_STREAM_RUNNERS = ('FlinkRunner', 'PortableRunner')

_HOST_PORT = re.compile(r'[A-Za-z0-9.\-]+:(\d{1,5})\Z')
_ROLLUP = re.compile(r'\s*([+-]?\d+)\s*:\s*([+-]?\d+)\s*\Z')
#: The folder of a rollup's outputs inside --output-dir.
ROLLUP_DIR = 'rollup-{size}s'
_TOPIC = re.compile(r'[A-Za-z0-9._\-]{1,249}\Z')
_SOURCE_NAME = re.compile(r'[A-Za-z0-9._\-]{1,64}\Z')


class ConfigError(ValueError):
  """A setting is wrong; ``field`` names it."""

  def __init__(self, field: str, reason: str):
    super().__init__(f'{field}: {reason}')
    self.field = field
    self.reason = reason


def parse_kafka_target(target: str, field: str = '--source') -> Tuple[str, Dict[str, str]]:
  """``BOOTSTRAP/TOPIC[,TOPIC...]`` to ``(bootstrap servers, {source: topic})``.

  BOOTSTRAP is ``host:port[,host:port...]``; a TOPIC may be written
  ``NAME=TOPIC`` to name its source, else the source is named as the topic.
  """
  bootstrap, sep, topics = target.partition('/')
  if not sep or not bootstrap or not topics:
    raise ConfigError(field, f'kafka:{target!r} is not of the form kafka:BOOTSTRAP/TOPIC[,TOPIC...]')
  for server in bootstrap.split(','):
    match = _HOST_PORT.fullmatch(server)
    if not match or not 0 < int(match.group(1)) < 65536:
      raise ConfigError(field, f'Kafka bootstrap server {server!r} is not HOST:PORT')
  sources: Dict[str, str] = {}
  for item in topics.split(','):
    name, eq, topic = item.rpartition('=')
    if not eq:
      name = topic
    if not _TOPIC.fullmatch(topic):
      raise ConfigError(
          field, f'Kafka topic {topic!r} is not 1-249 characters of A-Z a-z 0-9 . _ -')
    if not _SOURCE_NAME.fullmatch(name):
      raise ConfigError(field, f'source name {name!r} is not 1-64 characters of A-Z a-z 0-9 . _ -')
    if name in sources:
      raise ConfigError(field, f'source name {name!r} is given twice')
    sources[name] = topic
  return bootstrap, sources


TOPIC_KINDS = ('kafka', 'pubsub')


def parse_aggregates_topic(spec: str, field: str = '--aggregates-topic') -> Tuple[str, str, str]:
  """``kafka:BOOTSTRAP/TOPIC`` or ``pubsub:projects/P/topics/T`` to
  ``(kind, bootstrap or '', topic)``; ConfigError naming ``field`` otherwise."""
  from transforms.sinks import check_kafka_topic, check_pubsub_topic
  kind, sep, target = spec.partition(':')
  if not sep or not target or kind not in TOPIC_KINDS:
    raise ConfigError(
        field, f'{spec!r} is not kafka:BOOTSTRAP/TOPIC or pubsub:projects/P/topics/T')
  try:
    if kind == 'pubsub':
      return kind, '', check_pubsub_topic(target)
    bootstrap, topics = parse_kafka_target(target, field)
    if len(topics) != 1 or '=' in target:
      raise ConfigError(field, f'kafka:{target!r} must name exactly one topic')
    return kind, bootstrap, check_kafka_topic(next(iter(topics.values())))
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(field, str(e)) from None


class RollupError(ValueError):
  """Rollup ``index`` (0-based) is wrong in ``field`` (``size_s`` or
  ``allowed_lateness_s``); the CLI and customer files name it their own way."""

  def __init__(self, index: int, field: str, reason: str):
    super().__init__(reason)
    self.index = index
    self.field = field
    self.reason = reason


def check_rollups(
    window_size_s: int, rollups: Sequence[Tuple[int, int]]) -> Tuple[Tuple[int, int], ...]:
  """Checks ``(size s, allowed lateness s)`` rollups of a run whose primary
  window is ``window_size_s``; returns them sorted by size.

  Each size must be a multiple of the primary size larger than it: windows
  are aligned to the epoch, so a rollup window is then exactly a run of whole
  primary windows, and the primary figures inside it can be summed and
  reconciled against it. Lateness is any whole number of seconds >= 0 (each
  rollup decides its own too-late events). Sizes may not repeat.
  """
  seen: Dict[int, int] = {}
  for index, (size, lateness) in enumerate(rollups):
    if size <= 0:
      raise RollupError(index, 'size_s', f'size must be a positive number of seconds, got {size}')
    if size <= window_size_s or size % window_size_s:
      raise RollupError(
          index, 'size_s', f'size {size} s must be a multiple of the window size '
          f'({window_size_s} s) larger than it, so that whole windows nest in each rollup '
          'window and the two reconcile')
    if lateness < 0:
      raise RollupError(
          index, 'allowed_lateness_s',
          f'allowed lateness must be zero or a positive number of seconds, got {lateness}')
    if size in seen:
      raise RollupError(
          index, 'size_s', f'size {size} s is given twice (rollups {seen[size] + 1} and '
          f'{index + 1})')
    seen[size] = index
  return tuple(sorted((int(s), int(l)) for s, l in rollups))


def parse_rollups(specs: Sequence[str], window_size_s: int,
                  field: str = '--rollup') -> Tuple[Tuple[int, int], ...]:
  """``--rollup SIZE:LATENESS`` values (the flag may repeat, and a value may
  list several, comma-separated, as one Flex Template parameter must) to
  checked ``(size s, lateness s)`` pairs; ConfigError naming ``field``."""
  items = [item for spec in specs for item in spec.split(',')]
  rollups = []
  for item in items:
    match = _ROLLUP.fullmatch(item)
    if not match:
      raise ConfigError(
          field, f'{item!r} is not SIZE:LATENESS (whole seconds, e.g. 3600:900)')
    rollups.append((int(match.group(1)), int(match.group(2))))
  try:
    return check_rollups(window_size_s, rollups)
  except RollupError as e:
    size, lateness = rollups[e.index]
    raise ConfigError(field, f'{size}:{lateness}: {e.reason}') from None


def default_replay_mode(kind: str, runner: str, sample_memory: Optional[int],
                        rollups) -> str:
  """Bulk for a replay on the DirectRunner, unless the run needs event time to
  pass as a stream (memory samples, rollups); stream otherwise."""
  if kind == 'replay' and runner in BULK_REPLAY_RUNNERS and sample_memory is None and not rollups:
    return 'bulk'
  return 'stream'


@dataclasses.dataclass(frozen=True)
class RunConfig:
  source: str  # 'replay:PATH' or 'kafka:BOOTSTRAP/TOPIC[,TOPIC...]'
  window_size_s: int
  allowed_lateness_s: int
  early_firing_s: Optional[int]
  output_dir: str
  sqlite_path: Optional[str]
  shards: int
  sample_memory_s: Optional[int] = None
  #: sinks (see sink_settings)
  sink: str = 'files'
  customer_id: Optional[str] = None
  postgres_dsn: Optional[str] = None
  postgres_table: str = 'aggregates'
  postgres_dead_letter_table: str = 'dead_letters'
  bigquery_table: Optional[str] = None
  bigquery_dead_letter_table: Optional[str] = None
  bigquery_expansion_service: Optional[str] = None
  #: pubsub sources: the id attribute for runner-side dedup (None: off)
  pubsub_id_label: Optional[str] = None
  #: pubsub sources: how far behind the wall clock event times may arrive (s)
  expected_skew_s: Optional[int] = None
  #: unbounded sources: stop (cancel) the run after this many seconds
  run_seconds: Optional[int] = None
  #: 'kafka:BOOTSTRAP/TOPIC' or 'pubsub:projects/P/topics/T': every pane published
  aggregates_topic: Optional[str] = None
  #: replays: 'stream' (a TestStream on a streaming runner) or 'bulk' (the whole
  #: file at once, in chunks, on a batch runner)
  replay_mode: str = 'stream'
  #: ((size s, allowed lateness s), ...): larger windows computed in the same
  #: run, each written under OUTPUT_DIR/rollup-SIZEs/ and reconciled
  rollups: Tuple[Tuple[int, int], ...] = ()

  @property
  def unbounded(self) -> bool:
    return self.source_kind in ('pubsub', 'kafka')

  @property
  def accounting_update_s(self) -> Optional[int]:
    """An unbounded run never reaches the end of its input, so its accounting
    record is rewritten this often (processing time) instead of once."""
    return ACCOUNTING_UPDATE_S if self.unbounded else None

  #: whether the replay's processing-time steps are replayed (runner permitting)
  replay_processing_time: bool = True
  kafka_expansion_service: str = DEFAULT_KAFKA_EXPANSION_SERVICE
  #: per topic; makes a Kafka read bounded (tests)
  kafka_max_records: Optional[int] = None

  @property
  def kafka(self) -> Tuple[str, Dict[str, str]]:
    """``(bootstrap servers, {source name: topic})`` of a ``kafka:`` source."""
    return parse_kafka_target(self.source_target)

  @property
  def source_kind(self) -> str:
    return self.source.split(':', 1)[0]

  @property
  def source_target(self) -> str:
    return self.source.split(':', 1)[1]

  @property
  def pubsub_subscriptions(self) -> Dict[str, str]:
    """``{source name: subscription path}`` of a pubsub source."""
    return dict(parse_pubsub_target(self.source_target))

  @property
  def aggregates_path(self) -> str:
    return os.path.join(self.output_dir, 'aggregates.jsonl')

  @property
  def dead_letter_path(self) -> str:
    return os.path.join(self.output_dir, 'dead_letter.jsonl')

  @property
  def accounting_path(self) -> str:
    return os.path.join(self.output_dir, 'accounting.json')

  @property
  def memory_path(self) -> str:
    return os.path.join(self.output_dir, 'memory.jsonl')

  @property
  def refused_path(self) -> str:
    """Rows the customer-scoped database sink refused (other customers')."""
    return os.path.join(self.output_dir, 'refused.jsonl')

  @property
  def duplicates_path(self) -> str:
    """The copies dedup dropped, payloads and all (written where rollups are
    reconciled: which events two window sizes accepted differently)."""
    return os.path.join(self.output_dir, 'duplicates.jsonl')

  @property
  def reconciliation_path(self) -> str:
    return os.path.join(self.output_dir, 'reconciliation.json')

  def rollup(self, size_s: int, allowed_lateness_s: int) -> 'RunConfig':
    """The settings of one rollup as if it were a run of its own: its window
    size and lateness, its outputs in OUTPUT_DIR/rollup-SIZEs/ (the same file
    names; SQLite only if the run has one), no rollups, topic or memory
    samples of its own."""
    output_dir = os.path.join(self.output_dir, ROLLUP_DIR.format(size=size_s))
    return dataclasses.replace(
        self, window_size_s=size_s, allowed_lateness_s=allowed_lateness_s,
        output_dir=output_dir,
        sqlite_path=self.sqlite_path and os.path.join(output_dir, 'aggregates.sqlite'),
        rollups=(), aggregates_topic=None, sample_memory_s=None)

  @property
  def rollup_configs(self) -> Tuple['RunConfig', ...]:
    return tuple(self.rollup(size, lateness) for size, lateness in self.rollups)

  @classmethod
  def from_options(cls, options: PipelineOptions) -> 'RunConfig':
    opts = options.view_as(TidemarkOptions)
    source = opts.source or f'replay:{BUNDLED_REPLAY}'
    kind, sep, target = source.partition(':')
    if not sep or not target:
      raise ConfigError('--source', f'{source!r} is not of the form KIND:TARGET')
    if kind not in SOURCE_KINDS:
      raise ConfigError(
          '--source', f'unknown source kind {kind!r}; known: {", ".join(SOURCE_KINDS)}')
    if kind == 'replay' and not os.path.isfile(target):
      raise ConfigError('--source', f'replay file {target!r} does not exist')
    if kind == 'pubsub':
      try:
        parse_pubsub_target(target)
      except ValueError as e:
        raise ConfigError('--source', str(e)) from None
    if kind == 'kafka':
      parse_kafka_target(target)
    expansion = opts.kafka_expansion_service or DEFAULT_KAFKA_EXPANSION_SERVICE
    if not _HOST_PORT.fullmatch(expansion):
      raise ConfigError('--kafka-expansion-service', f'{expansion!r} is not HOST:PORT')
    max_records = opts.kafka_max_records
    if max_records is not None and max_records <= 0:
      raise ConfigError('--kafka-max-records', f'must be positive, got {max_records}')
    runner = runner_name(options)

    window = DEFAULT_WINDOW_SIZE_S if opts.window_size is None else opts.window_size
    if window <= 0:
      raise ConfigError('--window-size', f'must be a positive number of seconds, got {window}')
    lateness = (
        DEFAULT_ALLOWED_LATENESS_S
        if opts.allowed_lateness is None else opts.allowed_lateness)
    if lateness < 0:
      raise ConfigError(
          '--allowed-lateness', f'must be zero or a positive number of seconds, got {lateness}')
    early = DEFAULT_EARLY_FIRING_S if opts.early_firing is None else opts.early_firing
    if early < 0:
      raise ConfigError('--early-firing', f'must be zero or positive, got {early}')
    shards = DEFAULT_SHARDS if opts.shards is None else opts.shards
    if shards < 1:
      raise ConfigError('--shards', f'must be at least 1, got {shards}')

    sample_memory = opts.sample_memory_every
    if sample_memory is not None and sample_memory <= 0:
      raise ConfigError('--sample-memory-every', f'must be positive, got {sample_memory}')

    output_dir = opts.output_dir or DEFAULT_OUTPUT_DIR
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
      raise ConfigError('--output-dir', f'{output_dir!r} exists and is not a folder')
    sqlite = opts.sqlite
    if sqlite is None:
      sqlite = os.path.join(output_dir, 'aggregates.sqlite')
    elif sqlite.lower() == 'none':
      sqlite = None
    id_label = opts.pubsub_id_label
    if id_label is None:
      id_label = (
          None if runner in RUNNERS_WITHOUT_PUBSUB_ID_LABEL else DEFAULT_PUBSUB_ID_LABEL)
    elif id_label.lower() == 'none':
      id_label = None
    elif kind == 'pubsub' and runner in RUNNERS_WITHOUT_PUBSUB_ID_LABEL:
      raise ConfigError(
          '--pubsub-id-label', f'the {runner} does not support Pub/Sub id labels; '
          'leave it unset (Tidemark deduplicates by event_id itself)')
    skew = opts.expected_skew
    if skew is not None and skew < 0:
      raise ConfigError('--expected-skew', f'must be zero or positive, got {skew}')
    run_seconds = opts.run_seconds
    if run_seconds is not None and run_seconds <= 0:
      raise ConfigError('--run-seconds', f'must be a positive number of seconds, got {run_seconds}')
    if run_seconds is not None and kind == 'replay':
      raise ConfigError('--run-seconds', 'only for unbounded sources (a replay ends by itself)')
    topic = opts.aggregates_topic
    if topic is not None:
      parse_aggregates_topic(topic)
    rollups = parse_rollups(opts.rollup or [], window)
    replay_mode = opts.replay_mode or default_replay_mode(kind, runner, sample_memory, rollups)
    if replay_mode not in REPLAY_MODES:
      raise ConfigError(
          '--replay-mode', f'must be one of {", ".join(REPLAY_MODES)}, got {replay_mode!r}')
    if replay_mode == 'bulk' and kind != 'replay':
      raise ConfigError('--replay-mode', 'bulk reads a replay file (--source replay:PATH)')
    if replay_mode == 'bulk' and sample_memory is not None:
      raise ConfigError(
          '--sample-memory-every', 'samples memory as event time passes, which needs '
          '--replay-mode stream')
    if replay_mode == 'bulk' and rollups:
      raise ConfigError('--rollup', 'rollups are computed by --replay-mode stream only')
    return cls(
        replay_mode=replay_mode,
        source=source,
        aggregates_topic=topic,
        rollups=rollups,
        window_size_s=window,
        allowed_lateness_s=lateness,
        early_firing_s=early or None,
        output_dir=output_dir,
        sqlite_path=sqlite,
        shards=shards,
        sample_memory_s=sample_memory,
        pubsub_id_label=id_label if kind == 'pubsub' else None,
        expected_skew_s=skew,
        run_seconds=run_seconds,
        replay_processing_time=runner not in NO_PROCESSING_TIME_TEST_STREAM_RUNNERS,
        kafka_expansion_service=expansion,
        kafka_max_records=max_records,
        **sink_settings(opts))


SINKS = ('files', 'postgres', 'bigquery')
_SINK_OPTIONS = {
    'postgres': ('postgres_dsn', 'postgres_table', 'postgres_dead_letter_table'),
    'bigquery': ('bigquery_table', 'bigquery_dead_letter_table', 'bigquery_expansion_service'),
}


def _flag(dest: str) -> str:
  return '--' + dest.replace('_', '-')


def sink_settings(opts: TidemarkOptions) -> Dict[str, object]:
  """The sink fields of RunConfig from the options, checked."""
  from transforms import sinks  # the sinks' own checks, one rule in one place
  sink = opts.sink or 'files'
  if sink not in SINKS:
    raise ConfigError('--sink', f'unknown sink {sink!r}; known: {", ".join(SINKS)}')
  settings: Dict[str, object] = {'sink': sink}
  for kind, dests in _SINK_OPTIONS.items():
    for dest in dests:
      value = getattr(opts, dest)
      if value is not None and kind != sink:
        raise ConfigError(_flag(dest), f'only applies to --sink {kind}')
      if value is not None:
        settings[dest] = value
  if opts.customer_id is not None:
    if sink == 'files':
      raise ConfigError('--customer-id', 'scopes a database sink: needs --sink postgres or bigquery')
    try:
      settings['customer_id'] = sinks.check_customer_id(opts.customer_id)
    except ValueError as e:
      raise ConfigError('--customer-id', str(e)) from None
  checks = {
      'postgres_table': sinks.check_identifier,
      'postgres_dead_letter_table': sinks.check_identifier,
      'bigquery_table': sinks.check_bigquery_table,
      'bigquery_dead_letter_table': sinks.check_bigquery_table,
  }
  for dest, check in checks.items():
    if dest in settings:
      try:
        check(settings[dest])
      except ValueError as e:
        raise ConfigError(_flag(dest), str(e)) from None
  if sink == 'postgres' and not settings.get('postgres_dsn'):
    raise ConfigError('--postgres-dsn', 'is required with --sink postgres')
  if sink == 'postgres' and settings.get(
      'postgres_table', 'aggregates') == settings.get('postgres_dead_letter_table',
                                                      'dead_letters'):
    raise ConfigError('--postgres-dead-letter-table', 'must differ from --postgres-table')
  if sink == 'bigquery':
    for dest in ('bigquery_table', 'bigquery_dead_letter_table'):
      if not settings.get(dest):
        raise ConfigError(_flag(dest), 'is required with --sink bigquery')
    if settings['bigquery_table'] == settings['bigquery_dead_letter_table']:
      raise ConfigError('--bigquery-dead-letter-table', 'must differ from --bigquery-table')
  return settings


def parse_pubsub_target(target: str) -> Tuple[Tuple[str, str], ...]:
  """``[NAME=]projects/P/subscriptions/S[,...]`` to ``((name, path), ...)``.

  The source name defaults to the subscription id S. Raises ValueError.
  """
  # Imported here: the Pub/Sub client libraries are only needed for pubsub.
  from transforms.sources import check_subscription_path
  pairs = []
  for item in target.split(','):
    item = item.strip()
    name, sep, path = item.partition('=')
    if not sep:
      name, path = item.rsplit('/', 1)[-1], item
    if not name or not path:
      raise ValueError(
          f'{item!r}: expected [NAME=]projects/PROJECT/subscriptions/NAME')
    check_subscription_path(path)
    pairs.append((name, path))
  names = [n for n, _ in pairs]
  paths = [p for _, p in pairs]
  if len(set(names)) != len(names):
    raise ValueError(f'source names repeat: {names}')
  if len(set(paths)) != len(paths):
    raise ValueError(f'a subscription is named twice: {paths}')
  return tuple(pairs)



def watermark_risks(config: RunConfig, runner: Optional[str]) -> List[str]:
  """Warnings about events a run would lose to ``too_late`` by the way its
  runner computes the watermark; raises ConfigError where it would lose all.

  The DirectRunner's Pub/Sub watermark is the wall clock, not the event times:
  an event that arrives ``d`` seconds after its event time is too late when
  ``d`` exceeds the time from its event time to its window's end plus the
  allowed lateness, i.e. possibly once ``d > L`` and always once ``d >= W + L``.
  """
  runner = runner or 'DirectRunner'
  if config.source_kind != 'pubsub' or runner not in RUNNERS_WITHOUT_PUBSUB_ID_LABEL:
    return []
  size, lateness, skew = (
      config.window_size_s, config.allowed_lateness_s, config.expected_skew_s)
  trap = (
      f'the {runner} sets the Pub/Sub watermark to the WALL CLOCK, not to event '
      'times: an event that arrives more than --allowed-lateness '
      f'({lateness} s) after its event time may be dead-lettered as too_late, and '
      f'one more than window + lateness ({size + lateness} s) behind always is. '
      'Historical event times are all too late: publish them rebased to now '
      '(python -m pipeline simulate --shift-to-now).')
  if skew is None:
    return [trap + ' Set --expected-skew (seconds) to have this checked.']
  if skew >= size + lateness:
    raise ConfigError(
        '--allowed-lateness',
        f'with --expected-skew {skew} s on the {runner} (wall-clock Pub/Sub '
        f'watermark) every event would be too late: window + lateness is '
        f'{size + lateness} s; raise --allowed-lateness above {skew - size} s or use '
        'a runner whose watermark follows the ts attribute')
  if skew > lateness:
    return [trap + f' With --expected-skew {skew} s > --allowed-lateness {lateness} s, '
            'events WILL be lost from the aggregates (they reach the dead letter); '
            f'raise --allowed-lateness to at least {skew} s.']
  return []


def runner_name(options: PipelineOptions) -> str:
  """The runner's class name (``DirectRunner`` when none is given)."""
  runner = options.view_as(StandardOptions).runner or 'DirectRunner'
  if not isinstance(runner, str):
    runner = type(runner).__name__
  return runner.rsplit('.', 1)[-1]
