"""Bad operator input stops a run, or a deploy, before it starts: exit 2, the
option, path or field named, nothing written, no file content repeated."""

import copy
import os
import re
import shlex
import sqlite3
import subprocess
import sys

import pytest
import yaml

from conftest import T0, data, mark, payload, write_replay
from pipeline.deployment import customer as customers
from pipeline.settings import targets
from pipeline.settings.checks import MAX_SECONDS, parse_rollups
from pipeline.settings.config import ConfigError, RunConfig
from pipeline.deployment.deploy import dataflow_command
from pipeline.settings.options import option_dests, parse_args
from transforms.connectors.sinks import SQLITE_DDL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUSTOMERS = os.path.join(REPO, 'templates', 'customers')
AS_ROOT = hasattr(os, 'geteuid') and os.geteuid() == 0


def cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'pipeline', *args], cwd=REPO, capture_output=True, text=True,
      timeout=600, env={**os.environ, 'PYTHONPATH': REPO})


@pytest.fixture
def replay(tmp_path):
  return write_replay(tmp_path / 'r.jsonl', [
      data('A', payload('a', T0)), mark('A', T0 + 120_000), data('A', payload('b', T0))])


def run_args(replay, out, *extra):
  return ('run', '--source', f'replay:{replay}', '--output-dir', str(out), *extra)


def config(*args):
  return RunConfig.from_options(parse_args(list(args)))


def assert_refused(result, *needles, out=None):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert 'Traceback' not in result.stderr
  for needle in needles:
    assert needle in result.stderr, result.stderr
  if out is not None:
    assert not os.path.exists(out)


# ---------------------------------------------------------------------------
# Unknown options: refused, named; --help lists every option.

@pytest.mark.parametrize('extra, named', [
    (['--windw-size', '30'], '--windw-size'),
    (['--windw-size=30'], '--windw-size'),
    (['--window', '30'], '--window'),  # no abbreviations
    (['stray'], "'stray'"),
    (['-w', '30'], '-w'),
    (['--runner', 'DirectRunner', '--no-such-beam-flag'], '--no-such-beam-flag'),
])
def test_an_unknown_argument_stops_the_run_naming_it(tmp_path, replay, extra, named):
  out = tmp_path / 'out'
  result = cli(*run_args(replay, out, *extra))
  assert_refused(result, f'tidemark: error: {named}', out=out)


def test_a_misspelt_option_gets_a_suggestion():
  with pytest.raises(ConfigError) as e:
    parse_args(['--allowed-latness', '30'])
  assert e.value.field == '--allowed-latness'
  assert 'did you mean --allowed-lateness?' in e.value.reason


def test_tidemark_and_beam_options_are_accepted():
  options = parse_args([
      '--window-size', '30', '--allowed_lateness=10', '--rollup', '60:0', '--runner=DirectRunner',
      '--streaming', '--direct_num_workers', '2', '--job_endpoint=localhost:8099',
      '--environment_type=LOOPBACK', '--parallelism=2', '--experiments=a', '--job_name=x'])
  assert options.get_all_options()['window_size'] == 30
  assert options.get_all_options()['direct_num_workers'] == 2


def test_a_beam_option_with_a_bad_value_is_refused_naming_it():
  with pytest.raises(ConfigError) as e:
    parse_args(['--direct_num_workers', 'two'])
  assert e.value.field == '--direct_num_workers'


def test_help_lists_every_tidemark_option_and_mentions_beam_options():
  result = cli('run', '--help')
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('usage: python -m pipeline run')
  for flag in option_dests().values():
    assert flag in result.stdout, flag
  text = ' '.join(result.stdout.split())
  assert 'Fixed window size in whole seconds' in text
  assert 'Kafka topic\'s read after this many records' in text
  assert "Beam's pipeline options are accepted too" in text


# ---------------------------------------------------------------------------
# Paths: checked before anything is built or written.

