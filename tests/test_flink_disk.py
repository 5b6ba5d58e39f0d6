"""What a Flink job leaves on disk: the job server's staged artifacts of jobs
that have ended (pipeline/deployment/flink_cluster.py, recorded by pipeline/launch/submit.py) and
the folders of TaskManagers that no longer run (scripts/flink-cluster.sh
clean-stale). No service is started; clusters are stand-ins."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from types import SimpleNamespace
from typing import Dict, List, Optional

import pytest
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_job_api_pb2, beam_runner_api_pb2

from pipeline.deployment import flink_cluster
from pipeline.launch import submit
from pipeline.deployment.flink_cluster import (
    JOB_RECORD, Job, JobRecord, artifact_records, clean_artifacts, read_job_record,
    stale_artifact_folders, staging_folders, write_job_record)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASTER = '127.0.0.1:18081'


def sha(token: str) -> str:
  return hashlib.sha256(token.encode()).hexdigest()


def staged(root, token: str, jid: Optional[str] = None, master: str = MASTER) -> str:
  """A staging folder as the job server leaves it, recorded for ``jid``."""
  folder = root / sha(token)
  folder.mkdir(parents=True)
  (folder / 'beam-sdks-java-io-kafka.jar').write_bytes(b'\0' * 1024)
  (folder / 'pickled_main_session').write_bytes(b'main')
  if jid is not None:
    write_job_record(str(folder), master, jid, f'job-{token}')
  return str(folder)


class Jobs:
  """A stand-in for the clusters' job lists: states by master, None when down."""

  def __init__(self, states: Dict[str, Optional[Dict[str, str]]]):
    self.states = states
    self.asked: List[str] = []

  def __call__(self, master: str) -> Optional[Dict[str, str]]:
    self.asked.append(master)
    return self.states.get(master)


def test_staging_folders_are_the_sha256_named_parents_of_the_staged_files():
  root = '/stage/flink/artifacts'
  paths = [f'{root}/{sha("a")}/one.jar', f'{root}/{sha("a")}/two.whl',
           f'{root}/{sha("b")}/main', '/opt/lib/kafka.jar', f'{root}/not-a-hash/x']
  assert staging_folders(paths) == sorted([f'{root}/{sha("a")}', f'{root}/{sha("b")}'])
  assert staging_folders([]) == []


def test_a_job_record_reads_back_and_a_broken_one_counts_as_none(tmp_path):
  write_job_record(str(tmp_path), MASTER, 'abc123', 'iot-rollups')
  assert read_job_record(str(tmp_path)) == JobRecord(MASTER, 'abc123', 'iot-rollups')
  (tmp_path / JOB_RECORD).write_text('{"master": "127.0.0.1:18081"')
  assert read_job_record(str(tmp_path)) is None
  (tmp_path / JOB_RECORD).write_text('["not", "an", "object"]')
  assert read_job_record(str(tmp_path)) is None
  os.remove(tmp_path / JOB_RECORD)
  assert read_job_record(str(tmp_path)) is None


@pytest.mark.parametrize('state', ['FINISHED', 'CANCELED', 'FAILED'])
def test_the_folder_of_an_ended_job_is_stale(state):
  records = {'/a/f1': JobRecord(MASTER, 'j1', 'n')}
  assert stale_artifact_folders(records, {MASTER: {'j1': state}}) == ['/a/f1']


@pytest.mark.parametrize('state', ['RUNNING', 'RESTARTING', 'CREATED', 'INITIALIZING',
                                   'FAILING', 'CANCELLING', 'SUSPENDED', 'RECONCILING'])
def test_the_folder_of_a_job_that_can_still_run_is_kept(state):
  records = {'/a/f1': JobRecord(MASTER, 'j1', 'n')}
  assert stale_artifact_folders(records, {MASTER: {'j1': state}}) == []


def test_a_job_its_cluster_does_not_know_has_ended_but_an_unreachable_cluster_keeps_all():
  records = {'/a/f1': JobRecord(MASTER, 'gone', 'n'),
             '/a/f2': JobRecord('10.0.0.9:8081', 'j2', 'n')}
  jobs = {MASTER: {'other': 'RUNNING'}, '10.0.0.9:8081': None}
  assert stale_artifact_folders(records, jobs) == ['/a/f1']


def test_a_folder_naming_no_job_goes_only_when_asked():
  records = {'/a/f1': None, '/a/f2': JobRecord(MASTER, 'j2', 'n')}
  jobs = {MASTER: {'j2': 'RUNNING'}}
  assert stale_artifact_folders(records, jobs) == []
  assert stale_artifact_folders(records, jobs, unrecorded=True) == ['/a/f1']


