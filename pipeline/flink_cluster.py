"""A Flink session cluster's REST API: the jobs Tidemark submitted to it,
stop-with-savepoint, cancel. Jobs are found by name (the customer file's
``job_name``), which a submission sets and the cluster reports.

  FlinkCluster('127.0.0.1:18081').running_job('dataflow-inc-iot-rollups')
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Dict, List, NamedTuple, Optional

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
