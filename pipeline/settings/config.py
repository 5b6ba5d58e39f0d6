"""The one place where a run's settings are read and checked.

A bad setting stops the run before it starts, with the field named. Sources,
topics, sinks and local paths are parsed and checked in pipeline/settings/targets.py.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Dict, List, Optional, Tuple

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.runfolder import names
from pipeline.settings.checks import (
    MAX_SHARDS, ConfigError, check_count, check_seconds, check_text, parse_rollups)
from pipeline.settings.options import (
    FlinkRunnerJavaOptions, TidemarkOptions, checkpoint_interval_ms, option_dests)
from pipeline.settings.runners import capabilities, runner_name
from pipeline.settings.targets import (
    SOURCE_KINDS, check_folder, check_host_port, check_output_file, check_replay_file,
    check_sqlite_file, parse_aggregates_topic, parse_kafka_target, parse_pubsub_target,
    sink_settings)
from transforms.connectors.writers import is_local
from transforms.rules.model import WindowSpec, window_spec

#: The embedded default: a bundled incident-like replay.
BUNDLED_REPLAY = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'incident-replay.jsonl')
DEFAULT_WINDOW_SIZE_S = 60
DEFAULT_ALLOWED_LATENESS_S = 30
DEFAULT_EARLY_FIRING_S = 10
#: Keys of the too-late and dedup gate (each holds its own ids; a handful keeps
#: the per-bundle work per key small and still spreads over a few workers).
DEFAULT_SHARDS = 4
DEFAULT_OUTPUT_DIR = 'tidemark-output'
#: How often an unbounded run (Kafka) rewrites accounting.json, in seconds.
ACCOUNTING_UPDATE_S = 2
#: The attribute publishers set to the event id, for runners that deduplicate
#: Pub/Sub redeliveries themselves (Dataflow); the DirectRunner refuses it.
DEFAULT_PUBSUB_ID_LABEL = 'event_id'
#: Where the Java expansion service is (Kafka IO, and Tidemark's Pub/Sub read),
#: unless --kafka-expansion-service / --pubsub-expansion-service say otherwise
#: (scripts/flink.sh serves one there).
DEFAULT_KAFKA_EXPANSION_SERVICE = 'localhost:18096'

#: How a replay runs: as a stream (TestStream) or in bulk (batch, chunked).
REPLAY_MODES = ('stream', 'bulk')

#: The folder of a rollup's outputs inside --output-dir.
ROLLUP_DIR = names.ROLLUP_DIR


def default_replay_mode(kind: str, runner: str, sample_memory: Optional[int],
                        rollups) -> str:
  """Bulk for a replay on the DirectRunner, unless the run needs event time to
  pass as a stream (memory samples, rollups); stream otherwise."""
  if (kind == 'replay' and capabilities(runner).bulk_replays and sample_memory is None
      and not rollups):
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
  #: pubsub sources on a runner that reads Pub/Sub in Java (Flink): the
  #: expansion service of Tidemark's Java read (None: Python's ReadFromPubSub)
  pubsub_expansion_service: Optional[str] = None
  #: per subscription; makes a Java Pub/Sub read bounded (benchmarks, drains)
  pubsub_max_messages: Optional[int] = None
  #: pubsub sources: how far behind the wall clock event times may arrive (s)
  expected_skew_s: Optional[int] = None
  #: unbounded sources: stop (cancel) the run after this many seconds
  run_seconds: Optional[int] = None
  #: HOST:PORT to serve the live metrics at while the run runs
  serve_metrics: Optional[str] = None
  #: 'kafka:BOOTSTRAP/TOPIC' or 'pubsub:projects/P/topics/T': every pane published
  aggregates_topic: Optional[str] = None
  #: replays: 'stream' (a TestStream on a streaming runner) or 'bulk' (the whole
  #: file at once, in chunks, on a batch runner)
  replay_mode: str = 'stream'
  #: ((size s, allowed lateness s), ...): larger windows computed in the same
  #: run, each written under OUTPUT_DIR/rollup-SIZEs/ and reconciled
  rollups: Tuple[Tuple[int, int], ...] = ()

  @property
  def window(self) -> WindowSpec:
    """The run's window size and allowed lateness, built once here and passed
    to every composite that windows or judges lateness."""
    return window_spec(self.window_size_s, self.allowed_lateness_s)

  @property
  def bulk(self) -> bool:
    """Which flow the run is: a replay in bulk (the batch flow, the whole file
    in chunks) or, for every other run, the stream. Chosen here once, from
    ``replay_mode`` (``default_replay_mode`` when not given); the graph, the
    source and the launcher read it."""
    return self.source_kind == 'replay' and self.replay_mode == 'bulk'

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
  #: Kafka consumer group: offsets committed to it on every completed checkpoint
  kafka_consumer_group: Optional[str] = None
  #: the runner checkpoints (--checkpointing_interval): outputs wait for the
  #: checkpoint that holds them (transforms/flow/stable.py), so a restore never
  #: leaves a sink with panes of a history that was rolled back
  checkpointed: bool = False

  @property
  def rows_before_checkpoint(self) -> bool:
    """Whether database rows are written as their panes fire, not once their
    checkpoint completes: on a checkpointed run into PostgreSQL, whose upsert
    follows the windows and keeps the latest pane it was given
    (``UpsertPostgres(in_fire_order=True)``), so a restore's panes replace
    the rolled-back ones. Everything else still waits for the checkpoint."""
    return self.checkpointed and self.sink == 'postgres'

  @functools.cached_property
  def _source(self) -> Tuple[str, str, Optional[Tuple[str, Dict[str, str]]],
                             Optional[Dict[str, str]]]:
    """``source`` parsed, once: (kind, target, Kafka's (bootstrap, topics),
    Pub/Sub's subscriptions). ``source`` itself stays as the operator wrote it
    (run.json records it)."""
    kind, _, target = self.source.partition(':')
    topics = parse_kafka_target(target) if kind == 'kafka' else None
    subscriptions = dict(parse_pubsub_target(target)) if kind == 'pubsub' else None
    return kind, target, topics, subscriptions

  @property
  def source_kind(self) -> str:
    return self._source[0]

  @property
  def source_target(self) -> str:
    """What follows ``KIND:`` (a replay's path)."""
    return self._source[1]

  @property
  def kafka(self) -> Tuple[str, Dict[str, str]]:
    """``(bootstrap servers, {source name: topic})`` of a ``kafka:`` source."""
    if self._source[2] is None:
      raise ValueError(f'{self.source!r} is not a kafka source')
    bootstrap, topics = self._source[2]
    return bootstrap, dict(topics)

  @property
  def pubsub_subscriptions(self) -> Dict[str, str]:
    """``{source name: subscription path}`` of a pubsub source."""
    if self._source[3] is None:
      raise ValueError(f'{self.source!r} is not a pubsub source')
    return dict(self._source[3])

  @property
  def aggregates_path(self) -> str:
    return os.path.join(self.output_dir, names.AGGREGATES)

  @property
  def dead_letter_path(self) -> str:
    return os.path.join(self.output_dir, names.DEAD_LETTERS)

  @property
  def accounting_path(self) -> str:
    return os.path.join(self.output_dir, names.ACCOUNTING)

  @property
  def memory_path(self) -> str:
    return os.path.join(self.output_dir, names.MEMORY)

  @property
  def refused_path(self) -> str:
    """Rows the customer-scoped database sink refused (other customers')."""
    return os.path.join(self.output_dir, names.REFUSED)

  @property
  def duplicates_path(self) -> str:
    """The copies dedup dropped, payloads and all (written where rollups are
    reconciled: which events two window sizes accepted differently)."""
    return os.path.join(self.output_dir, names.DUPLICATES)

  @property
  def reconciliation_path(self) -> str:
    return os.path.join(self.output_dir, names.RECONCILIATION)

  @property
  def arrivals_path(self) -> str:
    """What a bulk replay delivered per source, and how late its late events were."""
    return os.path.join(self.output_dir, names.ARRIVALS)

  def rollup(self, size_s: int, allowed_lateness_s: int) -> 'RunConfig':
    """The settings of one rollup as if it were a run of its own: its window
    size and lateness, its outputs in OUTPUT_DIR/rollup-SIZEs/ (the same file
    names; SQLite only if the run has one), no rollups, topic or memory
    samples of its own."""
    output_dir = os.path.join(self.output_dir, ROLLUP_DIR.format(size=size_s))
    return dataclasses.replace(
        self, window_size_s=size_s, allowed_lateness_s=allowed_lateness_s,
        output_dir=output_dir,
        sqlite_path=self.sqlite_path and os.path.join(output_dir, names.SQLITE),
        rollups=(), aggregates_topic=None, sample_memory_s=None)

  @property
  def rollup_configs(self) -> Tuple['RunConfig', ...]:
    return tuple(self.rollup(size, lateness) for size, lateness in self.rollups)

  @property
  def output_paths(self) -> Tuple[str, ...]:
    """Every file the run writes in its output folder (not its rollups')."""
    return (self.aggregates_path, self.dead_letter_path, self.accounting_path,
            self.memory_path, self.refused_path, self.duplicates_path,
            self.reconciliation_path, self.arrivals_path)

  @classmethod
  def from_options(cls, options: PipelineOptions) -> 'RunConfig':
    """The checked settings of a run; ConfigError names the first bad one.
    Nothing is written: local outputs are only checked (check_outputs)."""
    opts = options.view_as(TidemarkOptions)
    for dest, flag in option_dests().items():
      value = getattr(opts, dest)
      for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str):
          check_text(flag, text)
    source = opts.source or f'replay:{BUNDLED_REPLAY}'
    kind, sep, target = source.partition(':')
    if not sep or not target:
      raise ConfigError('--source', f'{source!r} is not of the form KIND:TARGET')
    if kind not in SOURCE_KINDS:
      raise ConfigError(
          '--source', f'unknown source kind {kind!r}; known: {", ".join(SOURCE_KINDS)}')
    if kind == 'replay':
      check_replay_file(target)
    if kind == 'pubsub':
      try:
        parse_pubsub_target(target)
      except ValueError as e:
        raise ConfigError('--source', str(e)) from None
    if kind == 'kafka':
      parse_kafka_target(target)
    expansion = check_host_port(
        '--kafka-expansion-service', opts.kafka_expansion_service or DEFAULT_KAFKA_EXPANSION_SERVICE)
    max_records = check_count('--kafka-max-records', opts.kafka_max_records)
    runner = runner_name(options)
    group = opts.kafka_consumer_group
    if group is not None and not re.fullmatch(r'[A-Za-z0-9._-]{1,249}', group):
      raise ConfigError('--kafka-consumer-group', f'must be 1 to 249 of A-Z a-z 0-9 . _ -, got {group!r}')
    checkpointed = checkpoint_interval_ms(options) is not None
    finish = options.view_as(FlinkRunnerJavaOptions).finish_bundle_before_checkpointing
    if checkpointed and finish is not None and str(finish).lower() != 'true':
      raise ConfigError(
          '--finish_bundle_before_checkpointing', 'a checkpointed run needs it (true, the '
          'default): without it Flink can pass a watermark on before the outputs of the '
          'bundle it finished for the checkpoint, and drop admitted events as late')
    max_messages = check_count('--pubsub-max-messages', opts.pubsub_max_messages)
    if max_messages is not None and not capabilities(runner).java_pubsub_read:
      raise ConfigError('--pubsub-max-messages', f'the {runner} reads Pub/Sub without a bound; '
                        'a bounded read needs a runner that reads it in Java (FlinkRunner)')
    bound = ('--kafka-max-records' if max_records is not None and kind == 'kafka' else
             '--pubsub-max-messages' if max_messages is not None and kind == 'pubsub' else None)
    if bound and checkpointed:
      raise ConfigError(
          bound, 'a bounded read ends its job only without checkpoints (Flink keeps the '
          'sources of a checkpointed job running): leave --checkpointing_interval unset')
    pubsub_expansion = None
    if kind == 'pubsub' and capabilities(runner).java_pubsub_read:
      pubsub_expansion = check_host_port(
          '--pubsub-expansion-service',
          opts.pubsub_expansion_service or DEFAULT_KAFKA_EXPANSION_SERVICE)
      if not checkpointed and max_messages is None:
        raise ConfigError(
            '--checkpointing_interval', f'the {runner} acknowledges a Pub/Sub message when '
            'the checkpoint that holds it completes: set it (milliseconds, e.g. 10000)')

    window = check_seconds(
        '--window-size', DEFAULT_WINDOW_SIZE_S if opts.window_size is None else opts.window_size,
        positive=True)
    lateness = check_seconds(
        '--allowed-lateness',
        DEFAULT_ALLOWED_LATENESS_S if opts.allowed_lateness is None else opts.allowed_lateness)
    early = check_seconds(
        '--early-firing', DEFAULT_EARLY_FIRING_S if opts.early_firing is None else opts.early_firing)
    shards = DEFAULT_SHARDS if opts.shards is None else opts.shards
    if not 1 <= shards <= MAX_SHARDS:
      raise ConfigError('--shards', f'must be 1 to {MAX_SHARDS}, got {shards}')

    sample_memory = opts.sample_memory_every
    if sample_memory is not None:
      check_seconds('--sample-memory-every', sample_memory, positive=True)

    output_dir = opts.output_dir or DEFAULT_OUTPUT_DIR
    on_disk = is_local(output_dir)
    sqlite = opts.sqlite
    if sqlite is None:
      sqlite = os.path.join(output_dir, names.SQLITE) if on_disk else None
    elif sqlite.lower() == 'none':
      sqlite = None
    elif not on_disk:
      raise ConfigError('--sqlite', 'a SQLite file is written to a local disk, and '
                        f'--output-dir {output_dir} is not one: leave --sqlite unset')
    if on_disk and capabilities(runner).remote_workers:
      raise ConfigError('--output-dir', f'the {runner}\'s workers run on other machines, each '
                        f'with its own disk: give a bucket (gs://BUCKET/PATH), not {output_dir}')
    if opts.serve_metrics is not None and not on_disk:
      raise ConfigError('--serve-metrics', 'serves a local output folder while it is written; '
                        f'--output-dir {output_dir} is not one')
    id_label = opts.pubsub_id_label
    if id_label is None:
      id_label = (
          DEFAULT_PUBSUB_ID_LABEL if capabilities(runner).pubsub_id_label else None)
    elif id_label.lower() == 'none':
      id_label = None
    elif kind == 'pubsub' and not capabilities(runner).pubsub_id_label:
      raise ConfigError(
          '--pubsub-id-label', f'the {runner} does not support Pub/Sub id labels; '
          'leave it unset (Tidemark deduplicates by event_id itself)')
    skew = opts.expected_skew
    if skew is not None:
      check_seconds('--expected-skew', skew)
    run_seconds = opts.run_seconds
    if run_seconds is not None:
      check_seconds('--run-seconds', run_seconds, positive=True)
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
    config = cls(
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
        pubsub_expansion_service=pubsub_expansion,
        pubsub_max_messages=max_messages if kind == 'pubsub' else None,
        expected_skew_s=skew,
        run_seconds=run_seconds,
        serve_metrics=None if opts.serve_metrics is None else check_host_port(
            '--serve-metrics', opts.serve_metrics),
        replay_processing_time=capabilities(runner).test_stream_processing_time,
        kafka_expansion_service=expansion,
        kafka_max_records=max_records,
        kafka_consumer_group=group,
        checkpointed=checkpointed,
        **sink_settings(opts))
    check_outputs(config)
    return config


def watermark_risks(config: RunConfig, runner: Optional[str]) -> List[str]:
  """Warnings about events a run would lose to ``too_late`` by the way its
  runner computes the watermark; raises ConfigError where it would lose all.

  The DirectRunner's Pub/Sub watermark is the wall clock, not the event times:
  an event that arrives ``d`` seconds after its event time is too late when
  ``d`` exceeds the time from its event time to its window's end plus the
  allowed lateness, i.e. possibly once ``d > L`` and always once ``d >= W + L``.
  """
  runner = runner or 'DirectRunner'
  if config.source_kind != 'pubsub' or not capabilities(runner).wall_clock_pubsub_watermark:
    return []
  size, lateness, skew = (
      config.window_size_s, config.allowed_lateness_s, config.expected_skew_s)
  trap = (
      f'the {runner} sets the Pub/Sub watermark to the WALL CLOCK, not to event '
      'times: an event that arrives more than --allowed-lateness '
      f'({lateness} s) after its event time may be dead-lettered as too_late, and '
      f'one more than window + lateness ({size + lateness} s) behind always is. '
      'Historical event times are all too late: publish them rebased to now '
      '(python -m tools simulate --shift-to-now).')
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


def check_outputs(config: RunConfig) -> None:
  """That the run can write every local output, its rollups' too, and that
  what it would replace is its own: folders writable (or creatable), no
  folder where a file goes, an existing SQLite file a Tidemark database.
  Writes nothing; ConfigError names the option. An OUTPUT_DIR on an object
  store (``gs://...``) is checked for a filesystem that serves its scheme;
  the run finds out whether it may write there when it opens its folder."""
  from apache_beam.io.filesystems import FileSystems

  if not is_local(config.output_dir):
    try:
      FileSystems.get_filesystem(config.output_dir)
    except ValueError as e:
      raise ConfigError('--output-dir', str(e)) from None
    return
  for size_config in (config,) + config.rollup_configs:
    check_folder('--output-dir', size_config.output_dir)
    for path in size_config.output_paths:
      check_output_file('--output-dir', path)
    if size_config.sqlite_path:
      check_sqlite_file('--sqlite', size_config.sqlite_path)