def test_clean_artifacts_removes_only_what_no_job_needs(tmp_path):
  root = tmp_path / 'artifacts'
  running = staged(root, 'job_1', 'j-running')
  canceled = staged(root, 'job_2', 'j-canceled')
  forgotten = staged(root, 'job_3', 'j-forgotten')
  elsewhere = staged(root, 'job_4', 'j-elsewhere', master='10.0.0.9:8081')
  unrecorded = staged(root, 'job_5')
  (root / 'README').write_text('not a staging folder')
  (root / 'keep-me').mkdir()
  jobs = Jobs({MASTER: {'j-running': 'RUNNING', 'j-canceled': 'CANCELED'},
               '10.0.0.9:8081': None})

  assert clean_artifacts(str(root), job_states=jobs) == sorted([canceled, forgotten])
  assert sorted(jobs.asked) == sorted([MASTER, '10.0.0.9:8081'])  # once per cluster
  assert sorted(os.listdir(root)) == sorted(
      ['README', 'keep-me'] + [os.path.basename(f) for f in (running, elsewhere, unrecorded)])

  assert clean_artifacts(str(root), unrecorded=True, job_states=jobs) == [unrecorded]
  assert set(artifact_records(str(root))) == {running, elsewhere}
  assert os.path.isfile(os.path.join(running, 'beam-sdks-java-io-kafka.jar'))


def test_clean_artifacts_of_a_missing_directory_is_nothing(tmp_path):
  assert clean_artifacts(str(tmp_path / 'absent'), unrecorded=True, job_states=Jobs({})) == []


def test_the_command_line_asks_no_cluster_when_no_folder_names_a_job(tmp_path, capsys):
  root = tmp_path / 'artifacts'
  folder = staged(root, 'job_1')
  assert flink_cluster.main(['clean-artifacts', str(root)]) == 0
  assert os.path.isdir(folder)
  assert flink_cluster.main(['clean-artifacts', str(root), '--unrecorded']) == 0
  assert not os.path.exists(folder)
  assert capsys.readouterr().out == f'removed {folder}\n'


def test_the_default_artifacts_dir_follows_tidemark_stage(monkeypatch, tmp_path):
  monkeypatch.setenv('TIDEMARK_STAGE', str(tmp_path))
  assert flink_cluster.artifacts_dir() == str(tmp_path / 'flink' / 'artifacts')
  monkeypatch.delenv('TIDEMARK_STAGE')
  assert flink_cluster.artifacts_dir() == os.path.join(REPO, '.stage', 'flink', 'artifacts')


class JobService:
  """A stand-in for the job server's GetPipeline: the resolved pipeline of one
  submission, its dependencies as staged files."""

  def __init__(self, job_id: str, paths: List[str]):
    self.job_id = job_id
    pipeline = beam_runner_api_pb2.Pipeline()
    env = pipeline.components.environments['py']
    for path in paths:
      env.dependencies.add(
          type_urn=common_urns.artifact_types.FILE.urn,
          type_payload=beam_runner_api_pb2.ArtifactFilePayload(path=path).SerializeToString())
    env.dependencies.add(type_urn=common_urns.artifact_types.URL.urn, type_payload=b'')
    self.pipeline = pipeline

  def GetPipeline(self, request, timeout=None):
    assert isinstance(request, beam_job_api_pb2.GetJobPipelineRequest)
    assert request.job_id == self.job_id
    return beam_job_api_pb2.GetJobPipelineResponse(pipeline=self.pipeline)


def test_a_detached_submission_records_its_job_and_removes_ended_ones(tmp_path, monkeypatch):
  root = tmp_path / 'artifacts'
  mine = staged(root, 'job_new')
  ended = staged(root, 'job_old', 'j-old')
  other = staged(root, 'job_staging')  # another submission, not recorded yet
  jobs = Jobs({MASTER: {'j-new': 'RUNNING', 'j-old': 'CANCELED'}})
  monkeypatch.setattr(submit, 'clean_artifacts', lambda r: clean_artifacts(r, job_states=jobs))
  result = SimpleNamespace(_job_service=JobService('inv-1', [
      os.path.join(mine, 'beam-sdks-java-io-kafka.jar'), os.path.join(mine, 'pickled_main_session'),
      '/somewhere/else/not-staged.jar']), _job_id='inv-1')

  submit.record_artifacts(result, MASTER, Job('j-new', 'iot-rollups', 'RUNNING', 0))

  assert read_job_record(mine) == JobRecord(MASTER, 'j-new', 'iot-rollups')
  assert not os.path.exists(ended)
  assert os.path.isdir(other) and read_job_record(other) is None
  with open(os.path.join(mine, JOB_RECORD), encoding='utf-8') as f:
    assert json.load(f) == {'master': MASTER, 'jid': 'j-new', 'name': 'iot-rollups'}


