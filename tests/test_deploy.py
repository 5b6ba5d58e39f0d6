"""Customer files and ``python -m pipeline deploy``: every shipped file
validates, its dry run prints a complete launch that the pipeline's own option
checks and the Flex Template's metadata accept, and a bad file is refused
naming the field."""

import copy
import glob
import json
import os
import re
import shutil
import shlex
import stat
import subprocess
import sys

import pytest
import yaml
from apache_beam.options.pipeline_options import (
    PipelineOptions, PortableOptions, StandardOptions)

from pipeline.deployment import customer as customers
from pipeline.settings.config import BUNDLED_REPLAY, RunConfig
from pipeline.deployment.deploy import launch_command
from pipeline.settings.options import TidemarkOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUSTOMER_FILES = sorted(glob.glob(os.path.join(REPO, 'templates', 'customers', '*.*')))
with open(os.path.join(REPO, 'templates', 'metadata.json')) as f:
  METADATA = {p['name']: p for p in json.load(f)['parameters']}


def deploy(*args, env=None):
  return subprocess.run(
      [sys.executable, '-m', 'pipeline', 'deploy', *args], cwd=REPO, capture_output=True,
      text=True, timeout=300, env={**os.environ, 'PYTHONPATH': REPO, **(env or {})})


def option_dests():
  import argparse
  parser = argparse.ArgumentParser()
  TidemarkOptions._add_argparse_args(parser)
  return {a.dest for a in parser._actions if a.dest != 'help'}


def spec_of(name):
  with open(os.path.join(REPO, 'templates', 'customers', f'{name}.yaml')) as f:
    return yaml.safe_load(f)


def checked_config(params):
  """RunConfig from the launch's parameters, through the run's own checks.
  The source is swapped for a replay: this branch knows no pubsub/kafka
  source kinds yet (they come from the source branches)."""
  args = [f'--{k}={x}' for k, v in params.items() if k != 'source'
          for x in (v if isinstance(v, list) else [v])]  # --rollup repeats
  return RunConfig.from_options(PipelineOptions(args + [f'--source=replay:{BUNDLED_REPLAY}']))


def test_the_shipped_customers_are_there():
  names = {os.path.splitext(os.path.basename(p))[0] for p in CUSTOMER_FILES}
  assert {'finserve', 'dataflow-inc'} <= names


@pytest.mark.parametrize('path', CUSTOMER_FILES, ids=os.path.basename)
def test_every_customer_file_validates_and_maps_to_known_options(path):
  c = customers.load_file(path)
  params = dict(customers.run_parameters(c))
  assert set(params) <= option_dests()
  assert params['customer_id'] == c.customer_id
  for target in c.spec['deploy']:
    assert launch_command(c, target)


def test_the_flex_template_metadata_is_generated_from_the_option_definitions():
  from tools import template_metadata
  with open(template_metadata.PATH, encoding='utf-8') as f:
    assert f.read() == template_metadata.render(), (
        'templates/metadata.json differs from the options: python -m tools.template_metadata')
  assert set(METADATA) == option_dests()
  for name, p in METADATA.items():
    assert p['label'] and len(p['helpText']) > 20, name
    assert p['regexes'] and all(re.compile(r) for r in p['regexes'])
  assert [n for n, p in METADATA.items() if not p['isOptional']] == ['source']


def parse_gcloud_dict(value):
  delimiter = ','
  m = re.match(r'^\^(.)\^', value)
  if m:
    delimiter, value = m.group(1), value[3:]
  return dict(item.split('=', 1) for item in value.split(delimiter))