def test_a_replay_that_is_a_directory_is_called_one(tmp_path):
  out = tmp_path / 'out'
  result = cli('run', '--source', f'replay:{tmp_path}', '--output-dir', str(out))
  assert_refused(result, '--source', f'{str(tmp_path)!r} is a directory', out=out)
  assert 'does not exist' not in result.stderr


def test_an_unreadable_replay_is_refused_naming_it(tmp_path, replay, monkeypatch):
  os.chmod(replay, 0)
  if not AS_ROOT:
    out = tmp_path / 'out'
    assert_refused(cli(*run_args(replay, out)), '--source', replay, 'Permission denied', out=out)
  real_open = open

  def denied(path, *args, **kwargs):
    if os.fspath(path) == replay:
      raise PermissionError(13, 'Permission denied', path)
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(targets, 'open', denied, raising=False)
  with pytest.raises(ConfigError) as e:
    config('--source', f'replay:{replay}', '--output-dir', str(tmp_path / 'out'))
  assert e.value.field == '--source'
  assert replay in e.value.reason and 'Permission denied' in e.value.reason


def test_an_output_folder_under_a_file_is_refused(tmp_path, replay):
  blocker = tmp_path / 'notes.txt'
  blocker.write_text('keep me\n')
  out = blocker / 'out'
  result = cli(*run_args(replay, out))
  assert_refused(result, '--output-dir', f'{str(blocker)!r} is a file')
  assert blocker.read_text() == 'keep me\n'


def test_an_unwritable_output_folder_is_refused(tmp_path, replay, monkeypatch):
  locked = tmp_path / 'locked'
  locked.mkdir()
  os.chmod(locked, 0o555)
  try:
    if not AS_ROOT:
      assert_refused(cli(*run_args(replay, locked / 'out')), '--output-dir',
                     str(locked / 'out'), 'Permission denied', out=locked / 'out')
    real = targets.tempfile.TemporaryFile

    def denied(*args, dir=None, **kwargs):  # pylint: disable=redefined-builtin
      if dir is not None and os.path.abspath(dir) == str(locked):
        raise PermissionError(13, 'Permission denied')
      return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(targets.tempfile, 'TemporaryFile', denied)
    for out in (locked, locked / 'out'):
      with pytest.raises(ConfigError) as e:
        config('--source', f'replay:{replay}', '--output-dir', str(out))
      assert e.value.field == '--output-dir' and 'Permission denied' in e.value.reason
  finally:
    os.chmod(locked, 0o755)
  assert os.listdir(locked) == []


def test_a_folder_where_an_output_file_goes_is_refused(tmp_path, replay):
  out = tmp_path / 'out'
  (out / 'dead_letter.jsonl').mkdir(parents=True)
  result = cli(*run_args(replay, out))
  assert_refused(result, '--output-dir', 'dead_letter.jsonl')
  assert os.listdir(out) == ['dead_letter.jsonl']


def test_sqlite_naming_a_folder_is_refused(tmp_path, replay):
  out = tmp_path / 'out'
  result = cli(*run_args(replay, out, '--sqlite', str(tmp_path)))
  assert_refused(result, '--sqlite', 'is a folder', out=out)


@pytest.mark.parametrize('kind', ['text', 'other-database', 'empty'])
def test_sqlite_naming_a_file_that_is_not_tidemarks_is_refused_and_kept(tmp_path, replay, kind):
  precious = tmp_path / 'precious.db'
  if kind == 'text':
    precious.write_text('my notes\n')
  elif kind == 'empty':
    precious.write_bytes(b'')
  else:
    with sqlite3.connect(precious) as conn:
      conn.execute('CREATE TABLE accounts (id INTEGER, balance REAL)')
      conn.execute('INSERT INTO accounts VALUES (1, 100.0)')
    conn.close()
  before = precious.read_bytes()
  out = tmp_path / 'out'
  result = cli(*run_args(replay, out, '--sqlite', str(precious)))
  assert_refused(result, '--sqlite', 'is not a Tidemark SQLite database', out=out)
  assert precious.read_bytes() == before