def test_a_submission_the_job_server_cannot_describe_records_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(submit, 'clean_artifacts', lambda r: pytest.fail('nothing to clean'))
  assert submit.staged_artifact_paths(SimpleNamespace()) == []
  submit.record_artifacts(SimpleNamespace(), MASTER, Job('j', 'n', 'RUNNING', 0))
  # staged on another machine: the folder is not here
  result = SimpleNamespace(
      _job_service=JobService('inv', [f'/elsewhere/{sha("t")}/a.jar']), _job_id='inv')
  assert submit.staged_artifact_paths(result) == [f'/elsewhere/{sha("t")}/a.jar']
  submit.record_artifacts(result, MASTER, Job('j', 'n', 'RUNNING', 0))


# scripts/flink-cluster.sh clean-stale


def dead_pid() -> int:
  process = subprocess.Popen(['true'])
  process.wait()
  return process.pid


def taskmanager_tree(stage, live: Dict[str, int]) -> None:
  """.stage/flink-cluster/tmp as TaskManagers leave it, and their pid files."""
  tmp = stage / 'flink-cluster' / 'tmp'
  for name in ('flink-taskmanager', 'flink-taskmanager-1700000000000000000',
               'flink-taskmanager-1700000000000000001'):
    working = tmp / name / 'tm_127.0.0.1:16130-a1b2c3'
    (working / 'blobStorage').mkdir(parents=True)
    (working / 'blobStorage' / 'blob').write_bytes(b'\0' * 1024)
    (tmp / name / 'flink-io-0f1e').mkdir()
  (tmp / 'tm_127.0.0.1:16131-d4e5f6' / 'blobStorage').mkdir(parents=True)
  (tmp / 'jm_0123456789abcdef' / 'blobStorage').mkdir(parents=True)
  (tmp / 'flink-web-upload').mkdir()
  run = stage / 'run'
  run.mkdir(parents=True, exist_ok=True)
  for name, pid in live.items():
    (run / f'{name}.pid').write_text(f'{pid}\n')


def clean_stale(stage) -> subprocess.CompletedProcess:
  result = subprocess.run(
      ['bash', os.path.join(REPO, 'scripts', 'flink-cluster.sh'), 'clean-stale'],
      env={**os.environ, 'TIDEMARK_STAGE': str(stage)}, capture_output=True, text=True,
      timeout=60)
  assert result.returncode == 0, result.stderr
  return result


def test_clean_stale_keeps_running_taskmanagers_and_removes_dead_ones(tmp_path):
  taskmanager_tree(tmp_path, {'flink-taskmanager': os.getpid(),  # alive: this process
                              'flink-taskmanager-1700000000000000000': dead_pid()})
  (tmp_path / 'run' / 'flink-jobmanager.pid').write_text(f'{os.getpid()}\n')  # alive
  out = clean_stale(tmp_path).stdout
  tmp = tmp_path / 'flink-cluster' / 'tmp'
  assert sorted(os.listdir(tmp)) == sorted([
      'flink-taskmanager', 'tm_127.0.0.1:16131-d4e5f6', 'jm_0123456789abcdef',
      'flink-web-upload'])
  assert (tmp / 'flink-taskmanager' / 'tm_127.0.0.1:16130-a1b2c3' / 'blobStorage' / 'blob'
          ).is_file()
  assert out.count('removed') == 2  # the dead one's and the one without a pid file


def test_clean_stale_removes_ownerless_tm_folders_once_no_taskmanager_runs(tmp_path):
  taskmanager_tree(tmp_path, {'flink-taskmanager': dead_pid(), 'flink-jobmanager': os.getpid()})
  clean_stale(tmp_path)
  tmp = tmp_path / 'flink-cluster' / 'tmp'
  assert sorted(os.listdir(tmp)) == ['flink-web-upload', 'jm_0123456789abcdef']
  assert (tmp / 'jm_0123456789abcdef' / 'blobStorage').is_dir()


def test_clean_stale_removes_what_a_dead_jobmanager_left(tmp_path):
  taskmanager_tree(tmp_path, {'flink-taskmanager': os.getpid(), 'flink-jobmanager': dead_pid()})
  tmp = tmp_path / 'flink-cluster' / 'tmp'
  (tmp / 'flink-jobmanager' / 'jm_fedcba9876543210' / 'blobStorage').mkdir(parents=True)
  (tmp / 'flink-rpc-akka0a1b.jar').write_bytes(b'jar')
  out = clean_stale(tmp_path).stdout
  assert 'no JobManager is running' in out
  assert not (tmp / 'flink-jobmanager').exists() and not (tmp / 'jm_0123456789abcdef').exists()
  assert not (tmp / 'flink-rpc-akka0a1b.jar').exists()
  assert (tmp / 'flink-taskmanager' / 'tm_127.0.0.1:16130-a1b2c3').is_dir()  # a live one's


def test_clean_stale_without_a_tmp_folder_does_nothing(tmp_path):
  assert clean_stale(tmp_path).stdout == ''
  assert not (tmp_path / 'flink-cluster').exists()
