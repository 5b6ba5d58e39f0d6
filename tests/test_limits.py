"""Each rule an operator meets is defined once and given the same answer
everywhere: the limits of numeric settings (pipeline/settings/checks.py) in the
run's checks, the Flex Template's regexes and the customer file schema; the
customer id's rule (transforms/rules/model.py) in payloads, sinks, customer
files and the template."""

import copy
import json
import os
import re

import pytest
import yaml

from pipeline.deployment import customer as customers
from pipeline.settings.checks import (
    MAX_CHECKPOINT_INTERVAL_S, MAX_RECORDS, MAX_SECONDS, MAX_SHARDS)
from pipeline.settings.config import ConfigError, RunConfig
from pipeline.settings.options import OPTIONS, parse_args
from transforms.connectors.sinks import check_customer_id
from transforms.rules.model import CUSTOMER_ID_PATTERN, is_customer_id
from transforms.rules.payload import InvalidPayload, parse_payload

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUSTOMERS = os.path.join(REPO, 'templates', 'customers')
with open(os.path.join(REPO, 'templates', 'metadata.json'), encoding='utf-8') as f:
  METADATA = {p['name']: p for p in json.load(f)['parameters']}
REGEX = {o.dest: o.regex for o in OPTIONS}


def committed_schema():
  with open(customers.SCHEMA_PATH, encoding='utf-8') as f:
    return json.load(f)


def field(schema, pointer):
  node, key = customers.schema_field(schema, pointer)
  return node[key]


def config(tmp_path, *args):
  return RunConfig.from_options(parse_args(['--output-dir', str(tmp_path / 'out'), *args]))


def template_accepts(dest, value):
  """As Dataflow checks a parameter: the whole value matches the regex."""
  regex = METADATA[dest]['regexes'][0]
  assert regex == REGEX[dest]
  return re.fullmatch(regex, value) is not None


# ---------------------------------------------------------------------------
# The customer file schema's limits are checks.py's.

#: Every field of a customer file that a run checks against a limit, and it.
SCHEMA_LIMITS = {
    '/properties/window/properties/size_s/maximum': MAX_SECONDS,
    '/properties/window/properties/allowed_lateness_s/maximum': MAX_SECONDS,
    '/properties/window/properties/early_firing_s/maximum': MAX_SECONDS,
    '/properties/window/properties/rollups/items/properties/size_s/maximum': MAX_SECONDS,
    '/properties/window/properties/rollups/items/properties/allowed_lateness_s/maximum':
        MAX_SECONDS,
    '/properties/shards/maximum': MAX_SHARDS,
    '/properties/deploy/properties/flink/properties/checkpoint_interval_s/maximum':
        MAX_CHECKPOINT_INTERVAL_S,
}


@pytest.mark.parametrize('pointer, limit', sorted(SCHEMA_LIMITS.items()))
def test_the_committed_schema_has_the_limits_of_checks_py(pointer, limit):
  assert field(committed_schema(), pointer) == limit, (
      f'customer.schema.json {pointer} differs from pipeline/settings/checks.py: '
      'python -m tools.template_metadata')
  assert customers.SCHEMA_RULES[pointer] == limit


def test_the_committed_schema_is_what_the_generator_writes():
  from tools import template_metadata
  assert committed_schema() == customers.schema() == json.loads(
      template_metadata.render_schema()), (
      'customer.schema.json differs from customer.SCHEMA_RULES: python -m tools.template_metadata')


def test_every_duration_of_a_customer_file_is_bounded_by_max_seconds():
  """A duration field added to the window is not left without its limit."""
  def durations(node, pointer):
    for name, sub in node.get('properties', {}).items():
      if name.endswith('_s'):
        yield f'{pointer}/properties/{name}'
      yield from durations(sub, f'{pointer}/properties/{name}')
    if 'items' in node:
      yield from durations(node['items'], f'{pointer}/items')
  window = committed_schema()['properties']['window']
  found = list(durations(window, '/properties/window'))
  assert len(found) == 5
  for pointer in found:
    assert customers.SCHEMA_RULES[pointer + '/maximum'] == MAX_SECONDS, pointer


def test_the_customer_id_pattern_of_the_schema_is_the_rule():
  assert field(committed_schema(), '/properties/customer_id/pattern') == (
      '^' + CUSTOMER_ID_PATTERN + '$') == REGEX['customer_id']


