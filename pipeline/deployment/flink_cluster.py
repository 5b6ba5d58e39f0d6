"""A Flink session cluster's REST API: the jobs Tidemark submitted to it,
stop-with-savepoint, cancel. Jobs are found by name (the customer file's
``job_name``), which a submission sets and the cluster reports.

  FlinkCluster('127.0.0.1:18081').running_job('dataflow-inc-iot-rollups')

And the Beam job server's staged artifacts of jobs that have ended on their
cluster, which nothing else removes (``clean_artifacts``):

  python -m pipeline.deployment.flink_cluster clean-artifacts .stage/flink/artifacts
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional

#: Job states after which a job will not run again (Flink's JobStatus).
TERMINAL_STATES = ('FINISHED', 'CANCELED', 'FAILED')


class FlinkClusterError(RuntimeError):
  """The cluster cannot be reached, or refused or failed a request."""


def savepoint_request(directory: Optional[str]) -> Dict:
  """The body of the savepoint request ``stop_with_savepoint`` sends."""
  body: Dict = {'cancel-job': True}
  if directory is not None:
    body['target-directory'] = directory
  return body


class Job(NamedTuple):
  jid: str
  name: str
  state: str
  start_time_ms: int


class FlinkCluster:
  """The REST endpoint ``host:port`` of a Flink cluster's JobManager."""

  def __init__(self, master: str, timeout_s: float = 10.0):
    host, sep, port = master.rpartition(':')
    if not sep or not host or not port.isdigit():
      raise ValueError(f'a Flink master is HOST:PORT, got {master!r}')
    self.master = master
    self._base = f'http://{master}'
    self._timeout = timeout_s

  def _call(self, method: str, path: str, body: Optional[Dict] = None) -> Dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        self._base + path, data=data, method=method,
        headers={'Content-Type': 'application/json'} if data else {})
    try:
      with urllib.request.urlopen(request, timeout=self._timeout) as response:
        text = response.read().decode() or '{}'
    except urllib.error.HTTPError as e:
      raise FlinkClusterError(
          f'{method} {path} on {self.master}: HTTP {e.code}: {e.read().decode()[:500]}') from None
    except (urllib.error.URLError, OSError) as e:
      raise FlinkClusterError(
          f'the Flink cluster at {self.master} cannot be reached ({e}); is it running? '
          '(scripts/flink-cluster.sh start)') from None
    return json.loads(text)

  def overview(self) -> Dict:
    return self._call('GET', '/overview')

  def jobs(self) -> List[Job]:
    return [Job(j['jid'], j['name'], j['state'], j.get('start-time', 0))
            for j in self._call('GET', '/jobs/overview')['jobs']]

  def running_job(self, name: str) -> Optional[Job]:
    """The newest job of that name that has not ended."""
    live = [j for j in self.jobs() if j.name == name and j.state not in TERMINAL_STATES]
    return max(live, key=lambda j: j.start_time_ms) if live else None

  def job(self, jid: str) -> Dict:
    return self._call('GET', f'/jobs/{jid}')

  def restarts(self, jid: str) -> int:
    """How often the job restarted after a failure (Flink's numRestarts)."""
    metrics = self._call('GET', f'/jobs/{jid}/metrics?get=numRestarts')
    return int(float(metrics[0]['value'])) if metrics else 0

  def checkpoints(self, jid: str) -> Dict:
    return self._call('GET', f'/jobs/{jid}/checkpoints')

  def config(self) -> Dict[str, str]:
    """The cluster's configuration (the JobManager's)."""
    return {e['key']: e['value'] for e in self._call('GET', '/jobmanager/config')}

  def latest_retained_checkpoint(self, jid: str) -> Optional[str]:
    """The newest complete checkpoint the job ``jid`` left in the cluster's
    ``state.checkpoints.dir`` (retained on cancel, and after a JobManager that
    lost the job), as a path to restore from; None when there is none or the
    directory is not on a disk this machine reads."""
    directory = self.config().get('state.checkpoints.dir', '')
    if directory.startswith('file:'):
      directory = '/' + directory[len('file:'):].lstrip('/')
    if not directory.startswith('/'):
      return None
    folder = os.path.join(directory, jid)
    try:
      names = os.listdir(folder)
    except OSError:
      return None
    complete = [(int(n[len('chk-'):]), n) for n in names
                if re.fullmatch(r'chk-[0-9]+', n) and
                os.path.exists(os.path.join(folder, n, '_metadata'))]
    return os.path.join(folder, max(complete)[1]) if complete else None

  def wait_for_job(self, name: str, timeout_s: float, since_ms: int = 0) -> Job:
    """The job of that name once it is RUNNING (started at or after ``since_ms``)."""
    deadline = time.monotonic() + timeout_s
    while True:
      job = self.running_job(name)
      if job is not None and job.state == 'RUNNING' and job.start_time_ms >= since_ms:
        return job
      if time.monotonic() > deadline:
        raise FlinkClusterError(f'no job {name!r} running on {self.master} after {timeout_s:.0f} s')
      time.sleep(0.5)

  def stop_with_savepoint(self, jid: str, directory: Optional[str],
                          timeout_s: float = 300) -> str:
    """Takes a savepoint of the running job in ``directory`` (the cluster's
    default when None), then cancels the job; returns the savepoint's path once
    the job is CANCELED.

    This is Flink's cancel-with-savepoint, not ``/stop``: a stop ends the
    sources and finishes every operator *before* its final savepoint, and a
    Beam operator's finish flushes to the end of time (it advances its
    watermark to the maximum and fires every timer and window, drain or not),
    so that savepoint would hold closed windows and a gate that judges every
    later event too late. Taken while the job runs, the savepoint holds the
    open windows; what the job did between the savepoint and the cancel is
    input the restored job reads again, as after a crash.
    """
    trigger = self._call('POST', f'/jobs/{jid}/savepoints', savepoint_request(directory))
    deadline = time.monotonic() + timeout_s
    while True:
      status = self._call('GET', f'/jobs/{jid}/savepoints/{trigger["request-id"]}')
      if status['status']['id'] == 'COMPLETED':
        operation = status.get('operation', {})
        if 'failure-cause' in operation:
          cause = operation['failure-cause'].get('stack-trace', '').split('\n', 1)[0]
          raise FlinkClusterError(f'the savepoint of job {jid} failed: {cause}')
        location = operation['location']
        break
      if time.monotonic() > deadline:
        raise FlinkClusterError(f'the savepoint of job {jid} did not complete in {timeout_s:.0f} s')
      time.sleep(0.5)
    while self.job(jid)['state'] not in TERMINAL_STATES:
      if time.monotonic() > deadline:
        raise FlinkClusterError(
            f'job {jid} did not stop in {timeout_s:.0f} s after its savepoint {location}')
      time.sleep(0.5)
    return location

  def cancel(self, jid: str) -> None:
    self._call('PATCH', f'/jobs/{jid}?mode=cancel')


