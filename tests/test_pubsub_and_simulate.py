"""The Pub/Sub source's pieces that need no server (payload decoding, the ts
attribute, config), the DirectRunner watermark check, and the simulator's
messages and records (Pub/Sub attributes, Kafka records, shift to now)."""

import json
import os
import subprocess
import sys

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils.timestamp import Timestamp

from conftest import T0, payload
from tools import reference, simulate, traffic
from pipeline.launch.build import read_source
from pipeline.settings.config import ConfigError, RunConfig, watermark_risks
from pipeline.settings.runners import capabilities
from transforms.connectors.pubsub import (
    WATERMARK_DELAY_S, ReadPubSubEvents, check_subscription_path, timestamp_from_attribute)
from transforms.connectors.sources import decode_payload

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUB = 'projects/tidemark-local/subscriptions/orders-a'


def config(*args, runner='DirectRunner'):
  """A run's config on ``runner``; its outputs in a bucket where its workers are remote."""
  remote = capabilities(runner).remote_workers
  return RunConfig.from_options(PipelineOptions(
      [f'--runner={runner}', *(['--output-dir=gs://tidemark-test/out'] if remote else []), *args]))


# --- source pieces --------------------------------------------------------------

@pytest.mark.parametrize('raw', [
    b'{"a": 1}', 'caf\u00e9 \u2603'.encode('utf-8'), b'\xff\xfe{', b'{"x": "\xed\xa0\x80"}', b''])
def test_payload_decoding_is_lossless_and_invalid_utf8_stays_invalid(raw):
  text = decode_payload(raw)
  assert text.encode('utf-8', 'surrogateescape') == raw
  try:
    raw.decode('utf-8')
    assert reference.validate(text) == reference.validate(raw.decode('utf-8'))
  except UnicodeDecodeError:
    assert reference.validate(text) is None  # not UTF-8: invalid, never repaired


@pytest.mark.parametrize('value, millis', [
    ('1705543200000', T0), ('2024-01-18T02:00:00Z', T0), (None, None), ('', None),
    ('garbage', None), ('99999999999999999999999', None), ('-99999999999999999999', None),
    ('1.5', None)])
def test_the_ts_attribute_is_read_or_left_out_never_raising(value, millis):
  stamp = timestamp_from_attribute(value)
  assert stamp == (None if millis is None else Timestamp(micros=millis * 1000))


@pytest.mark.parametrize('path', [
    'projects/p/subscriptions/s', 'project/tidemark/subscriptions/sub', SUB + '/x',
    'projects/tidemark-local/topics/orders', 'projects/tidemark-local/subscriptions/goog-x',
    'projects//subscriptions/orders'])
def test_bad_subscription_paths_are_refused(path):
  with pytest.raises(ValueError, match='subscription path'):
    check_subscription_path(path)


def test_read_pubsub_events_validates_in_init():
  with pytest.raises(ValueError, match='at least one'):
    ReadPubSubEvents({})
  with pytest.raises(ValueError, match='its own subscription'):
    ReadPubSubEvents({'A': SUB, 'B': SUB})
  with pytest.raises(ValueError, match='id_label'):
    ReadPubSubEvents({'A': SUB}, id_label='')
  with pytest.raises(ValueError, match='watermark_delay_s'):
    ReadPubSubEvents({'A': SUB}, expansion_service='localhost:1', watermark_delay_s=-1)
  assert ReadPubSubEvents({'A': SUB}, id_label='event_id').subscriptions == {'A': SUB}


def test_the_java_reads_watermark_trails_by_the_expected_skew_or_two_seconds():
  flink = ['--runner=PortableRunner', '--job_endpoint=localhost:18099', '--streaming',
           '--checkpointing_interval=2000', f'--source=pubsub:A={SUB}', '--output-dir=/tmp/o']
  read = read_source(RunConfig.from_options(PipelineOptions(flink)))
  assert read.watermark_delay_s == WATERMARK_DELAY_S == 2
  read = read_source(RunConfig.from_options(PipelineOptions(flink + ['--expected-skew=7'])))
  assert read.watermark_delay_s == 7