def test_sqlite_naming_a_tidemark_database_is_accepted(tmp_path, replay):
  db = tmp_path / 'aggregates.sqlite'
  with sqlite3.connect(db) as conn:
    conn.execute(SQLITE_DDL)
  conn.close()
  assert config('--source', f'replay:{replay}', '--output-dir', str(tmp_path / 'out'),
                '--sqlite', str(db)).sqlite_path == str(db)
  assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------
# Durations: bounded by what the windowing can represent.

@pytest.mark.parametrize('extra, field', [
    (['--window-size', '10000000000000'], '--window-size'),
    (['--window-size', str(MAX_SECONDS + 1)], '--window-size'),
    (['--allowed-lateness', '10000000000000'], '--allowed-lateness'),
    (['--rollup', '600000000000000:0'], '--rollup'),
    (['--rollup', f'3600:{MAX_SECONDS + 1}'], '--rollup'),
    (['--early-firing', '10000000000000'], '--early-firing'),
    (['--shards', '100000000000'], '--shards'),
])
def test_a_duration_beyond_100_years_is_refused_naming_the_field(tmp_path, replay, extra,
                                                                 field):
  out = tmp_path / 'out'
  assert_refused(cli(*run_args(replay, out, *extra)), f'tidemark: error: {field}:', out=out)


def test_100_years_is_accepted(tmp_path):
  largest = config('--window-size', str(MAX_SECONDS), '--allowed-lateness', str(MAX_SECONDS),
                   '--output-dir', str(tmp_path / 'out'))
  assert (largest.window_size_s, largest.allowed_lateness_s) == (MAX_SECONDS, MAX_SECONDS)
  assert MAX_SECONDS == 36525 * 86400
  assert parse_rollups([f'{MAX_SECONDS}:{MAX_SECONDS}'], 60) == ((MAX_SECONDS, MAX_SECONDS),)


def test_a_stream_run_at_the_largest_settings_reconciles(tmp_path, replay):
  out = tmp_path / 'out'
  result = cli(*run_args(replay, out, '--replay-mode', 'stream', '--window-size', '60',
                         '--allowed-lateness', str(MAX_SECONDS),
                         '--rollup', f'{MAX_SECONDS}:{MAX_SECONDS}'))
  assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------------------
# Numbers: ASCII digits only.

@pytest.mark.parametrize('value', ['٣٠', '３０', '3_0', ' 30', '30 ', '+', ''])
def test_a_number_in_other_digits_is_refused(value):
  with pytest.raises(ConfigError) as e:
    parse_args(['--window-size', value])
  assert e.value.field == '--window-size'


def test_the_cli_refuses_arabic_indic_digits(tmp_path, replay):
  out = tmp_path / 'out'
  assert_refused(cli(*run_args(replay, out, '--window-size', '٣٠')), '--window-size', out=out)


@pytest.mark.parametrize('extra, field', [
    (['--rollup', '٣٦٠٠:٠'], '--rollup'),
    (['--kafka-expansion-service', 'localhost:١٨٠٩٦'], '--kafka-expansion-service'),
    (['--source', 'kafka:localhost:٩٠٩٢/t'], '--source'),
])
def test_other_digits_inside_a_setting_are_refused(tmp_path, extra, field):
  with pytest.raises(ConfigError) as e:
    config('--output-dir', str(tmp_path / 'out'), *extra)
  assert e.value.field == field


def test_a_setting_with_a_control_character_is_refused(tmp_path):
  with pytest.raises(ConfigError) as e:
    config('--output-dir', str(tmp_path / 'out'), '--sink', 'postgres',
           '--postgres-dsn', 'postgresql://u@h/db\n')
  assert e.value.field == '--postgres-dsn' and 'U+000A' in e.value.reason