def test_finserve_dry_run_prints_the_complete_flex_template_launch():
  result = deploy('--customer', 'finserve', '--target', 'dataflow', '--dry-run')
  assert result.returncode == 0, result.stderr
  command = shlex.split(result.stdout)
  assert len(result.stdout.strip().splitlines()) == 1
  assert command[:5] == ['gcloud', 'dataflow', 'flex-template', 'run', 'finserve-trading-1m']
  flags = dict(arg[2:].split('=', 1) for arg in command[5:])
  spec = spec_of('finserve')
  target = spec['deploy']['dataflow']
  assert flags['project'] == 'tidemark-prod' and flags['region'] == 'europe-west1'
  assert flags['template-file-gcs-location'] == target['template_file']
  assert flags['temp-location'] == target['temp_location']
  assert flags['service-account-email'] == target['service_account']
  assert flags['max-workers'] == '10'
  assert flags['additional-user-labels'] == 'tidemark-customer=finserve'

  params = parse_gcloud_dict(flags['parameters'])
  assert params == {
      'source': 'pubsub:' + ','.join(spec['source']['subscriptions']),
      'window_size': '60', 'allowed_lateness': '10', 'early_firing': '5', 'shards': '8',
      'customer_id': 'finserve', 'sink': 'bigquery',
      'bigquery_table': spec['sink']['table'],
      'bigquery_dead_letter_table': spec['sink']['dead_letter_table'],
      'output_dir': target['output_dir'], 'sqlite': 'none'}
  for name, value in params.items():  # what Dataflow checks before launching
    assert any(re.match(r, value) for r in METADATA[name]['regexes']), (name, value)
  config = checked_config(params)
  assert (config.window_size_s, config.allowed_lateness_s, config.early_firing_s) == (60, 10, 5)
  assert (config.sink, config.customer_id, config.bigquery_table, config.sqlite_path) == (
      'bigquery', 'finserve', 'tidemark-prod:finserve_trading.aggregates_1m', None)


def test_dataflow_inc_dry_run_prints_the_complete_flink_submission():
  result = deploy('--customer', 'dataflow-inc', '--target', 'flink', '--dry-run')
  assert result.returncode == 0, result.stderr
  command = shlex.split(result.stdout)
  assert command[:4] == [sys.executable, '-m', 'pipeline', 'run']
  options = PipelineOptions(command[4:])
  portable = options.view_as(PortableOptions)
  assert options.view_as(StandardOptions).runner == 'PortableRunner'
  assert options.view_as(StandardOptions).streaming
  assert (portable.job_endpoint, portable.artifact_endpoint, portable.environment_type,
          portable.environment_config) == (
      'localhost:18099', 'localhost:18098', 'EXTERNAL', '127.0.0.1:18050')
  # to the session cluster, detached, checkpointed every 10 s, restorable by name
  assert command[command.index('--flink_master') + 1] == '127.0.0.1:18081'
  assert command[command.index('--checkpointing_interval') + 1] == '10000'
  assert command[command.index('--job_name') + 1] == 'dataflow-inc-iot-rollups'
  # parallelism 2, and an SDK worker process (a GIL) for each of the two slots
  assert command[command.index('--parallelism') + 1] == '2'
  assert int(portable.sdk_worker_parallelism) == 2
  opts = options.view_as(TidemarkOptions)
  assert opts.source == 'kafka:127.0.0.1:19092/dataflow-inc.iot-readings'
  params = {d: getattr(opts, d) for d in option_dests() if getattr(opts, d) is not None}
  config = checked_config(params)
  assert (config.window_size_s, config.allowed_lateness_s, config.early_firing_s) == (
      60, 300, 60)
  assert opts.rollup == ['3600:900']  # minute and hourly rollups from one run
  assert config.rollups == ((3600, 900),)
  assert (config.sink, config.customer_id, config.postgres_table,
          config.postgres_dead_letter_table) == (
              'postgres', 'dataflow-inc', 'dataflow_inc_rollups', 'dataflow_inc_dead_letters')
  assert config.postgres_dsn == 'postgresql://tidemark@127.0.0.1:15433/tidemark'


def test_an_upgrade_dry_run_prints_a_savepoint_of_the_running_job_then_the_restore():
  result = deploy('--customer', 'dataflow-inc', '--target', 'flink', '--upgrade', '--dry-run')
  assert result.returncode == 0, result.stderr
  request, submission = result.stdout.splitlines()
  # a savepoint taken while the job runs, then a cancel: a /stop would finish
  # Beam's operators first, and they fire every window on finish
  target, body = request.split(' {', 1)
  assert target == ('POST http://127.0.0.1:18081/jobs/<the running job named '
                    'dataflow-inc-iot-rollups>/savepoints')
  assert json.loads('{' + body) == {'cancel-job': True}
  command = shlex.split(submission)
  assert command[command.index('--savepoint_path') + 1] == '<the savepoint the stop wrote>'
  assert command[command.index('--job_name') + 1] == 'dataflow-inc-iot-rollups'


def test_a_resume_dry_run_prints_the_restore_from_the_latest_checkpoint():
  result = deploy('--customer', 'dataflow-inc', '--target', 'flink', '--resume', '--dry-run')
  assert result.returncode == 0, result.stderr
  command = shlex.split(result.stdout.strip())
  assert command[command.index('--savepoint_path') + 1] == (
      '<the latest checkpoint of the last job>')