def test_pubsub_max_messages_bounds_the_java_read_of_each_subscription():
  flink = ['--runner=PortableRunner', '--job_endpoint=localhost:18099', '--streaming',
           '--checkpointing_interval=2000', f'--source=pubsub:A={SUB}', '--output-dir=/tmp/o']
  unbounded = read_source(RunConfig.from_options(PipelineOptions(flink)))
  assert unbounded.java_read_config(SUB)['max_num_records'] is None
  # A bounded read acknowledges as it ends, and its job ends only without checkpoints.
  bounded_flink = [o for o in flink if not o.startswith('--checkpointing_interval')]
  bounded = read_source(RunConfig.from_options(
      PipelineOptions(bounded_flink + ['--pubsub-max-messages=500'])))
  assert bounded.java_read_config(SUB) == {
      'subscription': SUB, 'timestamp_attribute': 'ts', 'watermark_delay_ms': 2000,
      'max_num_records': 500}


def test_pubsub_max_messages_is_refused_where_the_read_cannot_be_bounded():
  # The DirectRunner reads Pub/Sub in Python, without a bound.
  with pytest.raises(ConfigError) as e:
    config(f'--source=pubsub:{SUB}', '--pubsub-max-messages=10')
  assert e.value.field == '--pubsub-max-messages' and 'DirectRunner' in e.value.reason
  with pytest.raises(ConfigError) as e:
    config(f'--source=pubsub:{SUB}', '--pubsub-max-messages=10', '--checkpointing_interval=2000',
           runner='FlinkRunner')
  assert e.value.field == '--pubsub-max-messages' and 'checkpoints' in e.value.reason
  with pytest.raises(ValueError, match='max_num_records'):
    ReadPubSubEvents({'A': SUB}, max_num_records=10)
  with pytest.raises(ValueError, match='max_num_records'):
    ReadPubSubEvents({'A': SUB}, expansion_service='localhost:1', max_num_records=0)


# --- config -----------------------------------------------------------------------

def test_pubsub_source_names_default_to_the_subscription_id():
  c = config(f'--source=pubsub:{SUB},B=projects/tidemark-local/subscriptions/orders-b')
  assert c.source_kind == 'pubsub' and c.unbounded
  assert c.pubsub_subscriptions == {
      'orders-a': SUB, 'B': 'projects/tidemark-local/subscriptions/orders-b'}
  assert c.accounting_update_s is not None


@pytest.mark.parametrize('source', [
    'pubsub:', 'pubsub:projects/x/topics/t', f'pubsub:{SUB},{SUB}',
    f'pubsub:A={SUB},A=projects/tidemark-local/subscriptions/other', 'pubsub:=' + SUB,
    'kinesis:stream'])
def test_bad_pubsub_sources_name_the_field(source):
  with pytest.raises(ConfigError) as e:
    config(f'--source={source}')
  assert e.value.field == '--source'


def test_id_label_comes_from_config_and_the_direct_runner_gets_none():
  assert config(f'--source=pubsub:{SUB}').pubsub_id_label is None
  assert config(f'--source=pubsub:{SUB}', runner='DataflowRunner').pubsub_id_label == 'event_id'
  assert config(f'--source=pubsub:{SUB}', '--pubsub-id-label=none',
                runner='DataflowRunner').pubsub_id_label is None
  with pytest.raises(ConfigError) as e:
    config(f'--source=pubsub:{SUB}', '--pubsub-id-label=event_id')
  assert e.value.field == '--pubsub-id-label'


