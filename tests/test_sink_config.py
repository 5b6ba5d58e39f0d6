"""Sink settings are checked before a run starts, naming the field."""

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.settings.config import ConfigError, RunConfig


@pytest.mark.parametrize('args, field', [
    (['--sink', 'postgres'], '--postgres-dsn'),
    (['--sink', 'mysql'], '--sink'),
    (['--sink', 'postgres', '--postgres-dsn', 'x', '--postgres-table', 'a;b'],
     '--postgres-table'),
    (['--postgres-dsn', 'x'], '--postgres-dsn'),
    (['--sink', 'bigquery', '--bigquery-table', 'tidemark-prod:d.t'], '--bigquery-dead-letter-table'),
    (['--sink', 'postgres', '--postgres-dsn', 'x', '--customer-id', 'a b'], '--customer-id'),
    (['--sink', 'postgres', '--postgres-dsn', 'x', '--postgres-table', 'dead_letters'],
     '--postgres-dead-letter-table'),
    (['--sink', 'bigquery', '--bigquery-table', 'tidemark-prod:d.t',
      '--bigquery-dead-letter-table', 'tidemark-prod:d.t'], '--bigquery-dead-letter-table'),
    (['--sink', 'files', '--bigquery-table', 'tidemark-prod:d.t'], '--bigquery-table'),
    (['--customer-id', 'finserve'], '--customer-id'),
])
def test_bad_sink_settings_are_refused_naming_the_field(tmp_path, args, field):
  with pytest.raises(ConfigError) as e:
    RunConfig.from_options(PipelineOptions(['--output-dir', str(tmp_path)] + args))
  assert e.value.field == field


def test_good_sink_settings_reach_the_config(tmp_path):
  config = RunConfig.from_options(PipelineOptions([
      '--output-dir', str(tmp_path), '--sink', 'postgres', '--postgres-dsn',
      'postgresql://u@h/db', '--postgres-table', 'finserve_agg', '--customer-id', 'finserve']))
  assert (config.sink, config.postgres_dsn, config.postgres_table,
          config.postgres_dead_letter_table, config.customer_id) == (
              'postgres', 'postgresql://u@h/db', 'finserve_agg', 'dead_letters', 'finserve')
  default = RunConfig.from_options(PipelineOptions(['--output-dir', str(tmp_path)]))
  assert (default.sink, default.customer_id) == ('files', None)
