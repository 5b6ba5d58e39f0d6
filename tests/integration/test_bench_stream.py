"""``python -m tools bench stream`` end to end against the real broker and
job server: one short step, then the accounting checks it makes. Speed is not
asserted (benchmarks print figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from integration.conftest import KAFKA_BOOTSTRAP, flink_args

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_short_ramp_prints_one_json_line_and_accounts_for_everything(
    kafka_broker, flink_job_server, tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'tools', 'bench', 'stream', '--rates', '100',
       '--step-seconds', '10', '--window-size', '10', '--allowed-lateness', '5',
       '--bootstrap-servers', KAFKA_BOOTSTRAP, '--workdir', str(tmp_path),
       *flink_args(flink_job_server), '--sqlite=none'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1
  figures = json.loads(lines[0])
  assert figures['bench'] == 'stream' and figures['runner'] == 'PortableRunner'
  [step] = figures['steps']
  assert step['rate'] == 100 and step['published'] == 1000
  assert isinstance(step['sustained'], bool)
  assert set(step['on_time_latency']) == {'windows', 'window_ends', 'p50_s', 'p95_s', 'max_s'}
  # warm-up step + ramp step, all read and every one accounted for
  assert figures['published'] == 2000
  assert figures['accounting']['received'] == 2000
  assert figures['received_equals_published'] and figures['accounting_consistent']
  assert figures['aggregated_equals_final_panes'] and figures['reconciled_before_stop']
  assert figures['accounting']['aggregated'] > 0
  # cancelled through the job service, the launcher stops cleanly
  assert figures['pipeline_exit_code'] == 0