def test_on_flink_pubsub_is_read_in_java_checkpointed_and_without_an_id_label():
  flink = [f'--source=pubsub:{SUB}', '--checkpointing_interval=2000']
  on_flink = config(*flink, runner='PortableRunner')
  assert on_flink.pubsub_expansion_service == 'localhost:18096'
  assert on_flink.pubsub_id_label is None  # the source drops redelivered message ids
  assert config(*flink, '--pubsub-expansion-service=127.0.0.1:9000',
                runner='FlinkRunner').pubsub_expansion_service == '127.0.0.1:9000'
  assert config(f'--source=pubsub:{SUB}').pubsub_expansion_service is None  # DirectRunner
  assert config(f'--source=pubsub:{SUB}', runner='DataflowRunner').pubsub_expansion_service is None
  with pytest.raises(ConfigError) as e:  # acks follow checkpoints: none, no acks
    config(f'--source=pubsub:{SUB}', runner='PortableRunner')
  assert e.value.field == '--checkpointing_interval' and 'acknowledges' in str(e.value)
  with pytest.raises(ConfigError) as e:
    config(*flink, '--pubsub-id-label=event_id', runner='PortableRunner')
  assert e.value.field == '--pubsub-id-label'
  with pytest.raises(ValueError, match='id_label'):
    ReadPubSubEvents({'A': SUB}, id_label='event_id', expansion_service='localhost:1')


def test_the_java_read_reaches_the_emulator_the_launcher_names(monkeypatch):
  from pipeline.settings.options import JavaPubsubOptions
  from pipeline.settings.runners import NO_CREDENTIALS, reach_pubsub_emulator
  monkeypatch.setenv('PUBSUB_EMULATOR_HOST', '127.0.0.1:18085')
  options = PipelineOptions([])
  reach_pubsub_emulator(options, java_pubsub_read=True)
  java = options.view_as(JavaPubsubOptions)
  assert (java.pubsub_root_url, java.credential_factory_class) == (
      'http://127.0.0.1:18085', NO_CREDENTIALS)
  # Java reads it as pubsubRootUrl: the portable options carry the snake-case name.
  assert options.get_all_options()['pubsub_root_url'] == 'http://127.0.0.1:18085'
  given = PipelineOptions(['--java_pubsub_root_url=https://pubsub.example:443'])
  reach_pubsub_emulator(given, java_pubsub_read=True)
  assert given.view_as(JavaPubsubOptions).pubsub_root_url == 'https://pubsub.example:443'
  untouched = PipelineOptions([])
  reach_pubsub_emulator(untouched, java_pubsub_read=False)
  assert untouched.view_as(JavaPubsubOptions).pubsub_root_url is None
  monkeypatch.delenv('PUBSUB_EMULATOR_HOST')
  production = PipelineOptions([])
  reach_pubsub_emulator(production, java_pubsub_read=True)
  assert production.view_as(JavaPubsubOptions).credential_factory_class is None


def test_the_java_reads_proto_becomes_the_message_it_was():
  from google.pubsub_v1 import types
  from transforms.connectors.pubsub import message_from_proto
  proto = types.PubsubMessage(data=b'{"a": 1}\xff', attributes={'ts': 'garbage'},
                              message_id='42')
  message = message_from_proto(types.PubsubMessage.serialize(proto))
  assert (message.data, message.attributes, message.message_id) == (
      b'{"a": 1}\xff', {'ts': 'garbage'}, '42')


def test_the_direct_runner_wall_clock_watermark_is_flagged_before_running():
  base = [f'--source=pubsub:{SUB}', '--window-size=60', '--allowed-lateness=30']
  assert 'WALL CLOCK' in watermark_risks(config(*base), 'DirectRunner')[0]
  assert watermark_risks(config(*base, '--expected-skew=30'), 'DirectRunner') == []
  [warning] = watermark_risks(config(*base, '--expected-skew=45'), 'DirectRunner')
  assert 'WILL be lost' in warning and 'at least 45 s' in warning
  with pytest.raises(ConfigError) as e:
    watermark_risks(config(*base, '--expected-skew=90'), 'DirectRunner')
  assert e.value.field == '--allowed-lateness'
  assert watermark_risks(config(*base), 'DataflowRunner') == []
  assert watermark_risks(config('--allowed-lateness=0'), 'DirectRunner') == []  # replay


def cli(*args, module='pipeline'):
  env = {**os.environ, 'PYTHONPATH': REPO}
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300, env=env)


