"""A run whose OUTPUT_DIR is on an object store (gs://, against a real Cloud Storage
emulator): the same committed files as a run into a local folder, written through Beam's
filesystems, with run.json written last and saying what the run published."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from apache_beam.io.filesystems import FileSystems

from pipeline.settings.config import BUNDLED_REPLAY

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTRACT_FILES = ('aggregates.jsonl', 'dead_letter.jsonl', 'accounting.json', 'duplicates.jsonl',
                  'rollup-300s/aggregates.jsonl', 'rollup-300s/dead_letter.jsonl',
                  'rollup-300s/accounting.json', 'rollup-300s/duplicates.jsonl')


def run(output_dir: str, *extra: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'pipeline', 'run', '--source', f'replay:{BUNDLED_REPLAY}',
       '--output-dir', output_dir, *extra],
      cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, 'PYTHONPATH': REPO})


def read_object(path: str) -> str:
  with FileSystems.open(path, mime_type='application/octet-stream') as f:
    return f.read().decode('utf-8')


def content(text: str, name: str):
  """A file's content, compared as the contract defines it: JSON lines in any order."""
  if name.endswith('.jsonl'):
    return sorted(text.splitlines())
  return json.loads(text)


@pytest.mark.integration
def test_a_run_into_a_bucket_commits_what_a_run_into_a_local_folder_does(gcs_emulator, tmp_path):
  bucket = gcs_emulator()
  args = ('--replay-mode', 'stream', '--rollup', '300:60')
  remote = run(f'{bucket}/incident', *args)
  assert remote.returncode == 0, remote.stderr[-3000:]
  local = run(str(tmp_path / 'local'), *args)
  assert local.returncode == 0, local.stderr[-3000:]

  manifest = json.loads(read_object(f'{bucket}/incident/run.json'))
  assert manifest['status'] == 'complete' and manifest['reconciled'] is True
  assert set(CONTRACT_FILES) | {'report.html', 'metrics.prom', 'reconciliation.json'} <= set(
      manifest['published'])
  for name in CONTRACT_FILES:
    with open(tmp_path / 'local' / name, encoding='utf-8') as f:
      expected = content(f.read(), name)
    assert content(read_object(f'{bucket}/incident/{name}'), name) == expected, name
  assert manifest['accounting'] == json.loads(
      (tmp_path / 'local' / 'accounting.json').read_text())
  assert 'tidemark_unaccounted_events{customer="all",source="all"} 0.0' in read_object(
      f'{bucket}/incident/metrics.prom')
  assert f'outputs in {bucket}/incident (run.json: complete)' in remote.stdout
  assert '/tmp/tidemark-run-' not in remote.stdout  # the launcher's local copy is not named


@pytest.mark.integration
def test_the_workers_write_each_bundle_as_its_own_object_and_the_launcher_joins_them(
    gcs_emulator):
  bucket = gcs_emulator()
  result = run(f'{bucket}/parts', '--replay-mode', 'stream')
  assert result.returncode == 0, result.stderr[-3000:]
  manifest = json.loads(read_object(f'{bucket}/parts/run.json'))
  staging = f'{bucket}/parts/{manifest["staging"]}'
  parts = [m.path for m in FileSystems.match(
      [f'{staging}/aggregates.jsonl.parts/*'])[0].metadata_list]
  assert len(parts) > 1  # a streaming run emits panes in many bundles
  joined = sorted(line for part in parts for line in read_object(part).splitlines())
  assert joined == sorted(read_object(f'{bucket}/parts/aggregates.jsonl').splitlines())


@pytest.mark.integration
def test_a_bucket_that_cannot_be_written_stops_the_run_before_it_starts(gcs_emulator):
  import glob
  import tempfile
  gcs_emulator()
  copies = set(glob.glob(os.path.join(tempfile.gettempdir(), 'tidemark-run-*')))
  result = run('gs://tidemark-no-such-bucket/run')
  assert set(glob.glob(os.path.join(tempfile.gettempdir(), 'tidemark-run-*'))) == copies
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'tidemark: error: --output-dir: cannot write to gs://tidemark-no-such-bucket/run' in (
      result.stderr)
  assert 'Traceback' not in result.stderr


@pytest.mark.integration
def test_an_interrupted_run_leaves_the_committed_run_in_the_bucket_as_it_was(gcs_emulator):
  import signal
  import time
  bucket = gcs_emulator()
  first = run(f'{bucket}/out')
  assert first.returncode == 0, first.stderr[-3000:]
  committed = {name: read_object(f'{bucket}/out/{name}')
               for name in ('run.json', 'aggregates.jsonl', 'accounting.json')}
  second = subprocess.Popen(
      [sys.executable, '-m', 'pipeline', 'run', '--source', f'replay:{BUNDLED_REPLAY}',
       '--output-dir', f'{bucket}/out', '--replay-mode', 'stream', '--window-size', '30'],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, 'PYTHONPATH': REPO})
  first_staging = f'{bucket}/out/{json.loads(committed["run.json"])["staging"]}/'
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline:  # until its workers have written something
    parts = FileSystems.match([f'{bucket}/out/.tidemark-run-*/aggregates.jsonl.parts/*'])[0]
    if any(not m.path.startswith(first_staging) for m in parts.metadata_list):
      break
    time.sleep(0.2)
  second.send_signal(signal.SIGINT)
  _, stderr = second.communicate(timeout=120)
  assert second.returncode == 128 + signal.SIGINT, stderr[-3000:]
  assert 'nothing committed' in stderr
  assert {name: read_object(f'{bucket}/out/{name}') for name in committed} == committed
  staged = [m.path for m in FileSystems.match([f'{bucket}/out/.tidemark-run-*/run.json'])[0]
            .metadata_list]
  statuses = sorted(json.loads(read_object(path))['status'] for path in staged)
  assert 'incomplete' in statuses, statuses