# The Beam job server (scripts/flink.sh) stages each submission's artifacts (the
# Python SDK's files and the Kafka expansion service's jars, ~200 MB) in
# ARTIFACTS_DIR/<sha256 of the submission's staging token>/, and the pipeline it
# hands to Flink names those files by path: a TaskManager serves them to every
# SDK worker that fetches artifacts when it starts (DOCKER and PROCESS
# environments do, at each restart too), so they are needed as long as the job
# can run. The job server removes them when it sees the job end
# (--clean-artifacts-per-job), which it never does for a detached submission:
# it hands the job to the cluster and reports its state as unknown from then
# on. So a detached submission records, in its folder, the cluster job that
# uses it, and a folder is removed once that job has ended on its cluster.

#: The file, in a submission's artifact folder, naming the cluster job using it.
JOB_RECORD = 'tidemark-flink-job.json'
_STAGING_FOLDER = re.compile(r'[0-9a-f]{64}')
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class JobRecord(NamedTuple):
  master: str
  jid: str
  name: str


def artifacts_dir() -> str:
  """The local job server's staging directory (scripts/flink.sh's --artifacts-dir)."""
  stage = os.environ.get('TIDEMARK_STAGE') or os.path.join(_ROOT, '.stage')
  return os.path.join(stage, 'flink', 'artifacts')


