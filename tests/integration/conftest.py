"""Session fixtures: the real Kafka broker, Flink job server and Pub/Sub emulator, started and
stopped by the project's own scripts (which stage their jars when missing)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KAFKA_BOOTSTRAP = '127.0.0.1:' + os.environ.get('KAFKA_PORT', '19092')
JOB_ENDPOINT = 'localhost:' + os.environ.get('FLINK_JOB_PORT', '18099')
PUBSUB_SCRIPT = os.path.join(REPO, 'scripts', 'pubsub-emulator.sh')
KAFKA_EXPANSION_SERVICE = 'localhost:' + os.environ.get('KAFKA_EXPANSION_PORT', '18096')


#: The session cluster of scripts/flink-cluster.sh: its REST address and Python worker pool.
FLINK_MASTER = '127.0.0.1:' + os.environ.get('FLINK_REST_PORT', '18081')
WORKER_POOL = '127.0.0.1:' + os.environ.get('FLINK_WORKER_POOL_PORT', '18050')
CLUSTER_SCRIPT = os.path.join(REPO, 'scripts', 'flink-cluster.sh')


def run_script(path: str, action: str) -> None:
  """``path action``: fails the test with the script's output if it fails."""
  result = subprocess.run([path, action], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, f'{path} {action}:\n{result.stdout}\n{result.stderr}'


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.5):
  """The first true value of ``predicate()`` within ``timeout_s``; fails the
  test naming ``what`` otherwise."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(every_s)
  raise AssertionError(f'timed out after {timeout_s} s waiting for {what}')


def replace_killed_taskmanager(cluster, jid: str) -> float:
  """Kills the session cluster's TaskManager (SIGKILL), starts a new one and
  waits until every task of job ``jid`` runs again after a restart. Returns
  when it was killed (``time.time()``)."""
  pid = int(open(os.path.join(REPO, '.stage', 'run', 'flink-taskmanager.pid')).read())
  killed_at = time.time()
  os.kill(pid, signal.SIGKILL)
  wait_for(lambda: not os.path.exists(f'/proc/{pid}'), 30, 'the TaskManager to die')
  run_script(CLUSTER_SCRIPT, 'start')  # a new TaskManager

  def running_again() -> bool:
    detail = cluster.job(jid)
    return (cluster.restarts(jid) >= 1 and detail['state'] == 'RUNNING' and
            all(v['status'] == 'RUNNING' for v in detail['vertices']))
  wait_for(running_again, 120, 'the job to run again')
  return killed_at


def _script(name: str, action: str) -> None:
  result = subprocess.run(
      [os.path.join(REPO, 'scripts', name), action], capture_output=True, text=True,
      timeout=900)
  if result.returncode != 0:
    raise RuntimeError(
        f'scripts/{name} {action} failed ({result.returncode}):\n'
        f'{result.stdout[-2000:]}\n{result.stderr[-4000:]}')


@pytest.fixture(scope='session')
def kafka_broker() -> str:
  """A running Kafka broker's bootstrap address."""
  _script('kafka.sh', 'start')
  yield KAFKA_BOOTSTRAP
  _script('kafka.sh', 'stop')


@pytest.fixture(scope='session')
def flink_job_server() -> str:
  """A running Flink job server's job endpoint (and the Kafka expansion service)."""
  _script('flink.sh', 'start')
  yield JOB_ENDPOINT
  _script('flink.sh', 'stop')


@pytest.fixture(scope='session')
def emulator():
  """The emulator for the whole session; stopped (port freed) afterwards
  unless it was already running."""
  port = os.environ.get('PUBSUB_EMULATOR_PORT', '18085')
  was_running = subprocess.run([PUBSUB_SCRIPT, 'status'], capture_output=True).returncode == 0
  subprocess.run([PUBSUB_SCRIPT, 'start'], check=True, timeout=600)
  previous = os.environ.get('PUBSUB_EMULATOR_HOST')
  os.environ['PUBSUB_EMULATOR_HOST'] = f'127.0.0.1:{port}'
  try:
    yield os.environ['PUBSUB_EMULATOR_HOST']
  finally:
    if previous is None:
      os.environ.pop('PUBSUB_EMULATOR_HOST', None)
    else:
      os.environ['PUBSUB_EMULATOR_HOST'] = previous
    if not was_running:
      subprocess.run([PUBSUB_SCRIPT, 'stop'], check=True, timeout=120)


def flink_args(job_endpoint: str):
  return ['--runner=PortableRunner', f'--job_endpoint={job_endpoint}',
          '--environment_type=LOOPBACK']


class _TokenStub(http.server.BaseHTTPRequestHandler):
  """An OAuth token endpoint that grants every request (the emulator checks none)."""

  def do_POST(self):  # noqa: N802 (http.server's name)
    self.rfile.read(int(self.headers.get('Content-Length') or 0))
    body = json.dumps({'access_token': 'emulator', 'expires_in': 3600,
                       'token_type': 'Bearer'}).encode()
    self.send_response(200)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *_args):
    pass


@pytest.fixture(scope='session')
def gcs_emulator(tmp_path_factory):
  """A Cloud Storage emulator (scripts/gcs-emulator.sh) that Beam's gs:// filesystem
  talks to, in this process and in the launchers it starts: STORAGE_EMULATOR_HOST, and
  service-account credentials whose token endpoint is a local stub (Google's is out of
  reach, and without credentials Beam retries for ~20 s before going anonymous).
  Returns a function that makes a new bucket and returns its gs:// URL."""
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import rsa
  from google.auth.credentials import AnonymousCredentials
  from google.cloud import storage

  _script('gcs-emulator.sh', 'start')
  port = os.environ.get('GCS_EMULATOR_PORT', '14443')
  tokens = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _TokenStub)
  threading.Thread(target=tokens.serve_forever, daemon=True).start()
  key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
      serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
      serialization.NoEncryption()).decode()
  credentials = tmp_path_factory.mktemp('gcs') / 'service-account.json'
  credentials.write_text(json.dumps({
      'type': 'service_account', 'project_id': 'tidemark-test', 'private_key_id': '1',
      'private_key': key, 'client_email': 'tidemark@tidemark-test.iam.gserviceaccount.com',
      'client_id': '1', 'token_uri': f'http://127.0.0.1:{tokens.server_port}/token'}))
  env = {'STORAGE_EMULATOR_HOST': f'http://127.0.0.1:{port}',
         'GOOGLE_APPLICATION_CREDENTIALS': str(credentials)}
  previous = {name: os.environ.get(name) for name in env}
  os.environ.update(env)
  client = storage.Client(credentials=AnonymousCredentials(), project='tidemark-test')
  made = []

  def new_bucket() -> str:
    name = f'tidemark-{os.getpid()}-{len(made)}'
    client.create_bucket(name)
    made.append(name)
    return f'gs://{name}'

  try:
    yield new_bucket
  finally:
    tokens.shutdown()
    for name, value in previous.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    _script('gcs-emulator.sh', 'stop')