def test_the_cli_refuses_a_run_that_would_lose_everything(tmp_path):
  out = tmp_path / 'out'
  result = cli('run', f'--source=pubsub:{SUB}', '--window-size=60', '--allowed-lateness=30',
               '--expected-skew=600', f'--output-dir={out}')
  assert result.returncode == 2
  assert '--allowed-lateness' in result.stderr and 'wall-clock' in result.stderr
  assert not out.exists()


# --- the simulator ------------------------------------------------------------------

def test_pubsub_messages_carry_ts_and_event_id_from_the_payload():
  message = simulate.to_publish(traffic.Data('A', payload('e-1', T0 + 5), T0 + 999))
  data, attributes = simulate.pubsub_message(message)
  assert json.loads(data) == json.loads(payload('e-1', T0 + 5))
  assert attributes == {'ts': str(T0 + 5), 'event_id': 'e-1'}
  garbage = simulate.to_publish(traffic.Data('B', 'not json', T0 + 7))
  assert simulate.pubsub_message(garbage) == (b'not json', {'ts': str(T0 + 7)})


def test_kafka_records_use_event_time_and_customer_key():
  message = simulate.to_publish(traffic.Data(
      'C', payload('e-2', '2024-01-18T03:00:00.250+01:00', customer_id='acme.io'), 0))
  record = simulate.kafka_record(message, 'tm-')
  assert record == dict(topic='tm-C', key=b'acme.io', value=message.payload.encode(),
                        timestamp=T0 + 250)
  lone = simulate.to_publish(traffic.Data('A', '{"x": "\ud800"}', T0))
  record = simulate.kafka_record(lone, 'tm-')
  assert record['key'] is None and record['timestamp'] == T0
  assert record['value'] == b'{"x": "\xed\xa0\x80"}'  # goes out as invalid UTF-8


def test_shift_to_now_moves_valid_events_by_whole_windows_and_leaves_garbage():
  lines = list(traffic.generate(traffic.Profile(messages=400, seed=3)))
  now = T0 + 10 ** 9 + 12345
  offset = simulate.shift_to_now_offset(lines, 60, now_ms=now)
  assert offset % 60000 == 0
  originals = [line for line in lines if isinstance(line, traffic.Data)]
  shifted = [simulate.to_publish(line, offset) for line in originals]
  assert min(m.event_time for m in shifted) >= now > min(m.event_time for m in shifted) - 60000
  for before, after in zip(originals, shifted):
    fields = reference.validate(before.payload)
    if fields is None:
      assert after.payload == before.payload  # garbage is never rewritten
      assert reference.validate(after.payload) is None
    else:
      moved = reference.validate(after.payload)
      assert moved[:4] == fields[:4] and moved[4] == fields[4] + offset == after.event_time
      assert isinstance(json.loads(after.payload)['event_time'], type(
          json.loads(before.payload)['event_time']))


def test_simulate_to_replay_keeps_every_outcome_when_shifted(tmp_path):
  plain, shifted = tmp_path / 'plain.jsonl', tmp_path / 'shifted.jsonl'
  for path, extra in ((plain, []), (shifted, ['--shift-to-now'])):
    result = cli('simulate', '--to', 'replay', '--out', str(path), '--messages', '600',
                 '--seed', '5', '--rate', '0', *extra, module='tools')
    assert result.returncode == 0, result.stderr
    assert 'messages/s' in result.stdout
  a = reference.compute(str(plain), 60, 30)
  b = reference.compute(str(shifted), 60, 30)
  assert a.accounting == b.accounting and a.accounting['received'] == 600
  assert sorted(v for v in a.windows.values()) == sorted(v for v in b.windows.values())


def test_the_simulator_paces_to_the_requested_rate():
  lines = [traffic.Data('A', payload(f'e{n}', T0), T0) for n in range(20)]

  class Collect:
    sent = []
    send = sent.append
    send_watermark = staticmethod(lambda mark: None)
    close = staticmethod(lambda: None)

  report = simulate.simulate(lines, Collect(), rate=100)
  assert report.messages == 20 and len(Collect.sent) == 20
  assert 0.18 <= report.seconds < 1.0  # 20 messages at 100/s: ~0.19 s
