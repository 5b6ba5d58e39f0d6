"""The one place where a run's settings are read and checked.

A bad setting stops the run before it starts, with the field named.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, Optional, Tuple

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.options import TidemarkOptions

#: The embedded default: a bundled incident-like replay.
BUNDLED_REPLAY = os.path.join(os.path.dirname(__file__), 'data', 'incident-replay.jsonl')
DEFAULT_WINDOW_SIZE_S = 60
DEFAULT_ALLOWED_LATENESS_S = 30
DEFAULT_EARLY_FIRING_S = 10
DEFAULT_OUTPUT_DIR = 'tidemark-output'
#: The expansion service for Kafka IO started by scripts/flink.sh (EMBEDDED Java env).
DEFAULT_KAFKA_EXPANSION_SERVICE = 'localhost:' + os.environ.get('KAFKA_EXPANSION_PORT', '18096')
#: How often an unbounded run (Kafka) rewrites accounting.json, in seconds.
DEFAULT_ACCOUNTING_EVERY_S = 5
SOURCE_KINDS = ('replay', 'kafka')

#: Runners whose windowing runs in Java. There a window's data is dropped once
#: the watermark passes ``maxTimestamp + lateness`` with ``maxTimestamp = end - 1 ms``
#: (millisecond timers), i.e. from ``end + lateness`` on; the Python runners drop
#: only strictly after ``end + lateness`` (microseconds). Too-late routing and
#: dedup expire at the runner's own instant (``expiry_offset_micros``).
JAVA_WINDOWING_RUNNERS = (
    'FlinkRunner', 'PortableRunner', 'SparkRunner', 'DataflowRunner', 'TestDataflowRunner')
#: Runners that cannot advance processing time in a TestStream (Flink refuses
#: with "Advancing Processing time is not supported by the Flink Runner").
NO_PROCESSING_TIME_TEST_STREAM_RUNNERS = ('FlinkRunner', 'PortableRunner')

_HOST_PORT = re.compile(r'[A-Za-z0-9.\-]+:(\d{1,5})\Z')
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


@dataclasses.dataclass(frozen=True)
class RunConfig:
  source: str  # 'replay:PATH' or 'kafka:BOOTSTRAP/TOPIC[,TOPIC...]'
  window_size_s: int
  allowed_lateness_s: int
  early_firing_s: Optional[int]
  output_dir: str
  sqlite_path: Optional[str]
  shards: int
  #: where too-late routing and dedup expire, past ``end + lateness`` (runner's rule)
  expiry_offset_micros: int = 1
  #: whether the replay's processing-time steps are replayed (runner permitting)
  replay_processing_time: bool = True
  kafka_expansion_service: str = DEFAULT_KAFKA_EXPANSION_SERVICE
  #: per topic; makes a Kafka read bounded (tests)
  kafka_max_records: Optional[int] = None
  #: rewrite accounting.json this often (unbounded sources); None: at the end only
  accounting_every_s: Optional[int] = None

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
  def aggregates_path(self) -> str:
    return os.path.join(self.output_dir, 'aggregates.jsonl')

  @property
  def dead_letter_path(self) -> str:
    return os.path.join(self.output_dir, 'dead_letter.jsonl')

  @property
  def accounting_path(self) -> str:
    return os.path.join(self.output_dir, 'accounting.json')

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
    if kind == 'kafka':
      parse_kafka_target(target)
    expansion = opts.kafka_expansion_service or DEFAULT_KAFKA_EXPANSION_SERVICE
    if not _HOST_PORT.fullmatch(expansion):
      raise ConfigError('--kafka-expansion-service', f'{expansion!r} is not HOST:PORT')
    max_records = opts.kafka_max_records
    if max_records is not None and max_records <= 0:
      raise ConfigError('--kafka-max-records', f'must be positive, got {max_records}')
    every = opts.accounting_every
    if every is None and kind == 'kafka':
      every = DEFAULT_ACCOUNTING_EVERY_S
    if every is not None and every < 0:
      raise ConfigError('--accounting-every', f'must be zero or positive, got {every}')
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
    shards = 1 if opts.shards is None else opts.shards
    if shards < 1:
      raise ConfigError('--shards', f'must be at least 1, got {shards}')

    output_dir = opts.output_dir or DEFAULT_OUTPUT_DIR
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
      raise ConfigError('--output-dir', f'{output_dir!r} exists and is not a folder')
    sqlite = opts.sqlite
    if sqlite is None:
      sqlite = os.path.join(output_dir, 'aggregates.sqlite')
    elif sqlite.lower() == 'none':
      sqlite = None
    return cls(
        source=source,
        window_size_s=window,
        allowed_lateness_s=lateness,
        early_firing_s=early or None,
        output_dir=output_dir,
        sqlite_path=sqlite,
        shards=shards,
        expiry_offset_micros=0 if runner in JAVA_WINDOWING_RUNNERS else 1,
        replay_processing_time=runner not in NO_PROCESSING_TIME_TEST_STREAM_RUNNERS,
        kafka_expansion_service=expansion,
        kafka_max_records=max_records,
        accounting_every_s=every or None)


def runner_name(options: PipelineOptions) -> str:
  """The runner's class name (``DirectRunner`` when none is given)."""
  runner = options.view_as(StandardOptions).runner or 'DirectRunner'
  if not isinstance(runner, str):
    runner = type(runner).__name__
  return runner.rsplit('.', 1)[-1]