def test_the_latest_retained_checkpoint_is_the_newest_complete_one(tmp_path):
  from pipeline.deployment.flink_cluster import FlinkCluster

  class Cluster(FlinkCluster):
    def config(self):
      return {'state.checkpoints.dir': f'file://{tmp_path}'}

  job = tmp_path / 'a1b2'
  for n, complete in ((7, True), (9, True), (10, False), (11, False)):
    (job / f'chk-{n}').mkdir(parents=True)
    if complete:
      (job / f'chk-{n}' / '_metadata').write_bytes(b'meta')
  (job / 'shared').mkdir()
  cluster = Cluster('127.0.0.1:1')
  assert cluster.latest_retained_checkpoint('a1b2') == str(job / 'chk-9')
  assert cluster.latest_retained_checkpoint('other') is None


def test_a_resume_without_an_earlier_job_says_so_and_submits_nothing(tmp_path):
  import http.server
  import threading

  class Overview(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
      body = b'{"jobs": []}'
      self.send_response(200)
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *_args):
      pass

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Overview)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    spec = spec_of('dataflow-inc')
    spec['deploy']['flink']['flink_master'] = f'127.0.0.1:{server.server_port}'
    path = tmp_path / 'dataflow-inc.json'
    path.write_text(json.dumps(spec))
    result = subprocess.run(
        [sys.executable, '-m', 'pipeline', 'deploy', '--customer-file', str(path), '--target',
         'flink', '--resume'], cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
        env={**os.environ, 'PYTHONPATH': REPO})
  finally:
    server.shutdown()
  assert result.returncode == 1
  assert 'names no earlier job' in result.stderr and 'Traceback' not in result.stderr
  assert 'launching' not in result.stderr


def test_rollups_reach_the_flex_template_as_one_parameter(tmp_path):
  spec = spec_of('finserve')
  spec['window']['rollups'] = [{'size_s': 3600, 'allowed_lateness_s': 60},
                               {'size_s': 86400, 'allowed_lateness_s': 600}]
  (tmp_path / 'finserve.yaml').write_text(yaml.safe_dump(spec))
  result = deploy('--customer', 'finserve', '--customers-dir', str(tmp_path),
                  '--target', 'dataflow', '--dry-run')
  assert result.returncode == 0, result.stderr
  flags = dict(arg[2:].split('=', 1) for arg in shlex.split(result.stdout)[5:])
  assert flags['parameters'].startswith('^')  # commas inside: gcloud's other delimiter
  params = parse_gcloud_dict(flags['parameters'])
  assert params['rollup'] == '3600:60,86400:600'
  assert any(re.match(r, params['rollup']) for r in METADATA['rollup']['regexes'])
  assert checked_config(params).rollups == ((3600, 60), (86400, 600))


def test_a_target_the_customer_has_not_configured_is_refused():
  result = deploy('--customer', 'dataflow-inc', '--target', 'dataflow', '--dry-run')
  assert result.returncode == 2 and '/deploy/dataflow' in result.stderr
  result = deploy('--customer', 'nobody', '--target', 'flink', '--dry-run')
  assert result.returncode == 2 and 'finserve' in result.stderr


def test_without_dry_run_it_launches_exactly_the_printed_command(tmp_path):
  # gcloud itself is not installed here: a stand-in on PATH records its argv.
  record = tmp_path / 'argv.json'
  gcloud = tmp_path / 'gcloud'
  gcloud.write_text(
      f'#!{sys.executable}\nimport json, sys\n'
      f'json.dump(sys.argv[1:], open({str(record)!r}, "w"))\nsys.exit(7)\n')
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  env = {'PATH': f'{tmp_path}{os.pathsep}{os.environ["PATH"]}'}
  printed = deploy('--customer', 'finserve', '--target', 'dataflow', '--dry-run', env=env)
  launched = deploy('--customer', 'finserve', '--target', 'dataflow', env=env)
  assert launched.returncode == 7  # gcloud's exit code is passed on
  assert ['gcloud'] + json.loads(record.read_text()) == shlex.split(printed.stdout)


def mutate(spec, path, value):
  *parents, last = path
  node = spec
  for p in parents:
    node = node[p]
  if value is KeyError:
    del node[last]
  else:
    node[last] = value