def test_files_are_checked_against_the_limits_of_checks_py(tmp_path, monkeypatch):
  drifted = committed_schema()
  drifted['properties']['shards']['maximum'] = 4096
  path = tmp_path / 'customer.schema.json'
  path.write_text(json.dumps(drifted))
  monkeypatch.setattr(customers, 'SCHEMA_PATH', str(path))
  assert customers.schema() != drifted  # what the tests above compare
  assert customers.schema()['properties']['shards']['maximum'] == MAX_SHARDS
  spec = spec_of('finserve')
  spec['shards'] = MAX_SHARDS + 1
  with pytest.raises(customers.CustomerFileError) as e:
    load_spec(tmp_path, spec)
  assert (e.value.pointer, e.value.reason) == ('/shards', f'must be at most {MAX_SHARDS}')


def spec_of(name):
  with open(os.path.join(CUSTOMERS, f'{name}.yaml'), encoding='utf-8') as f:
    return yaml.safe_load(f)


def load_spec(tmp_path, spec, name=None):
  path = tmp_path / f'{name or spec["customer_id"]}.yaml'
  path.write_text(yaml.safe_dump(spec))
  return customers.load_file(str(path))


@pytest.mark.parametrize('path, limit', [
    (('window', 'size_s'), MAX_SECONDS),
    (('window', 'allowed_lateness_s'), MAX_SECONDS),
    (('window', 'early_firing_s'), MAX_SECONDS),
    (('shards',), MAX_SHARDS),
])
def test_a_customer_file_takes_the_limit_and_refuses_one_more(tmp_path, path, limit):
  spec = spec_of('finserve')
  node = spec
  for part in path[:-1]:
    node = node[part]
  node[path[-1]] = limit
  load_spec(tmp_path, spec)
  node[path[-1]] = limit + 1
  with pytest.raises(customers.CustomerFileError) as e:
    load_spec(tmp_path, spec)
  assert e.value.pointer == '/' + '/'.join(path)
  assert e.value.reason == f'must be at most {limit}'


def test_a_customer_files_checkpoint_interval_and_the_runs_agree_at_the_limit(tmp_path):
  spec = spec_of('dataflow-inc')
  spec['deploy']['flink']['checkpoint_interval_s'] = MAX_CHECKPOINT_INTERVAL_S
  load_spec(tmp_path, spec)
  spec['deploy']['flink']['checkpoint_interval_s'] = MAX_CHECKPOINT_INTERVAL_S + 1
  with pytest.raises(customers.CustomerFileError) as e:
    load_spec(tmp_path, spec)
  assert e.value.pointer == '/deploy/flink/checkpoint_interval_s'
  limit_ms = MAX_CHECKPOINT_INTERVAL_S * 1000
  config(tmp_path, f'--checkpointing_interval={limit_ms}')
  with pytest.raises(ConfigError, match='--checkpointing_interval'):
    config(tmp_path, f'--checkpointing_interval={limit_ms + 1}')


def test_a_customer_file_rollup_takes_max_seconds_and_refuses_one_more(tmp_path):
  spec = spec_of('dataflow-inc')
  spec['window']['rollups'] = [{'size_s': MAX_SECONDS, 'allowed_lateness_s': MAX_SECONDS}]
  load_spec(tmp_path, spec)
  for name in ('size_s', 'allowed_lateness_s'):
    bad = copy.deepcopy(spec)
    bad['window']['rollups'][0][name] = MAX_SECONDS + 1
    with pytest.raises(customers.CustomerFileError) as e:
      load_spec(tmp_path, bad)
    assert e.value.pointer == f'/window/rollups/0/{name}'


# ---------------------------------------------------------------------------
# The template's regexes and the run's checks agree at the limits.

#: Numeric options: (its limit, at least 1, the options a run needs with it).
NUMBERS = {
    'window_size': (MAX_SECONDS, True, ()),
    'allowed_lateness': (MAX_SECONDS, False, ()),
    'early_firing': (MAX_SECONDS, False, ()),
    'sample_memory_every': (MAX_SECONDS, True, ('--replay-mode', 'stream')),
    'expected_skew': (MAX_SECONDS, False, ()),
    'run_seconds': (MAX_SECONDS, True,
                    ('--source', 'pubsub:projects/tidemark-prod/subscriptions/acme-events')),
    'shards': (MAX_SHARDS, True, ()),
    'kafka_max_records': (MAX_RECORDS, True, ('--source', 'kafka:localhost:9092/acme-events')),
    'pubsub_max_messages': (MAX_RECORDS, True, (
        '--source', 'pubsub:projects/tidemark-prod/subscriptions/acme-events',
        '--runner', 'FlinkRunner')),
}


def test_every_numeric_option_has_its_limit_here():
  assert set(NUMBERS) == {o.dest for o in OPTIONS if o.number}