# ---------------------------------------------------------------------------
# Customers: names resolve in the customers folder; errors never quote a file.

def deploy(*args):
  return cli('deploy', *args)


def spec_of(name):
  with open(os.path.join(CUSTOMERS, f'{name}.yaml')) as f:
    return yaml.safe_load(f)


@pytest.mark.parametrize('name', [
    '/etc/passwd', '../README.md', '../customers/finserve', 'finserve/../finserve',
    os.path.join(CUSTOMERS, 'finserve.yaml'), '..', ''])
def test_a_customer_name_never_reads_a_path(name):
  result = deploy('--customer', name, '--target', 'dataflow', '--dry-run')
  assert_refused(result, '--customer-file')
  assert result.stdout == ''
  assert 'root:' not in result.stderr and 'Tidemark' not in result.stderr


def test_a_file_name_gets_a_hint_and_a_path_needs_customer_file(tmp_path):
  result = deploy('--customer', 'finserve.yaml', '--target', 'dataflow', '--dry-run')
  assert result.returncode == 2 and 'finserve' in result.stderr
  with pytest.raises(customers.CustomerFileError):
    customers.find(os.path.join(CUSTOMERS, 'finserve.yaml'))
  path = os.path.join(CUSTOMERS, 'finserve.yaml')
  result = deploy('--customer-file', path, '--target', 'dataflow', '--dry-run')
  assert result.returncode == 0, result.stderr


def test_a_link_out_of_the_customers_folder_is_refused(tmp_path):
  folder = tmp_path / 'customers'
  folder.mkdir()
  outside = tmp_path / 'finserve.yaml'
  outside.write_text(yaml.safe_dump(spec_of('finserve')))
  (folder / 'finserve.yaml').symlink_to(outside)
  with pytest.raises(customers.CustomerFileError) as e:
    customers.load('finserve', str(folder))
  assert 'outside' in str(e.value)


@pytest.mark.parametrize('content', [
    'SECRET-hunter2\n',                                  # a scalar, not a mapping
    'customer_id: finserve\npassword: SECRET-hunter2: x\n',  # a YAML syntax error
    '- SECRET-hunter2\n',
    "window: {size_s: 'SECRET-hunter2'}\n",
    'SECRET-hunter2: "\x00"\n',
])
def test_an_error_never_quotes_the_file(tmp_path, content):
  path = tmp_path / 'finserve.yaml'
  path.write_text(content)
  for args in (['--customer-file', str(path)],
               ['--customer', 'finserve', '--customers-dir', str(tmp_path)]):
    result = deploy(*args, '--target', 'dataflow', '--dry-run')
    assert_refused(result, str(path))
    assert 'hunter2' not in result.stderr and result.stdout == ''


def test_a_schema_error_names_the_rule_not_the_value(tmp_path):
  spec = spec_of('finserve')
  spec['sink']['table'] = 'SECRET hunter2'
  path = tmp_path / 'finserve.yaml'
  path.write_text(yaml.safe_dump(spec))
  with pytest.raises(customers.CustomerFileError) as e:
    customers.load_file(str(path))
  assert e.value.pointer == '/sink/table' and 'must match' in e.value.reason
  assert 'hunter2' not in str(e.value)


@pytest.mark.parametrize('path, value', [
    (['sink', 'dsn'], 'postgresql://tidemark@127.0.0.1:15433/tidemark\n'),
    (['deploy', 'dataflow', 'job_name'], 'dataflow-inc-1m\n'),
    (['source', 'topics', 0], 'dataflow-inc.iot-readings\r'),
])
def test_a_value_with_a_control_character_is_refused_naming_the_field(tmp_path, path, value):
  spec = dataflow_inc_on_dataflow()
  node = spec
  for part in path[:-1]:
    node = node[part]
  node[path[-1]] = value
  (tmp_path / 'dataflow-inc.yaml').write_text(yaml.safe_dump(spec))
  result = deploy('--customer', 'dataflow-inc', '--customers-dir', str(tmp_path),
                  '--target', 'dataflow', '--dry-run')
  pointer = '/' + '/'.join(map(str, path))
  assert_refused(result, f'dataflow-inc.yaml: {pointer}: contains a control character')
  assert result.stdout == ''