def staging_folders(paths: Iterable[str]) -> List[str]:
  """The job server's staging folders (named by a sha256) holding these files."""
  folders = {os.path.dirname(path) for path in paths}
  return sorted(f for f in folders if _STAGING_FOLDER.fullmatch(os.path.basename(f)))


def write_job_record(folder: str, master: str, jid: str, name: str) -> None:
  with open(os.path.join(folder, JOB_RECORD), 'w', encoding='utf-8') as f:
    json.dump(JobRecord(master, jid, name)._asdict(), f)


def read_job_record(folder: str) -> Optional[JobRecord]:
  """The folder's job record, or None when it has none (or an unreadable one)."""
  try:
    with open(os.path.join(folder, JOB_RECORD), encoding='utf-8') as f:
      data = json.load(f)
    return JobRecord(str(data['master']), str(data['jid']), str(data.get('name', '')))
  except (OSError, ValueError, KeyError, TypeError):
    return None


def artifact_records(root: str) -> Dict[str, Optional[JobRecord]]:
  """Each staging folder under ``root`` and its job record (None if none)."""
  try:
    names = os.listdir(root)
  except FileNotFoundError:
    return {}
  folders = [os.path.join(root, n) for n in names if _STAGING_FOLDER.fullmatch(n)]
  return {f: read_job_record(f) for f in folders if os.path.isdir(f)}


def stale_artifact_folders(records: Mapping[str, Optional[JobRecord]],
                           jobs: Mapping[str, Optional[Mapping[str, str]]],
                           unrecorded: bool = False) -> List[str]:
  """The folders no job needs: their recorded job has ended (a terminal state)
  or is unknown to its cluster (``jobs``: each master's job states by id, None
  when it cannot be reached, and then its folders are kept). A folder without a
  record belongs to a submission the job server still runs or is staging,
  unless the job server is stopped: it goes only with ``unrecorded``."""
  stale = []
  for folder, record in sorted(records.items()):
    if record is None:
      if unrecorded:
        stale.append(folder)
      continue
    states = jobs.get(record.master)
    if states is None:
      continue
    if record.jid not in states or states[record.jid] in TERMINAL_STATES:
      stale.append(folder)
  return stale


def cluster_job_states(master: str, timeout_s: float = 5.0) -> Optional[Dict[str, str]]:
  """The states of the jobs the cluster at ``master`` knows, by id; None when
  it cannot be asked."""
  try:
    return {job.jid: job.state for job in FlinkCluster(master, timeout_s).jobs()}
  except (FlinkClusterError, ValueError):
    return None


def clean_artifacts(root: str, unrecorded: bool = False,
                    job_states: Callable[[str], Optional[Dict[str, str]]] = cluster_job_states
                    ) -> List[str]:
  """Removes the staging folders under ``root`` that no job needs (see
  ``stale_artifact_folders``); returns them. ``unrecorded`` only while the
  job server is stopped."""
  records = artifact_records(root)
  masters = {r.master for r in records.values() if r is not None}
  jobs = {master: job_states(master) for master in sorted(masters)}
  removed = []
  for folder in stale_artifact_folders(records, jobs, unrecorded):
    shutil.rmtree(folder, ignore_errors=True)
    if not os.path.exists(folder):
      removed.append(folder)
  return removed


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m pipeline.deployment.flink_cluster',
      description='Removes the Beam job server\'s staged artifacts no job needs any more.')
  commands = parser.add_subparsers(dest='command', required=True)
  clean = commands.add_parser('clean-artifacts', help='the folders of jobs that have ended')
  clean.add_argument('directory', nargs='?', default=None,
                     help='the job server\'s --artifacts-dir (default: .stage/flink/artifacts)')
  clean.add_argument('--unrecorded', action='store_true',
                     help='also folders that name no job: only while the job server is stopped')
  args = parser.parse_args(argv)
  for folder in clean_artifacts(args.directory or artifacts_dir(), args.unrecorded):
    print(f'removed {folder}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
