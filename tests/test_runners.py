"""The runner table (pipeline/settings/runners.py) and the choices that read it."""

from __future__ import annotations

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.settings.checks import ConfigError
from pipeline.settings.config import RunConfig
from pipeline.settings.options import FlinkRunnerJavaOptions
from pipeline.settings.runners import (
    OTHER, RUNNERS, capabilities, finish_bundles_at_checkpoints, runner_name)


def test_a_runner_is_known_by_its_class_name_however_it_is_given():
  assert runner_name(None) == runner_name(PipelineOptions([])) == 'DirectRunner'
  assert runner_name(PipelineOptions(
      ['--runner=apache_beam.runners.portability.flink_runner.FlinkRunner'])) == 'FlinkRunner'
  assert capabilities('apache_beam.runners.direct.direct_runner.DirectRunner').in_process
  assert capabilities(PipelineOptions(['--runner=PortableRunner'])) == RUNNERS['FlinkRunner']
  assert capabilities('DataflowRunner') == OTHER


def test_the_choices_follow_the_table():
  def config(runner, *args):
    outputs = ['--output-dir=gs://tidemark-test/out'] if capabilities(runner).remote_workers else []
    return RunConfig.from_options(PipelineOptions([f'--runner={runner}', *outputs, *args]))
  # a replay runs in bulk only where the table says so
  assert config('DirectRunner').replay_mode == 'bulk'
  assert config('FlinkRunner').replay_mode == 'stream'
  # processing-time steps only where a TestStream can advance processing time
  assert not config('FlinkRunner').replay_processing_time
  assert config('DataflowRunner').replay_processing_time
  # Pub/Sub redeliveries are dropped by id label where the runner honours it
  pubsub = ('--source=pubsub:projects/p-123456/subscriptions/events', '--allowed-lateness=0')
  assert config('DataflowRunner', *pubsub).pubsub_id_label == 'event_id'
  assert config('DirectRunner', *pubsub).pubsub_id_label is None


def test_a_runner_whose_workers_are_elsewhere_writes_to_a_bucket_not_a_local_folder():
  with pytest.raises(ConfigError) as e:
    RunConfig.from_options(PipelineOptions(['--runner=DataflowRunner', '--output-dir=/tmp/out']))
  assert e.value.field == '--output-dir' and 'gs://BUCKET/PATH' in str(e.value)
  assert RunConfig.from_options(PipelineOptions(
      ['--runner=DataflowRunner', '--output-dir=gs://b/out'])).output_dir == 'gs://b/out'
  assert RunConfig.from_options(PipelineOptions(['--output-dir=/tmp/out'])).output_dir == '/tmp/out'


FLINK = ['--runner=PortableRunner', '--job_endpoint=localhost:18099', '--output-dir=/tmp/out',
         '--source=kafka:localhost:9092/A=a', '--streaming']


def _finish_bundle(args) -> object:
  options = PipelineOptions(args)
  finish_bundles_at_checkpoints(options, RunConfig.from_options(options).checkpointed)
  return options.view_as(FlinkRunnerJavaOptions).finish_bundle_before_checkpointing


def test_a_checkpointed_flink_run_finishes_its_bundles_before_each_checkpoint():
  assert _finish_bundle(FLINK + ['--checkpointing_interval=2000']) == 'true'
  assert _finish_bundle(
      FLINK + ['--checkpointing_interval=2000', '--finish_bundle_before_checkpointing=true']) == 'true'
  assert _finish_bundle(FLINK) is None  # no checkpoints: nothing is finished for them
  assert _finish_bundle(['--output-dir=/tmp/out']) is None  # the DirectRunner


def test_a_checkpointed_run_that_turns_off_finishing_bundles_is_refused_by_name():
  with pytest.raises(ConfigError) as e:
    RunConfig.from_options(PipelineOptions(
        FLINK + ['--checkpointing_interval=2000', '--finish_bundle_before_checkpointing=false']))
  assert e.value.field == '--finish_bundle_before_checkpointing'
  assert 'drop admitted events' in str(e.value)