def dataflow_inc_on_dataflow():
  """dataflow-inc (a PostgreSQL sink) with a Dataflow target as well."""
  spec = copy.deepcopy(spec_of('dataflow-inc'))
  spec['deploy']['dataflow'] = dict(spec_of('finserve')['deploy']['dataflow'],
                                    job_name='dataflow-inc-1m')
  return spec


def parse_gcloud_dict(value):
  delimiter = ','
  m = re.match(r'^\^([^^]+)\^', value)
  if m:
    delimiter, value = m.group(1), value[m.end():]
  return dict(item.split('=', 1) for item in value.split(delimiter))


def test_a_dsn_with_every_delimiter_reaches_gcloud_intact(tmp_path):
  spec = dataflow_inc_on_dataflow()
  dsn = ('postgresql://tidemark@127.0.0.1:15433/tidemark?options=-c%20a=b,c~d;e|f#g@h!i'
         ':j+k%l&m*n~')
  spec['sink']['dsn'] = dsn
  (tmp_path / 'dataflow-inc.yaml').write_text(yaml.safe_dump(spec))
  result = deploy('--customer', 'dataflow-inc', '--customers-dir', str(tmp_path),
                  '--target', 'dataflow', '--dry-run')
  assert result.returncode == 0, result.stderr
  assert len(result.stdout.strip().splitlines()) == 1
  flags = dict(arg[2:].split('=', 1) for arg in shlex.split(result.stdout)[5:])
  params = parse_gcloud_dict(flags['parameters'])
  assert params['postgres_dsn'] == dsn
  assert params['source'] == 'kafka:127.0.0.1:19092/dataflow-inc.iot-readings'
  command = dataflow_command(customers.load('dataflow-inc', str(tmp_path)))
  assert shlex.split(shlex.join(command)) == command


def test_a_multi_line_description_is_fine(tmp_path):
  spec = spec_of('finserve')
  spec['description'] = 'first line\nsecond line\n'
  path = tmp_path / 'finserve.yaml'
  path.write_text(yaml.safe_dump(spec))
  assert customers.load_file(str(path)).spec['description'] == 'first line\nsecond line\n'


def test_the_flink_runner_without_its_job_server_jar_is_refused_naming_the_fix(
    tmp_path, replay):
  """Beam would try to download the jar (there is no internet): refused at once."""
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, '-m', 'pipeline', *run_args(replay, out), '--runner', 'FlinkRunner'],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, 'PYTHONPATH': REPO, 'HOME': str(tmp_path)})
  assert_refused(result, '--runner', 'scripts/stage-java.sh')
  assert str(tmp_path / '.apache_beam' / 'cache' / 'jars') in result.stderr
  assert not out.exists()


# ---------------------------------------------------------------------------
# An OUTPUT_DIR on an object store.

def test_sqlite_with_an_object_store_output_folder_is_refused_naming_it(tmp_path, replay):
  result = cli(*run_args(replay, 'gs://tidemark-bucket/run', '--sqlite', str(tmp_path / 'a.db')))
  assert_refused(result, 'tidemark: error: --sqlite', 'gs://tidemark-bucket/run is not one')
  assert not (tmp_path / 'a.db').exists()


def test_an_object_store_output_folder_has_no_sqlite_by_default(replay):
  assert config('--source', f'replay:{replay}', '--output-dir', 'gs://b/run').sqlite_path is None


def test_serving_live_metrics_of_an_object_store_output_folder_is_refused(replay):
  with pytest.raises(ConfigError, match='--serve-metrics'):
    config('--source', f'replay:{replay}', '--output-dir', 'gs://b/run',
           '--serve-metrics', '127.0.0.1:19999')


