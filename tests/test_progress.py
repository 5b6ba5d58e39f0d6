"""Progress of long runs: plain lines in a log, one bar redrawn in place on a terminal."""

from __future__ import annotations

import io

import apache_beam as beam
import pytest

from transforms.flow.accounting import PROGRESS_BAR_WIDTH, LAUNCHER_PID, ReportProgress


class Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


def run_progress(monkeypatch, stderr, total: int, chunks=None, every_s=3600.0) -> str:
  monkeypatch.setattr('sys.stderr', stderr)
  monkeypatch.delenv(LAUNCHER_PID, raising=False)
  with beam.Pipeline() as p:
    elements = chunks if chunks is not None else list(range(total))
    _ = (p | beam.Create(elements)
         | ReportProgress(total, every_s=every_s, chunks=chunks is not None))
  return stderr.getvalue()


def test_a_log_gets_plain_lines_ending_with_the_total(monkeypatch):
  out = run_progress(monkeypatch, io.StringIO(), 5)
  assert '\r' not in out and '#' not in out
  assert out.splitlines()[-1].startswith('progress: 5/5 messages (100%)')


def test_a_terminal_gets_one_bar_redrawn_in_place_and_ended_with_a_newline(monkeypatch):
  out = run_progress(monkeypatch, Terminal(), 1000, chunks=[list(range(250))] * 4, every_s=1e-9)
  assert out.startswith('\r[') and out.endswith('\n') and out.count('\n') == 1
  frames = [frame for frame in out.rstrip('\n').split('\r') if frame]
  bars = [frame[1:frame.index(']')] for frame in frames]
  # the first chunk comes no later than the period after the start: no frame yet
  assert [bar.count('#') for bar in bars] == [
      PROGRESS_BAR_WIDTH * quarter // 4 for quarter in (2, 3, 4)]
  assert all(len(bar) == PROGRESS_BAR_WIDTH for bar in bars)
  assert frames[-1].split('] ', 1)[1].startswith('progress: 1,000/1,000 messages (100%)')


@pytest.mark.parametrize('total, every_s', [(-1, 1.0), (10, 0)])
def test_bad_settings_are_refused(total, every_s):
  with pytest.raises(ValueError):
    ReportProgress(total, every_s=every_s)
