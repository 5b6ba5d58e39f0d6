"""Session fixtures: the real Kafka broker and Flink job server, started and
stopped by the project's own scripts (which stage their jars when missing)."""

from __future__ import annotations

import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KAFKA_BOOTSTRAP = '127.0.0.1:' + os.environ.get('KAFKA_PORT', '19092')
JOB_ENDPOINT = 'localhost:' + os.environ.get('FLINK_JOB_PORT', '18099')
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


def flink_args(job_endpoint: str):
  return ['--runner=PortableRunner', f'--job_endpoint={job_endpoint}',
          '--environment_type=LOOPBACK']