@pytest.mark.parametrize('name, path, value, pointer', [
    ('finserve', ['window', 'size_s'], KeyError, '/window/size_s'),
    ('finserve', ['window', 'size_s'], 0, '/window/size_s'),
    ('finserve', ['window', 'allowed_lateness_s'], '10', '/window/allowed_lateness_s'),
    ('finserve', ['source', 'kind'], 'kinesis', '/source/kind'),
    ('finserve', ['source', 'subscriptions', 1],
     'projects/tidemark-prod/subscriptions/acme-trades', '/source/subscriptions/1'),
    ('finserve', ['source', 'subscriptions', 0],
     'projects/tidemark-prod/subscriptions/finservex-trades', '/source/subscriptions/0'),
    ('finserve', ['source', 'subscriptions', 0], 'finserve-trades', '/source/subscriptions/0'),
    ('finserve', ['sink', 'table'], 'tidemark-prod:acme_io.aggregates', '/sink/table'),
    ('finserve', ['sink', 'dead_letter_table'], 'tidemark-prod:finserve_trading.aggregates_1m',
     '/sink/dead_letter_table'),
    ('finserve', ['sink', 'password'], 'hunter2', '/sink/password'),
    ('finserve', ['customer_id'], 'acme.io', '/customer_id'),
    ('finserve', ['deploy', 'dataflow', 'job_name'], 'FinServe_1m', '/deploy/dataflow/job_name'),
    ('finserve', ['deploy'], {}, '/deploy'),
    ('dataflow-inc', ['source', 'topics', 0], 'acme.io.readings', '/source/topics/0'),
    ('dataflow-inc', ['source', 'subscriptions'], ['x'], '/source/subscriptions'),
    ('dataflow-inc', ['sink', 'table'], 'finserve_rollups', '/sink/table'),
    ('dataflow-inc', ['sink', 'table'], 'rollups; DROP TABLE x', '/sink/table'),
    ('dataflow-inc', ['sink', 'dsn'], 'postgresql://tidemark:secret@db:5432/tidemark',
     '/sink/dsn'),
    ('dataflow-inc', ['deploy', 'flink', 'job_endpoint'], 'localhost', '/deploy/flink/job_endpoint'),
    ('dataflow-inc', ['deploy', 'flink', 'job_endpoint'], KeyError, '/deploy/flink/job_endpoint'),
    ('dataflow-inc', ['window', 'rollups', 0, 'size_s'], 90, '/window/rollups/0/size_s'),
    ('dataflow-inc', ['window', 'rollups', 0, 'size_s'], 60, '/window/rollups/0/size_s'),
    ('dataflow-inc', ['window', 'size_s'], 7, '/window/rollups/0/size_s'),
    ('dataflow-inc', ['window', 'rollups', 0, 'allowed_lateness_s'], -1,
     '/window/rollups/0/allowed_lateness_s'),
    ('dataflow-inc', ['window', 'rollups', 0, 'allowed_lateness_s'], KeyError,
     '/window/rollups/0/allowed_lateness_s'),
    ('dataflow-inc', ['window', 'rollups', 0, 'every_s'], 5, '/window/rollups/0/every_s'),
    ('dataflow-inc', ['window', 'rollups'], [], '/window/rollups'),
    ('dataflow-inc', ['window', 'rollups'], [{'size_s': 3600, 'allowed_lateness_s': 900},
                                             {'size_s': 3600, 'allowed_lateness_s': 0}],
     '/window/rollups/1/size_s'),
])
def test_a_broken_customer_file_is_refused_naming_the_field(tmp_path, name, path, value,
                                                           pointer):
  spec = copy.deepcopy(spec_of(name))
  mutate(spec, path, value)
  bad = tmp_path / f'{name}.yaml'
  bad.write_text(yaml.safe_dump(spec))
  with pytest.raises(customers.CustomerFileError) as e:
    customers.load_file(str(bad))
  assert e.value.pointer == pointer, str(e.value)


def test_the_cli_names_the_field_of_a_broken_file(tmp_path):
  spec = spec_of('dataflow-inc')
  spec['window']['size_s'] = -60
  (tmp_path / 'dataflow-inc.json').write_text(json.dumps(spec))
  result = deploy('--customer', 'dataflow-inc', '--customers-dir', str(tmp_path),
                  '--target', 'flink', '--dry-run')
  assert result.returncode == 2 and result.stdout == ''
  assert 'dataflow-inc.json: /window/size_s:' in result.stderr
  (tmp_path / 'dataflow-inc.json').write_text('{"customer_id": ')
  result = deploy('--customer-file', str(tmp_path / 'dataflow-inc.json'), '--target', 'flink',
                  '--dry-run')
  assert result.returncode == 2 and 'not valid JSON' in result.stderr


