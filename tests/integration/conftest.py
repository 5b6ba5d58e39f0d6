"""Session fixtures: the real Kafka broker, Flink job server and Pub/Sub emulator, started and
stopped by the project's own scripts (which stage their jars when missing)."""

from __future__ import annotations

import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KAFKA_BOOTSTRAP = '127.0.0.1:' + os.environ.get('KAFKA_PORT', '19092')
JOB_ENDPOINT = 'localhost:' + os.environ.get('FLINK_JOB_PORT', '18099')
PUBSUB_SCRIPT = os.path.join(REPO, 'scripts', 'pubsub-emulator.sh')
KAFKA_EXPANSION_SERVICE = 'localhost:' + os.environ.get('KAFKA_EXPANSION_PORT', '18096')


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
