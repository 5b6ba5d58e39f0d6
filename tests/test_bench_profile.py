"""``bench replay --profile`` (tools/bench/profile.py): a real run of the
bundled replay under cProfile, split into the bulk flow's phases."""

from __future__ import annotations

import os

import pytest

from tools.bench import profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(REPO, 'pipeline', 'data', 'incident-replay.jsonl')


@pytest.fixture(scope='module')
def profiled(tmp_path_factory):
  """The bundled replay run under cProfile: ``(figures, work folder)``."""
  workdir = tmp_path_factory.mktemp('profiled')
  figures = profile.profile_replay(
      ['pipeline', 'run', '--source', f'replay:{BUNDLED}', '--output-dir', str(workdir / 'out')],
      str(workdir), REPO)
  return figures, workdir


def test_every_phase_of_a_bulk_run_is_found_and_the_shares_add_up(profiled):
  figures, workdir = profiled
  shares = figures['share_pct']
  assert set(shares) == {name for name, _ in profile.PHASES} | {
      'shuffle', 'reconcile_and_commit', 'report', 'start_up'}
  assert all(share > 0 for share in shares.values()), shares
  assert sum(shares.values()) == pytest.approx(100, abs=0.5)
  assert os.path.exists(workdir / 'out' / 'accounting.json')


@pytest.mark.parametrize('entry, named', [
    (('transforms/flow/bulk.py', 'process', 'NoSuchFn'), 'NoSuchFn'),  # renamed
    (('transforms/flow/rollup.py', 'expand'), 'gone'),  # not part of a bulk run
])
def test_a_phase_that_did_not_run_is_refused_not_counted_as_no_time(
    profiled, monkeypatch, entry, named):
  _, workdir = profiled
  monkeypatch.setattr(profile, 'PHASES', profile.PHASES + (('gone', (entry,)),))
  with pytest.raises(LookupError, match=named):
    profile.phases(str(workdir / 'run.prof'), REPO)