@pytest.mark.parametrize('customer_id, name, owned', [
    ('finserve', 'finserve', True),
    ('finserve', 'finserve-trades', True),
    ('finserve', 'finserve_trading', True),
    ('finserve', 'finserve.events', True),
    ('finserve', 'finservex', False),
    ('finserve', 'acme-finserve', False),
    ('dataflow-inc', 'dataflow-inc.iot', True),
    ('dataflow-inc', 'dataflow_inc_rollups', True),
    ('dataflow-inc', 'dataflow_incx', False),
    ('dataflow-inc', 'dataflowinc_x', False),
    ('acme.io', 'acme_io_aggregates', True),
    ('acme.io', 'acme.io-events', True),
    ('acme.io', 'acme_iox', False),
])
def test_the_ownership_rule(customer_id, name, owned):
  assert customers.owns(customer_id, name) is owned


def test_the_template_entry_point_loads():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      'template_main', os.path.join(REPO, 'templates', 'main.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert callable(module.main)
  with open(os.path.join(REPO, 'templates', 'Dockerfile')) as f:
    dockerfile = f.read()
  assert 'FROM apache/beam_python3.11_sdk:2.62.0' in dockerfile
  assert 'FLEX_TEMPLATE_PYTHON_PY_FILE=${WORKDIR}/templates/main.py' in dockerfile
  assert 'FLEX_TEMPLATE_PYTHON_SETUP_FILE=${WORKDIR}/setup.py' in dockerfile


#: Customer-file fields (JSON pointers into pipeline/deployment/customer.schema.json) and
#: the option each becomes (customer.run_parameters).
SCHEMA_FIELDS = {
    '/properties/customer_id': ('customer_id',),
    '/properties/source/allOf/1/then/properties/consumer_group': ('kafka_consumer_group',),
    '/$defs/sql_identifier': ('postgres_table', 'postgres_dead_letter_table'),
    '/$defs/bigquery_table': ('bigquery_table', 'bigquery_dead_letter_table'),
    '/properties/window/properties/size_s': ('window_size',),
    '/properties/window/properties/allowed_lateness_s': ('allowed_lateness',),
    '/properties/window/properties/early_firing_s': ('early_firing',),
    '/properties/shards': ('shards',),
}


def test_the_customer_schema_accepts_nothing_the_options_refuse():
  with open(customers.SCHEMA_PATH, encoding='utf-8') as f:
    schema = json.load(f)
  for pointer, dests in SCHEMA_FIELDS.items():
    field = schema
    for part in pointer.strip('/').split('/'):
      field = field[int(part)] if isinstance(field, list) else field[part]
    for dest in dests:
      regex = METADATA[dest]['regexes'][0]
      if 'pattern' in field:  # the same rule, written once per file: kept equal
        assert field['pattern'] == regex, (pointer, dest)
      else:  # the schema's range lies inside what the option accepts
        for bound in (field['minimum'], field['maximum']):
          assert re.match(regex, str(bound)), (pointer, dest, bound)
  rollup = schema['properties']['window']['properties']['rollups']['items']['properties']
  for size in (rollup['size_s']['minimum'], rollup['size_s']['maximum']):
    for lateness in (rollup['allowed_lateness_s']['minimum'],
                     rollup['allowed_lateness_s']['maximum']):
      assert re.match(METADATA['rollup']['regexes'][0], f'{size}:{lateness}')


def test_customer_files_are_found_from_the_working_directory_or_the_environment(tmp_path):
  """An installed Tidemark deploys from the operator's folder of customer files."""
  folder = tmp_path / 'ops' / 'templates' / 'customers'
  folder.mkdir(parents=True)
  shutil.copy(os.path.join(REPO, 'templates', 'customers', 'finserve.yaml'), folder)

  def dry_run(cwd, env=None):
    return subprocess.run(
        [sys.executable, '-m', 'pipeline', 'deploy', '--customer', 'finserve',
         '--target', 'dataflow', '--dry-run'], cwd=str(cwd), capture_output=True, text=True,
        timeout=300, env={**os.environ, 'PYTHONPATH': REPO, **(env or {})})
  assert dry_run(tmp_path / 'ops').returncode == 0
  elsewhere = dry_run(tmp_path, {'TIDEMARK_CUSTOMERS_DIR': str(folder)})
  assert elsewhere.returncode == 0, elsewhere.stderr
  missing = dry_run(tmp_path)
  assert missing.returncode == 2 and 'templates/customers' in missing.stderr