@pytest.mark.parametrize('dest', sorted(NUMBERS))
def test_the_template_and_the_run_agree_at_the_limit(tmp_path, dest):
  limit, positive, extra = NUMBERS[dest]
  flag = '--' + dest.replace('_', '-')
  # The limit: the template and the run take it.
  assert template_accepts(dest, str(limit))
  config(tmp_path, *extra, flag, str(limit))
  # One more: the template's regex bounds digits only; the run refuses it.
  with pytest.raises(ConfigError) as e:
    config(tmp_path, *extra, flag, str(limit + 1))
  assert e.value.field == flag and str(limit) in e.value.reason
  # A digit more than the limit has: the template refuses it too.
  assert not template_accepts(dest, str(10 ** len(str(limit))))
  # The least value.
  assert template_accepts(dest, '1')
  assert template_accepts(dest, '0') == (not positive)


def test_the_rollup_template_and_the_run_agree_at_the_limit(tmp_path):
  largest = f'{MAX_SECONDS}:{MAX_SECONDS}'
  assert template_accepts('rollup', largest)
  assert template_accepts('rollup', f'3600:0,{largest}')
  assert config(tmp_path, '--rollup', largest).rollups == ((MAX_SECONDS, MAX_SECONDS),)
  for value in (f'{MAX_SECONDS + 1}:0', f'{MAX_SECONDS}:{MAX_SECONDS + 1}'):
    assert template_accepts('rollup', value)
    with pytest.raises(ConfigError) as e:
      config(tmp_path, '--rollup', value)
    assert e.value.field == '--rollup' and str(MAX_SECONDS) in e.value.reason
  too_many_digits = 10 ** len(str(MAX_SECONDS))
  assert not template_accepts('rollup', f'{too_many_digits}:0')
  assert not template_accepts('rollup', f'3600:{too_many_digits}')


# ---------------------------------------------------------------------------
# The customer id: one rule, every place.

REFUSED_IDS = ['abc\n', '', 'c' * 65, 'fin serve!']
ACCEPTED_IDS = ['acme.io', 'c' * 64, 'fin.serve_1-x']


def payload(customer_id):
  return json.dumps({'event_id': 'e-1', 'customer_id': customer_id, 'key': 'AAPL',
                     'value': 1.5, 'event_time': '2024-01-01T00:00:00Z'})


@pytest.mark.parametrize('customer_id', REFUSED_IDS)
def test_a_bad_customer_id_is_refused_everywhere(tmp_path, customer_id):
  assert not is_customer_id(customer_id)
  with pytest.raises(InvalidPayload, match='customer_id'):
    parse_payload(payload(customer_id))
  with pytest.raises(ValueError, match='is not a contract customer id'):
    check_customer_id(customer_id)
  assert not template_accepts('customer_id', customer_id)
  with pytest.raises(ConfigError) as e:
    config(tmp_path, '--sink', 'postgres', '--postgres-dsn', 'postgresql://tidemark@db/tidemark',
           '--customer-id', customer_id)
  assert e.value.field == '--customer-id'
  # A customer file: by name, and by its customer_id field.
  with pytest.raises(customers.CustomerFileError, match='is not a customer name'):
    customers.find(customer_id, CUSTOMERS)
  spec = spec_of('finserve')
  spec['customer_id'] = customer_id
  # named after the id where a file can be, so that only the id's rule refuses it
  name = customer_id if customer_id and '\n' not in customer_id else 'finserve'
  with pytest.raises(customers.CustomerFileError) as e:
    load_spec(tmp_path, spec, name)
  assert e.value.pointer == '/customer_id'
  assert 'file name' not in e.value.reason


@pytest.mark.parametrize('customer_id', ACCEPTED_IDS)
def test_a_good_customer_id_is_accepted_everywhere(tmp_path, customer_id):
  assert is_customer_id(customer_id)
  assert parse_payload(payload(customer_id))[1] == customer_id
  assert check_customer_id(customer_id) == customer_id
  assert template_accepts('customer_id', customer_id)
  assert config(tmp_path, '--sink', 'postgres', '--postgres-dsn',
                'postgresql://tidemark@db/tidemark',
                '--customer-id', customer_id).customer_id == customer_id
  spec = spec_of('finserve')
  spec['customer_id'] = customer_id
  token = customers.token(customer_id)
  spec['source']['subscriptions'] = [f'projects/tidemark-prod/subscriptions/{customer_id}-trades']
  spec['sink']['table'] = f'tidemark-prod:{token}.aggregates'
  spec['sink']['dead_letter_table'] = f'tidemark-prod:{token}.dead_letters'
  folder = tmp_path / 'customers'
  folder.mkdir()
  assert load_spec(folder, spec).customer_id == customer_id
  assert customers.load(customer_id, str(folder)).customer_id == customer_id
