"""A crashed or interrupted run never looks like a complete one.

The run folder protocol on its own (pipeline/runfolder/files.py: staging, manifest,
commit, an interrupted commit finished by the next run), then real launches
of ``python -m pipeline run`` stopped with SIGTERM, SIGINT and SIGKILL
mid-run, next to an earlier complete run that must stay intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, T0, data, mark, payload, write_replay
from pipeline.readback.reconciliation import holds_finished_run, live_output_dir, read_manifest
from tools import reference, traffic
from pipeline.runfolder.files import (
    COMMITTING, COMPLETE, INCOMPLETE, MANIFEST, RUNNING, STAGING_PREFIX, RunFolder, read_json)

NAMES = ('aggregates.jsonl', 'dead_letter.jsonl', 'accounting.json', 'duplicates.jsonl')
ROLLUPS = re.compile(r'rollup-[0-9]+s')


def folder(out, **kwargs) -> RunFolder:
  return RunFolder(str(out), NAMES, ROLLUPS, manifest={'input': {'kind': 'test'}},
                   **kwargs).open()


def stage(run: RunFolder, files: dict) -> None:
  for name, text in files.items():
    path = run.path(os.path.join(run.output_dir, name))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
      f.write(text)


def listing(out) -> dict:
  """Every file under ``out`` (staging folders left out) with its content."""
  found = {}
  for root, dirs, files in os.walk(out):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        found[os.path.relpath(path, out)] = f.read().decode('utf-8', 'replace')
  return found


def stagings(out) -> list:
  return sorted(n for n in os.listdir(out) if n.startswith(STAGING_PREFIX))


def test_a_commit_replaces_the_earlier_run_whole_and_leaves_other_files_alone(tmp_path):
  out = tmp_path / 'out'
  first = folder(out)
  stage(first, {'aggregates.jsonl': 'old\n', 'duplicates.jsonl': 'old\n',
                'rollup-600s/aggregates.jsonl': 'old\n'})
  first.commit(COMPLETE)
  (out / 'notes.txt').write_text('mine')

  second = folder(out)
  assert listing(out)['aggregates.jsonl'] == 'old\n'  # nothing changes before the commit
  stage(second, {'aggregates.jsonl': 'new\n', 'dead_letter.jsonl': '',
                 'rollup-3600s/aggregates.jsonl': 'new\n'})
  second.commit(COMPLETE, accounting={'received': 1})
  assert {k: v for k, v in listing(out).items() if k != MANIFEST} == {
      'aggregates.jsonl': 'new\n', 'dead_letter.jsonl': '', 'notes.txt': 'mine',
      'rollup-3600s/aggregates.jsonl': 'new\n'}
  manifest = read_manifest(str(out))
  assert manifest['status'] == COMPLETE and manifest['run_id'] == second.run_id
  assert manifest['files'] == ['aggregates.jsonl', 'dead_letter.jsonl', 'rollup-3600s']
  assert manifest['accounting'] == {'received': 1} and manifest['ended_at']
  assert stagings(out) == [] and holds_finished_run(str(out))


def test_an_abandoned_run_leaves_the_earlier_one_untouched(tmp_path):
  out = tmp_path / 'out'
  first = folder(out)
  stage(first, {'aggregates.jsonl': 'good\n'})
  first.commit(COMPLETE)
  before = listing(out)

  second = folder(out)
  stage(second, {'aggregates.jsonl': 'partial', 'accounting.json': '{"received": 0}'})
  assert live_output_dir(str(out)) == second.staging
  second.abandon(INCOMPLETE, detail='interrupted')
  assert listing(out) == before
  assert read_manifest(str(out))['run_id'] == first.run_id
  assert read_json(os.path.join(second.staging, MANIFEST))['status'] == INCOMPLETE
  assert live_output_dir(str(out)) == str(out)

  folder(out)  # the next run removes what the abandoned one left aside
  assert os.path.basename(second.staging) not in stagings(out)


def test_a_folder_without_a_committed_run_says_so_from_the_start(tmp_path):
  out = tmp_path / 'out'
  run = folder(out)
  manifest = read_manifest(str(out))
  assert manifest['status'] == RUNNING and manifest['staging'] == os.path.basename(run.staging)
  assert not holds_finished_run(str(out))
  run.abandon(INCOMPLETE, detail='interrupted')
  assert read_manifest(str(out))['status'] == INCOMPLETE
  assert sorted(os.listdir(out)) == [os.path.basename(run.staging), MANIFEST]


def test_a_commit_cut_short_is_finished_by_the_next_run(tmp_path, monkeypatch):
  out = tmp_path / 'out'
  first = folder(out)
  stage(first, {'aggregates.jsonl': 'old\n', 'rollup-600s/aggregates.jsonl': 'old\n'})
  first.commit(COMPLETE)
  second = folder(out)
  stage(second, {'aggregates.jsonl': 'new\n', 'dead_letter.jsonl': 'new\n'})

  real_replace, calls = os.replace, []

  def dies_on_the_second_move(src, dst):
    calls.extend([src] if STAGING_PREFIX in str(src) and '.tmp.' not in str(src) else [])
    if len(calls) == 2:
      raise KeyboardInterrupt('killed')
    return real_replace(src, dst)
  monkeypatch.setattr(os, 'replace', dies_on_the_second_move)
  with pytest.raises(KeyboardInterrupt):
    second.commit(COMPLETE)
  monkeypatch.setattr(os, 'replace', real_replace)
  assert read_manifest(str(out))['status'] == COMMITTING
  assert not holds_finished_run(str(out))

  folder(out)  # rolls the commit forward, then starts its own run
  assert read_manifest(str(out))['run_id'] == second.run_id
  assert read_manifest(str(out))['status'] == COMPLETE
  assert {k: v for k, v in listing(out).items() if k != MANIFEST} == {
      'aggregates.jsonl': 'new\n', 'dead_letter.jsonl': 'new\n'}


def test_staging_of_a_dead_launcher_is_removed_and_a_live_ones_kept(tmp_path):
  out = tmp_path / 'out'
  dead, live = folder(out), folder(out)
  dead.manifest['pid'] = 2 ** 22 + 12345  # above pid_max: no such process
  dead.update(RUNNING)
  folder(out)
  assert os.path.basename(live.staging) in stagings(out)
  assert os.path.basename(dead.staging) not in stagings(out)


def test_a_file_outside_the_folder_is_staged_beside_its_place(tmp_path):
  out, db = tmp_path / 'out', tmp_path / 'elsewhere' / 'final.sqlite'
  db.parent.mkdir()
  db.write_text('old')
  run = folder(out)
  staged = run.path(str(db))
  assert os.path.dirname(staged) == str(db.parent) and staged != str(db)
  with open(staged, 'w') as f:
    f.write('new')
  assert db.read_text() == 'old'
  run.commit(COMPLETE)
  assert db.read_text() == 'new' and not os.path.exists(staged)


class Job:
  """A PipelineResult that has ended in ``state`` (and reports no metrics)."""

  def __init__(self, state):
    self.state = state


def unbounded_run(out):
  from pipeline.settings.config import RunConfig
  from pipeline.launch.run import prepare_output
  config = RunConfig(source='kafka:localhost:9/topic', window_size_s=60, allowed_lateness_s=30,
                     early_firing_s=None, output_dir=str(out), sqlite_path=None, shards=1)
  run = prepare_output(config)
  with open(run.config.aggregates_path, 'w') as f:
    f.write(json.dumps({'customer_id': 'c', 'key': 'k', 'window_start': 0, 'window_end': 60000,
                        'count': 2, 'sum': 2.0, 'min': 1.0, 'max': 1.0, 'pane_index': 0,
                        'timing': 'ON_TIME'}) + '\n')
  with open(run.config.accounting_path, 'w') as f:  # as the job rewrites it while it runs
    json.dump({'received': 3, 'invalid': 1, 'too_late': 0, 'duplicate': 0, 'aggregated': 2}, f)
  return config, run


@pytest.mark.parametrize('state, status, fired', [
    ('CANCELLED', 'stopped', True), ('DONE', 'complete', True), ('CANCELLED', 'stopped', False)])
def test_an_unbounded_run_is_committed_when_it_stops(tmp_path, state, status, fired):
  from apache_beam.runners.runner import PipelineState
  from pipeline.launch.run import finish
  out = tmp_path / 'out'
  config, run = unbounded_run(out)
  assert read_json(os.path.join(run.folder.staging, MANIFEST))['status'] == RUNNING
  assert read_manifest(str(out))['input'] == {
      'kind': 'kafka', 'bootstrap': 'localhost:9', 'topics': {'topic': 'topic'},
      'max_records_per_topic': None}
  assert live_output_dir(str(out)) == run.folder.staging
  if not fired:  # stopped before its window fired: committed, but it does not add up
    open(run.config.aggregates_path, 'w').close()
  run.result = Job(getattr(PipelineState, state))
  assert finish(run, config, groups_in_java=False) == 0
  manifest = read_manifest(str(out))
  assert manifest['status'] == status and manifest['job_state'] == state
  assert manifest['accounting']['received'] == 3 and manifest['reconciled'] is fired
  assert fired or 'stopped mid-stream' in manifest['detail']
  with open(out / 'accounting.json') as f:
    assert json.load(f)['received'] == 3
  assert stagings(out) == []


def test_a_bounded_job_that_did_not_reconcile_is_not_committed(tmp_path):
  from apache_beam.runners.runner import PipelineState
  from pipeline.settings.config import RunConfig
  from pipeline.launch.run import finish, prepare_output
  replay = write_replay(tmp_path / 'r.jsonl', [data('A', payload('e1', T0))])
  config = RunConfig(source=f'replay:{replay}', window_size_s=60, allowed_lateness_s=30,
                     early_firing_s=None, output_dir=str(tmp_path / 'out'), sqlite_path=None,
                     shards=1)
  run = prepare_output(config)
  with open(run.config.accounting_path, 'w') as f:
    json.dump({'received': 1, 'invalid': 0, 'too_late': 0, 'duplicate': 0, 'aggregated': 1}, f)
  run.result = Job(PipelineState.DONE)
  assert finish(run, config, groups_in_java=False) == 3
  manifest = read_manifest(config.output_dir)
  assert manifest['status'] == 'failed' and 'do not reconcile' in manifest['detail']
  assert not os.path.exists(os.path.join(config.output_dir, 'accounting.json'))


@pytest.fixture
def restored_handlers():
  saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  yield
  for s, handler in saved.items():
    signal.signal(s, handler)


def test_signals_interrupt_a_stream_and_wait_for_the_commit(restored_handlers):
  from pipeline.launch.run import StopSignals
  signals = StopSignals().install()
  with pytest.raises(KeyboardInterrupt, match='SIGTERM'):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
  assert signals.received == signal.SIGTERM
  deferring = StopSignals().install()
  with deferring.deferred():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
  assert deferring.received == signal.SIGINT


# ---------------------------------------------------------------------------
# Real launches.


def launch(*args, **popen):
  env = {**os.environ, 'PYTHONPATH': REPO}
  return subprocess.Popen([sys.executable, '-m', 'pipeline', 'run', *args], cwd=REPO,
                          env=env, text=True, **popen)


def cli(*args):
  proc = launch(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  stdout, stderr = proc.communicate(timeout=900)
  return proc.returncode, stdout, stderr


def digest(out) -> dict:
  return {k: hashlib.sha256(v.encode()).hexdigest() for k, v in listing(out).items()}


@pytest.fixture(scope='module')
def replays(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('replays')
  small, large = str(tmp / 'small.jsonl'), str(tmp / 'large.jsonl')
  traffic.write_replay(small, traffic.Profile(messages=600, seed=3))
  traffic.write_replay(large, traffic.Profile(messages=6000, seed=4))
  return small, large


@pytest.fixture
def complete_run(replays, tmp_path):
  """An output folder holding a complete run of the small replay."""
  out = tmp_path / 'out'
  code, _, stderr = cli('--source', f'replay:{replays[0]}', '--output-dir', str(out))
  assert code == 0, stderr[-3000:]
  manifest = read_manifest(str(out))
  assert manifest['status'] == COMPLETE
  return out, manifest, digest(out)


def test_a_complete_run_says_what_it_read_and_how_it_ended(replays, complete_run):
  out, manifest, _ = complete_run
  with open(replays[0], 'rb') as f:
    sha256 = hashlib.sha256(f.read()).hexdigest()
  lines = [json.loads(line) for line in open(replays[0], encoding='utf-8') if line.strip()]
  sources = list(dict.fromkeys(line['source'] for line in lines if 'source' in line))
  assert manifest['input'] == {
      'kind': 'replay', 'path': os.path.abspath(replays[0]), 'messages': 600,
      'size_bytes': os.path.getsize(replays[0]), 'sha256': sha256, 'sources': sources}
  assert manifest['accounting'] == reference.compute(replays[0], 60, 30).accounting
  with open(out / 'accounting.json') as f:
    assert json.load(f) == manifest['accounting']
  assert manifest['reconciled'] is True and manifest['job_state'] == 'DONE'
  assert manifest['settings']['window_size_s'] == 60
  assert manifest['settings']['output_dir'] == str(out)
  assert manifest['started_at'] < manifest['ended_at']
  assert stagings(out) == []


def wait_for_progress(log_path, proc, timeout=300):
  """Waits until the run has processed messages (a progress line)."""
  deadline = time.monotonic() + timeout
  while 'progress:' not in log_path.read_text(errors='replace'):
    assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
    time.sleep(0.2)


def interrupted_run(replay, out, log_path, send):
  """A streaming run of ``replay`` into ``out``, sent ``send`` once it has
  processed messages; returns its exit code and stderr."""
  with open(log_path, 'w', encoding='utf-8') as log:
    proc = launch('--source', f'replay:{replay}', '--output-dir', str(out),
                  '--replay-mode', 'stream', stdout=log, stderr=log)
    try:
      wait_for_progress(log_path, proc)
      proc.send_signal(send)
      code = proc.wait(120)
    finally:
      if proc.poll() is None:
        proc.kill()
  time.sleep(2)  # whatever its workers still do
  with open(log_path, encoding='utf-8', errors='replace') as f:
    return code, f.read()


@pytest.mark.parametrize('send, code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_cleanly_and_keeps_the_earlier_run(
    replays, complete_run, tmp_path, send, code):
  out, manifest, before = complete_run
  exit_code, log = interrupted_run(replays[1], out, tmp_path / 'run.log', send)
  assert exit_code == code, log[-3000:]
  assert 'Traceback' not in log
  assert f'{signal.Signals(send).name}: stopped before the input ended' in log
  assert digest(out) == before  # run.json included: still the earlier run's
  assert read_manifest(str(out))['run_id'] == manifest['run_id']
  [left] = stagings(out)
  stopped = read_json(os.path.join(out, left, MANIFEST))
  assert stopped['status'] == INCOMPLETE and signal.Signals(send).name in stopped['detail']


def test_sigkill_leaves_the_earlier_run_and_a_rerun_gives_the_right_result(
    replays, complete_run, tmp_path):
  out, manifest, before = complete_run
  exit_code, _ = interrupted_run(replays[1], out, tmp_path / 'run.log', signal.SIGKILL)
  assert exit_code == -signal.SIGKILL
  assert digest(out) == before
  [left] = stagings(out)
  assert read_json(os.path.join(out, left, MANIFEST))['status'] == RUNNING  # and its pid is gone

  code, _, stderr = cli('--source', f'replay:{replays[1]}', '--output-dir', str(out))
  assert code == 0, stderr[-3000:]
  rerun = read_manifest(str(out))
  assert rerun['status'] == COMPLETE and rerun['run_id'] != manifest['run_id']
  with open(out / 'accounting.json') as f:
    assert json.load(f) == rerun['accounting'] == reference.compute(
        replays[1], 60, 30).accounting
  assert stagings(out) == []


def test_a_first_run_killed_leaves_a_folder_that_says_it_did_not_finish(replays, tmp_path):
  out = tmp_path / 'out'
  exit_code, _ = interrupted_run(replays[1], out, tmp_path / 'run.log', signal.SIGKILL)
  assert exit_code == -signal.SIGKILL
  assert read_manifest(str(out))['status'] == RUNNING
  assert not holds_finished_run(str(out))
  assert not (out / 'accounting.json').exists()  # no zero accounting that adds up


def test_a_run_with_rollups_leaves_no_stale_rollup_folders_once_replaced(replays, tmp_path):
  out = tmp_path / 'out'
  code, _, stderr = cli('--source', f'replay:{replays[0]}', '--output-dir', str(out),
                        '--rollup', '600:60')
  assert code == 0, stderr[-3000:]
  assert (out / 'rollup-600s' / 'aggregates.jsonl').exists()
  code, _, stderr = cli('--source', f'replay:{replays[0]}', '--output-dir', str(out))
  assert code == 0, stderr[-3000:]
  assert sorted(os.listdir(out)) == [
      'accounting.json', 'aggregates.jsonl', 'aggregates.sqlite', 'arrivals.json',
      'dead_letter.jsonl', 'metrics.prom', 'report.html', MANIFEST]


@pytest.mark.parametrize('lines, empty', [
    ([], ('aggregates.jsonl', 'dead_letter.jsonl')),
    ([data('A', payload('e1', T0)), mark('A', T0 + 10 * 60000)], ('dead_letter.jsonl',)),
], ids=['nothing', 'no-dead-letters'])
def test_outputs_with_nothing_in_them_are_written_empty(tmp_path, lines, empty):
  replay = write_replay(tmp_path / 'r.jsonl', lines)
  out = tmp_path / 'out'
  code, _, stderr = cli('--source', f'replay:{replay}', '--output-dir', str(out))
  assert code == 0, stderr[-3000:]
  for name in ('aggregates.jsonl', 'dead_letter.jsonl', 'accounting.json'):
    assert (out / name).exists(), name
  for name in empty:
    assert (out / name).read_text() == ''
  assert read_manifest(str(out))['status'] == COMPLETE


def children(pid):
  """The processes under ``pid``."""
  parents = {}
  for entry in filter(str.isdigit, os.listdir('/proc')):
    with contextlib.suppress(OSError, IndexError), open(f'/proc/{entry}/stat') as f:
      parents[int(entry)] = int(f.read().rsplit(')', 1)[1].split()[1])
  found, todo = set(), {pid}
  while todo:
    todo = {p for p, parent in parents.items() if parent in todo} - found
    found |= todo
  return found


def test_a_bulk_run_on_worker_processes_stops_cleanly_on_sigterm(complete_run, tmp_path):
  out, manifest, before = complete_run
  replay = str(tmp_path / 'big.jsonl')  # large enough for one worker process per core
  traffic.write_replay(replay, traffic.Profile(messages=220000, seed=5))
  log_path = tmp_path / 'run.log'
  with open(log_path, 'w', encoding='utf-8') as log:
    proc = launch('--source', f'replay:{replay}', '--output-dir', str(out), stdout=log,
                  stderr=log)
    try:
      deadline = time.monotonic() + 300
      while len(children(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
      workers = children(proc.pid)
      assert len(workers) >= 2, 'no worker processes started'
      time.sleep(1)
      proc.send_signal(signal.SIGTERM)
      assert proc.wait(60) == 143
    finally:
      if proc.poll() is None:
        proc.kill()
  time.sleep(3)
  assert not any(os.path.exists(f'/proc/{pid}') for pid in workers)
  assert 'Traceback' not in log_path.read_text(errors='replace')
  assert digest(out) == before
  assert read_manifest(str(out))['run_id'] == manifest['run_id']


def test_a_second_run_into_a_busy_folder_is_refused_naming_the_first(replays, tmp_path):
  out = tmp_path / 'out'
  with open(tmp_path / 'first.log', 'w', encoding='utf-8') as log:
    first = launch('--source', f'replay:{replays[1]}', '--output-dir', str(out),
                   '--replay-mode', 'stream', stdout=log, stderr=log)
    try:
      wait_for_progress(tmp_path / 'first.log', first)
      running = read_json(os.path.join(out, stagings(out)[0], MANIFEST))
      code, _, stderr = cli('--source', f'replay:{replays[0]}', '--output-dir', str(out))
      assert code == 2, stderr[-2000:]
      assert f'is being written by run {running["run_id"]} (pid {first.pid}' in stderr
      assert 'Traceback' not in stderr
      assert stagings(out) == [STAGING_PREFIX + running['run_id']]  # it wrote nothing
      first.send_signal(signal.SIGKILL)  # a killed run leaves no lock behind
      first.wait(60)
    finally:
      if first.poll() is None:
        first.kill()
  code, _, stderr = cli('--source', f'replay:{replays[0]}', '--output-dir', str(out))
  assert code == 0, stderr[-3000:]
  assert read_manifest(str(out))['status'] == COMPLETE


def test_a_dead_letter_missing_from_its_file_fails_the_reconciliation(complete_run):
  """Every dead letter counted is a line of dead_letter.jsonl: a run whose file
  lost one does not reconcile, so it is never committed as complete."""
  import types
  from pipeline.readback.reconciliation import Reconciliation, reconcile
  out, manifest, _ = complete_run
  config = types.SimpleNamespace(
      unbounded=False, accounting_path=str(out / 'accounting.json'),
      aggregates_path=str(out / 'aggregates.jsonl'), dead_letter_path=str(out / 'dead_letter.jsonl'))
  assert reconcile(config) == manifest['accounting']
  lines = (out / 'dead_letter.jsonl').read_text(encoding='utf-8').splitlines(keepends=True)
  reason = json.loads(lines[0])['reason']
  (out / 'dead_letter.jsonl').write_text(''.join(lines[1:]), encoding='utf-8')
  expected = manifest['accounting'][reason]
  with pytest.raises(Reconciliation, match=f'{reason} {expected} != {expected - 1} dead letters'):
    reconcile(config)
