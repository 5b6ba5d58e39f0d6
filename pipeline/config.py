"""The one place where a run's settings are read and checked.

A bad setting stops the run before it starts, with the field named.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.options import TidemarkOptions

#: The embedded default: a bundled incident-like replay.
BUNDLED_REPLAY = os.path.join(os.path.dirname(__file__), 'data', 'incident-replay.jsonl')
DEFAULT_WINDOW_SIZE_S = 60
DEFAULT_ALLOWED_LATENESS_S = 30
DEFAULT_EARLY_FIRING_S = 10
DEFAULT_OUTPUT_DIR = 'tidemark-output'


class ConfigError(ValueError):
  """A setting is wrong; ``field`` names it."""

  def __init__(self, field: str, reason: str):
    super().__init__(f'{field}: {reason}')
    self.field = field
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class RunConfig:
  source: str  # 'replay:PATH'
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

  @property
  def memory_path(self) -> str:
    return os.path.join(self.output_dir, 'memory.jsonl')

  @property
  def refused_path(self) -> str:
    """Rows the customer-scoped database sink refused (other customers')."""
    return os.path.join(self.output_dir, 'refused.jsonl')

  @classmethod
  def from_options(cls, options: PipelineOptions) -> 'RunConfig':
    opts = options.view_as(TidemarkOptions)
    source = opts.source or f'replay:{BUNDLED_REPLAY}'
    kind, sep, target = source.partition(':')
    if not sep or not target:
      raise ConfigError('--source', f'{source!r} is not of the form KIND:TARGET')
    if kind != 'replay':
      raise ConfigError('--source', f'unknown source kind {kind!r}; known: replay')
    if kind == 'replay' and not os.path.isfile(target):
      raise ConfigError('--source', f'replay file {target!r} does not exist')

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
    return cls(
        source=source,
        window_size_s=window,
        allowed_lateness_s=lateness,
        early_firing_s=early or None,
        output_dir=output_dir,
        sqlite_path=sqlite,
        shards=shards,
        sample_memory_s=sample_memory,
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