def test_an_output_folder_on_an_unknown_filesystem_is_refused_naming_it(replay):
  result = cli(*run_args(replay, 'nosuchfs://bucket/run'))
  assert_refused(result, 'tidemark: error: --output-dir', 'nosuchfs')


def test_a_dataflow_job_writes_into_the_bucket_its_customer_file_names(tmp_path):
  spec = dataflow_inc_on_dataflow()
  spec['deploy']['dataflow']['output_dir'] = 'gs://dataflow-inc-tidemark/live'
  (tmp_path / 'dataflow-inc.yaml').write_text(yaml.safe_dump(spec))
  params = parse_gcloud_dict(dict(
      arg[2:].split('=', 1) for arg in dataflow_command(
          customers.load('dataflow-inc', str(tmp_path)))[5:])['parameters'])
  assert (params['output_dir'], params['sqlite']) == ('gs://dataflow-inc-tidemark/live', 'none')
  del spec['deploy']['dataflow']['output_dir']
  (tmp_path / 'dataflow-inc.yaml').write_text(yaml.safe_dump(spec))
  result = deploy('--customer', 'dataflow-inc', '--customers-dir', str(tmp_path),
                  '--target', 'dataflow', '--dry-run')
  assert_refused(result, '/deploy/dataflow', 'output_dir')


# ---------------------------------------------------------------------------
# What a run says: what the operator must know, nothing they cannot act on.


def test_ctrl_c_while_the_input_is_read_exits_130_writing_nothing(
    replay, tmp_path, monkeypatch, capsys):
  from pipeline.launch import run

  def interrupted(config):  # as a Ctrl-C lands while a large replay is indexed
    raise KeyboardInterrupt
  monkeypatch.setattr(run, 'read_source', interrupted)
  out = tmp_path / 'out'
  assert run.main(list(run_args(replay, out)[1:])) == 130
  err = capsys.readouterr().err
  assert 'SIGINT: stopped while reading the input; nothing was run or written' in err
  assert 'Traceback' not in err and not out.exists()


def test_a_mostly_invalid_input_is_warned_about_and_still_accounted(tmp_path):
  lines = [data('A', payload(f'e{i}', 915148800000 + i)) for i in range(999)]  # 1999
  lines += [data('A', payload('ok', T0)), mark('A', T0 + 120_000)]
  replay = write_replay(tmp_path / 'r.jsonl', lines)
  result = cli(*run_args(replay, tmp_path / 'out'))
  assert result.returncode == 0, result.stderr[-2000:]
  assert ('999 of 1,000 messages (99.9 %) were invalid: the input is mostly not events'
          in result.stderr)
  few = write_replay(tmp_path / 'few.jsonl', lines[-3:])
  fine = cli(*run_args(few, tmp_path / 'fine'))
  assert fine.returncode == 0 and 'were invalid' not in fine.stderr


def test_a_stream_run_prints_the_exact_accounting_only(replay, tmp_path):
  result = cli(*run_args(replay, tmp_path / 'out', '--replay-mode', 'stream'))
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'received' in result.stdout
  assert 'beam counters' not in result.stdout + result.stderr
  assert 'best effort' not in result.stdout + result.stderr


def test_an_empty_replay_runs_without_library_warnings(tmp_path):
  replay = write_replay(tmp_path / 'empty.jsonl', [''])
  result = cli(*run_args(replay, tmp_path / 'out'))
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Warning' not in result.stderr, result.stderr  # matplotlib's UserWarning among them


def test_run_help_names_every_exit_code():
  result = cli('run', '--help')
  assert result.returncode == 0
  text = ' '.join(result.stdout.split())
  for code in ('0 the run finished', '1 the job failed', '2 a bad setting',
               '3 the outputs did not reconcile', '130 / 143 stopped by SIGINT / SIGTERM'):
    assert code in text, code
