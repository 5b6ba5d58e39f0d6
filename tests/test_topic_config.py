"""``--aggregates-topic`` is checked before the run, naming the field."""

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.launch.build import topic_sink
from pipeline.settings.config import ConfigError, RunConfig, parse_aggregates_topic
from transforms.connectors.topics import PublishAggregatesToKafka, PublishAggregatesToPubSub


def config(tmp_path, topic):
  return RunConfig.from_options(PipelineOptions([
      f'--output-dir={tmp_path}', f'--aggregates-topic={topic}']))


@pytest.mark.parametrize('spec, expected', [
    ('kafka:127.0.0.1:9092/aggs', ('kafka', '127.0.0.1:9092', 'aggs')),
    ('kafka:a:1,b:2/aggs.v1', ('kafka', 'a:1,b:2', 'aggs.v1')),
    ('pubsub:projects/my-proj/topics/aggs', ('pubsub', '', 'projects/my-proj/topics/aggs')),
])
def test_a_good_topic_is_parsed(spec, expected):
  assert parse_aggregates_topic(spec) == expected


@pytest.mark.parametrize('spec', [
    'aggs', 'sqs:queue', 'kafka:', 'kafka:host/aggs', 'kafka:h:1/a,b', 'kafka:h:1/n=aggs',
    'kafka:h:1/bad topic', 'pubsub:aggs', 'pubsub:projects/p/subscriptions/s',
    'pubsub:projects/Bad_Project/topics/aggs',
])
def test_a_bad_topic_stops_the_run_naming_the_field(tmp_path, spec):
  with pytest.raises(ConfigError) as e:
    config(tmp_path, spec)
  assert e.value.field == '--aggregates-topic'


def test_the_option_selects_the_publisher(tmp_path):
  assert topic_sink(config(tmp_path, 'kafka:127.0.0.1:19092/aggs')).__class__ is \
      PublishAggregatesToKafka
  assert isinstance(
      topic_sink(config(tmp_path, 'pubsub:projects/my-proj/topics/aggs')),
      PublishAggregatesToPubSub)
  assert topic_sink(RunConfig.from_options(PipelineOptions([f'--output-dir={tmp_path}']))) \
      is None
