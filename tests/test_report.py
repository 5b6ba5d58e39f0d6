"""The run report, its charts and metrics (pipeline/readback/report.py, charts.py,
metrics.py, outputs.py) against a real run's outputs.

The bundled incident replay is run once through the CLI (the DirectRunner's
bulk replay): every run writes report.html and metrics.prom beside its
contract files, and their figures must be the run's own.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.readback import charts, outputs as run_outputs, report
from pipeline.readback.metrics import METRICS_NAME
from pipeline.launch import run as tidemark_run
from tests.conftest import data, mark, payload, read_jsonl, write_replay
from transforms.rules.model import CATEGORIES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINUTE = 60_000
T0 = 1705543200000  # 2024-01-18T02:00:00Z


@pytest.fixture(scope='module')
def incident_run(tmp_path_factory) -> str:
  """The default job (the bundled incident replay), as a newcomer runs it."""
  out = str(tmp_path_factory.mktemp('incident') / 'out')
  assert tidemark_run.main(['--output-dir', out]) == 0
  return out


def _samples(path: str) -> dict:
  with open(path, encoding='utf-8') as f:
    families = text_string_to_metric_families(f.read())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in families for s in family.samples}


def test_a_run_writes_its_report_and_metrics_beside_its_outputs(incident_run):
  for name in (report.REPORT_NAME, METRICS_NAME):
    assert os.path.getsize(os.path.join(incident_run, name)) > 0
  page = open(os.path.join(incident_run, report.REPORT_NAME), encoding='utf-8').read()
  assert 'run complete, reconciled' in page and 'class="status ok"' in page
  assert 'src="http' not in page and '<link' not in page  # self-contained


def test_the_metrics_are_the_runs_accounting_and_dead_letters(incident_run):
  accounting = json.load(open(os.path.join(incident_run, 'accounting.json')))
  samples = _samples(os.path.join(incident_run, METRICS_NAME))
  for outcome in CATEGORIES:
    key = ('tidemark_events_total',
           (('customer', 'all'), ('outcome', outcome), ('source', 'all')))
    assert samples[key] == accounting[outcome], outcome
  assert samples[('tidemark_unaccounted_events',
                  (('customer', 'all'), ('source', 'all')))] == 0
  dead = collections.Counter(
      (d['reason'], d['source']) for d in read_jsonl(os.path.join(incident_run,
                                                                  'dead_letter.jsonl')))
  exported = {(dict(labels)['reason'], dict(labels)['source']): value
              for (name, labels), value in samples.items()
              if name == 'tidemark_dead_letters_total'}
  assert exported == dead
  received = {dict(labels)['source']: value for (name, labels), value in samples.items()
              if name == 'tidemark_received_total'}
  assert sum(received.values()) == accounting['received'] and set(received) == {'A', 'B', 'C'}
  # the incident's source C lags the others by more than the allowed lateness
  lag = {dict(labels)['source']: value for (name, labels), value in samples.items()
         if name == 'tidemark_watermark_lag_seconds'}
  assert lag['A'] == 0 and lag['C'] > samples[('tidemark_allowed_lateness_seconds', ())] == 30
  assert samples[('tidemark_run_complete', ())] == 1
  assert samples[('tidemark_open_windows', ())] == 0
  finals = run_outputs.load(incident_run).final_panes()
  assert samples[('tidemark_windows_closed_total', ())] == len(finals)
  assert samples[('tidemark_peak_resident_memory_bytes', ())] > 50 * 2**20


def test_the_breakdown_adds_up_to_the_accounting(incident_run):
  outputs = run_outputs.load(incident_run)
  split = run_outputs.breakdown(outputs)
  accounting = outputs.accounting
  # no duplicates.jsonl on a bulk replay: per source they stay with the aggregated
  assert split.merged == 'admitted or duplicate'
  for outcome in ('invalid', 'too_late'):
    assert sum(c.get(outcome, 0) for c in split.by_source.values()) == accounting[outcome]
  assert sum(c['received'] for c in split.by_source.values()) == accounting['received']
  assert sum(c[split.merged] for c in split.by_source.values()) == (
      accounting['duplicate'] + accounting['aggregated'])
  assert sum(c.get('aggregated', 0) for c in split.by_customer.values()) == (
      accounting['aggregated'])
  # every too-late letter's payload names its customer; an invalid one names none
  assert sum(c.get('too_late', 0) for c in split.by_customer.values()) == accounting['too_late']
  assert not any(c.get('invalid') for c in split.by_customer.values())
  assert set(split.by_customer) == {'acme.io', 'dataflow-inc', 'finserve'}


def test_the_lateness_split_finds_every_too_late_message(incident_run):
  outputs = run_outputs.load(incident_run)
  within, too_late = charts.lateness(outputs)
  assert len(too_late) == outputs.accounting['too_late'] == 37
  lateness = outputs.allowed_lateness_s
  assert all(s >= lateness for s in too_late) and all(s <= lateness for s in within)
  assert within  # the incident's late events inside the allowed lateness


def test_a_bulk_replay_records_what_it_delivered_as_a_reading_of_the_replay_finds_it(
    incident_run, tmp_path):
  recorded = run_outputs.load(incident_run)
  copy = str(tmp_path / 'copy')
  shutil.copytree(incident_run, copy)
  os.remove(os.path.join(copy, 'arrivals.json'))
  read = run_outputs.load(copy)  # the replay read again
  assert recorded.replay_received == read.replay_received == {'A': 1343, 'B': 1200, 'C': 457}
  assert recorded.replay_watermarks == read.replay_watermarks
  assert sorted(recorded.replay_late) == sorted(read.replay_late) and len(read.replay_late) == 60


def test_each_late_copy_of_a_redelivered_payload_is_judged_on_its_own(tmp_path):
  redelivered = payload('x', T0 + 1000)
  replay = write_replay(str(tmp_path / 'replay.jsonl'), [
      data('A', redelivered), mark('A', T0 + MINUTE + 10_000),
      data('A', redelivered),  # 10 s past the end: a duplicate, not too late
      mark('A', T0 + MINUTE + 40_000),
      data('A', redelivered)])  # 40 s past the end: too late (30 s allowed)
  out = str(tmp_path / 'out')
  assert tidemark_run.main(['--source', f'replay:{replay}', '--output-dir', out]) == 0
  outputs = run_outputs.load(out)
  assert outputs.accounting['too_late'] == outputs.accounting['duplicate'] == 1
  assert outputs.replay_late == [(10.0, False), (40.0, True)]
  assert outputs.replay_watermarks == {'A': [(1, T0 + MINUTE + 10_000), (2, T0 + MINUTE + 40_000)]}


def test_every_chart_of_a_replay_run_is_a_drawn_svg(incident_run):
  made = charts.charts(run_outputs.load(incident_run))
  assert [c.title for c in made] == [
      'Accounting', 'Dead letters over event time', 'Lateness', 'Watermark per source',
      'Window completeness']
  for chart in made:
    root = ElementTree.fromstring(chart.svg)
    assert root.tag.endswith('svg')
    drawn = [e for e in root.iter() if e.tag.endswith('path') or e.tag.endswith('rect')]
    assert len(drawn) >= 8, chart.title  # axes, ticks and the data


def _rollup_run(tmp_path) -> str:
  """A run with a 300 s rollup whose one late event only the rollup accepts."""
  lines = [data('A', payload('a', T0 + 1000)), mark('A', T0 + 2 * MINUTE),
           data('A', payload('b', T0 + 5000))]  # late for 60 s, in time for the rollup
  replay = write_replay(str(tmp_path / 'replay.jsonl'), lines)
  out = str(tmp_path / 'out')
  assert tidemark_run.main(['--source', f'replay:{replay}', '--output-dir', out,
                            '--allowed-lateness', '0', '--rollup', '300:300']) == 0
  return out


def test_a_rollup_run_has_its_reconciliation_drawn(tmp_path):
  out = _rollup_run(tmp_path)
  made = charts.charts(run_outputs.load(out))
  assert made[-1].title == 'Rollup reconciliation'
  outputs = run_outputs.load(out)
  assert outputs.reconciliation['rollups'][0]['events_only_in_rollup'] == 1


def test_a_run_that_did_not_complete_says_so_in_red(incident_run, tmp_path):
  copy = str(tmp_path / 'stopped')
  shutil.copytree(incident_run, copy)
  manifest = json.load(open(os.path.join(copy, 'run.json')))
  manifest.update(status='stopped', reconciled=False, detail='stopped mid-stream')
  json.dump(manifest, open(os.path.join(copy, 'run.json'), 'w'))
  report.write(copy)
  page = open(os.path.join(copy, report.REPORT_NAME), encoding='utf-8').read()
  assert 'class="status bad"' in page and 'run stopped, NOT reconciled: stopped mid-stream' in page
  samples = _samples(os.path.join(copy, METRICS_NAME))
  assert samples[('tidemark_run_complete', ())] == 0


def test_report_on_a_folder_that_is_not_a_run_is_refused_writing_nothing(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'pipeline', 'report', str(tmp_path)], cwd=REPO,
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert f'{tmp_path}: no run.json' in result.stderr
  assert os.listdir(tmp_path) == []


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_a_run_serves_its_live_metrics_while_it_runs(tmp_path):
  lines = [data('A', payload(f'e{i}', T0 + i * 1000)) for i in range(120)]
  lines += [mark('A', T0 + 5 * MINUTE)]
  replay = write_replay(str(tmp_path / 'replay.jsonl'), lines)
  port = _free_port()
  run = subprocess.Popen(
      [sys.executable, '-m', 'pipeline', 'run', '--source', f'replay:{replay}',
       '--replay-mode', 'stream', '--output-dir', str(tmp_path / 'out'),
       '--serve-metrics', f'127.0.0.1:{port}'],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  scraped = []
  while run.poll() is None:
    try:
      with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=5) as response:
        scraped.append(response.read().decode())
    except (OSError, urllib.error.HTTPError):
      pass
    time.sleep(0.2)
  out, err = run.communicate()
  assert run.returncode == 0, err[-2000:]
  assert f'metrics: http://127.0.0.1:{port}/metrics (live)' in out
  assert scraped, 'no scrape answered while the run ran'
  scrapes = [{s.name: s.value for family in text_string_to_metric_families(text)
              for s in family.samples} for text in scraped]
  complete = [int(samples['tidemark_run_complete']) for samples in scrapes]
  # running: never complete; once committed (before the launcher exits): complete
  assert complete[0] == 0 and complete == sorted(complete), complete
  assert all('tidemark_events_total' in samples and samples['tidemark_unaccounted_events'] == 0
             for samples in scrapes)


def test_a_taken_metrics_port_stops_the_run_before_it_starts(tmp_path):
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    result = subprocess.run(
        [sys.executable, '-m', 'pipeline', 'run', '--output-dir', str(tmp_path / 'out'),
         '--serve-metrics', f'127.0.0.1:{port}'],
        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert f'--serve-metrics: cannot listen on 127.0.0.1:{port}' in result.stderr
  assert not os.path.exists(tmp_path / 'out')


def _report(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'pipeline', 'report', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('name, content, says', [
    ('accounting.json', '', 'accounting.json: empty'),
    ('accounting.json', '{"received": 30', 'accounting.json: not JSON'),
    ('aggregates.jsonl', None, 'aggregates.jsonl:3: not a JSON object'),
])
def test_a_broken_output_file_is_named_not_a_traceback(incident_run, tmp_path, name, content,
                                                       says):
  copy = str(tmp_path / 'broken')
  shutil.copytree(incident_run, copy)
  path = os.path.join(copy, name)
  if content is None:  # cut short in its third line
    lines = open(path, encoding='utf-8').read().splitlines(True)
    content = ''.join(lines[:2]) + lines[2][:len(lines[2]) // 2]
  open(path, 'w', encoding='utf-8').write(content)
  before = sorted(os.listdir(copy))
  result = _report(copy)
  assert result.returncode == 2, result.stderr
  assert says in result.stderr and 'Traceback' not in result.stderr
  assert sorted(os.listdir(copy)) == before


def test_with_out_elsewhere_the_run_folder_is_only_read(incident_run, tmp_path):
  copy = str(tmp_path / 'run')
  shutil.copytree(incident_run, copy)
  stamps = {n: os.stat(os.path.join(copy, n)).st_mtime_ns for n in os.listdir(copy)}
  out = tmp_path / 'elsewhere' / 'page.html'
  out.parent.mkdir()
  result = _report(copy, '--out', str(out))
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(out.parent)) == [METRICS_NAME, 'page.html']
  assert {n: os.stat(os.path.join(copy, n)).st_mtime_ns for n in os.listdir(copy)} == stamps
  # a place that cannot be written: one clean line, exit 2
  result = _report(copy, '--out', str(tmp_path / 'missing' / 'page.html'))
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert 'cannot write the report' in result.stderr and 'missing' in result.stderr


def test_a_taken_serve_port_stops_the_report_before_it_writes(incident_run, tmp_path):
  copy = str(tmp_path / 'run')
  shutil.copytree(incident_run, copy)
  os.remove(os.path.join(copy, report.REPORT_NAME))
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    result = _report(copy, '--serve', f'127.0.0.1:{port}')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert f'--serve: cannot listen on 127.0.0.1:{port}' in result.stderr
  assert not os.path.exists(os.path.join(copy, report.REPORT_NAME))


def test_the_served_report_answers_head_like_get(incident_run):
  server = report.start_server(lambda: incident_run, f'127.0.0.1:{_free_port()}')
  try:
    port = server.server_address[1]
    for path in ('/metrics', '/'):
      get = urllib.request.urlopen(f'http://127.0.0.1:{port}{path}', timeout=10)
      head = urllib.request.urlopen(urllib.request.Request(
          f'http://127.0.0.1:{port}{path}', method='HEAD'), timeout=10)
      assert head.status == 200 and head.read() == b''
      assert head.headers['Content-Length'] == get.headers['Content-Length']
      assert head.headers['Content-Type'] == get.headers['Content-Type']
  finally:
    server.shutdown()
    server.server_close()


def test_the_report_of_an_interrupted_run_shows_what_it_wrote_and_says_so(tmp_path):
  from tools import traffic
  replay = str(tmp_path / 'large.jsonl')
  traffic.write_replay(replay, traffic.Profile(messages=30000, seed=4))
  out, log_path = tmp_path / 'out', tmp_path / 'run.log'
  with open(log_path, 'w', encoding='utf-8') as log:
    proc = subprocess.Popen(
        [sys.executable, '-m', 'pipeline', 'run', '--source', f'replay:{replay}',
         '--output-dir', str(out), '--replay-mode', 'stream'],
        cwd=REPO, stdout=log, stderr=log, text=True)
    try:
      deadline = time.monotonic() + 300
      while 'progress:' not in log_path.read_text(errors='replace'):
        assert proc.poll() is None and time.monotonic() < deadline, (
            log_path.read_text(errors='replace')[-3000:])
        time.sleep(0.2)
      time.sleep(1)  # some outputs written
      proc.send_signal(2)
      assert proc.wait(120) == 130
    finally:
      if proc.poll() is None:
        proc.kill()
  [staging] = [os.path.join(out, n) for n in os.listdir(out) if n.startswith('.tidemark-run-')]
  outputs = run_outputs.load(staging)
  letters = read_jsonl(os.path.join(staging, 'dead_letter.jsonl'))
  assert outputs.status == 'incomplete' and not outputs.finished
  assert outputs.accounting['invalid'] + outputs.accounting['too_late'] == len(letters)
  assert outputs.accounting['received'] == sum(
      outputs.accounting[k] for k in CATEGORIES if k != 'received') < 30000
  assert outputs.replay_received is None  # the whole file is not what it received
  page = report.render_html(outputs, charts.charts(outputs))
  assert 'What the run wrote before it stopped' in page and 'did not finish' in page
  assert 'class="status bad"' in page


# --- what an on-call engineer reads ------------------------------------------------


@pytest.fixture
def figures(monkeypatch):
  """The matplotlib figures behind each chart, by title, to check what is drawn."""
  made = []
  monkeypatch.setattr(charts, '_svg', lambda fig: made.append(fig) or '<svg/>')

  def draw(outputs) -> dict:
    made.clear()
    titles = [c.title for c in charts.charts(outputs)]
    return dict(zip(titles, made))
  yield draw
  from matplotlib import pyplot
  pyplot.close('all')


def _bars(ax) -> list:
  from matplotlib.patches import Rectangle
  return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_height() > 0]


def _tops(ax, axis: str) -> list:
  """How far each drawn bar, or filled outline, reaches along the counting axis."""
  from matplotlib.patches import Polygon
  column = 0 if axis == 'x' else 1
  return [(p.get_x() + p.get_width()) if axis == 'x' else (p.get_y() + p.get_height())
          for p in _bars(ax)] + [
              float(p.get_xy()[:, column].max()) for p in ax.patches if isinstance(p, Polygon)]


def test_the_report_states_the_lagging_sources_lag(incident_run):
  lag = {dict(labels)['source']: value for (name, labels), value in _samples(
      os.path.join(incident_run, METRICS_NAME)).items()
      if name == 'tidemark_watermark_lag_seconds'}
  assert lag == run_outputs.watermark_lags(run_outputs.load(incident_run))
  assert lag['C'] == 88 and lag['A'] == 0
  page = open(os.path.join(incident_run, report.REPORT_NAME), encoding='utf-8').read()
  assert "C: its watermark ended 88 s behind source A&#x27;s" in page
  caption = next(c.caption for c in charts.charts(run_outputs.load(incident_run))
                 if c.title == 'Watermark per source')
  assert caption.endswith('source C was 88 s behind source A, more than the allowed '
                          'lateness (30 s).')


def test_the_report_lists_every_kind_of_dead_letter_with_a_count_and_an_example(
    incident_run):
  outputs = run_outputs.load(incident_run)
  kinds = run_outputs.dead_letter_kinds(outputs)
  dead = outputs.dead_letters
  invalid_details = {d['detail'] for d in dead if d['reason'] == 'invalid'}
  assert len(invalid_details) == 20
  assert {k.what for k in kinds if k.reason == 'invalid'} == invalid_details
  # too-late letters differ by their event time only: one kind per closed window
  assert [k.letters for k in kinds if k.reason == 'too_late'] == [21, 15, 1]
  assert sum(k.letters for k in kinds) == len(dead) == 87 + 37
  assert [k.letters for k in kinds] == sorted((k.letters for k in kinds), reverse=True)
  for kind in kinds:
    if kind.reason == 'invalid':
      assert kind.example == run_outputs.dead_letter_payload(
          next(d for d in dead if d['detail'] == kind.what)).decode('utf-8', 'backslashreplace')
  page = open(os.path.join(incident_run, report.REPORT_NAME), encoding='utf-8').read()
  assert 'Dead letters by reason (23 kinds)' in page
  assert page.count('<tr><td class="what">') == 23
  assert '\\xed\\xa0\\x80' in page  # a lone surrogate's bytes, readable
  assert 'not a JSON object: Input data was truncated' in page


def test_every_count_axis_has_whole_ticks_and_every_bar_fits(incident_run, figures):
  drawn = figures(run_outputs.load(incident_run))
  counted = {'Accounting': 'x', 'Dead letters over event time': 'y', 'Lateness': 'y',
             'Window completeness': 'y'}
  for title, axis in counted.items():
    for ax in drawn[title].axes:
      low, high = ax.get_xlim() if axis == 'x' else ax.get_ylim()
      ticks = [t for t in (ax.get_xticks() if axis == 'x' else ax.get_yticks())
               if low <= t <= high]
      assert ticks and all(float(t).is_integer() for t in ticks), (title, ticks)
      tops = _tops(ax, axis)
      assert tops and max(tops) < high, (title, max(tops), high)


def test_a_chart_names_only_what_it_draws(incident_run, tmp_path, figures):
  outputs = run_outputs.load(incident_run)
  [dead] = [c for c in charts.charts(outputs) if c.title == 'Dead letters over event time']
  assert outputs.duplicates is None  # the bulk replay does not record them
  assert dead.caption.startswith('Too-late messages by the window')
  assert 'did not record its duplicates one by one: they are not drawn' in dead.caption
  labels = figures(outputs)['Dead letters over event time'].axes[0].get_legend_handles_labels()
  assert labels[1] == ['too_late']


def test_the_rollup_chart_draws_windows_and_events_on_their_own_labelled_axes(
    tmp_path, figures):
  out = _rollup_run(tmp_path)
  fig = figures(run_outputs.load(out))['Rollup reconciliation']
  windows, events = fig.axes[:2]
  assert (windows.get_xlabel(), events.get_xlabel()) == ('windows', 'events')
  assert windows.get_legend_handles_labels()[1] == ['windows that differ', 'windows unexplained']
  assert events.get_legend_handles_labels()[1] == [
      'events only the rollup accepted', 'events only the primary accepted']
  assert [p.get_width() for p in events.patches] == [1, 0]  # only-rollup, only-primary
  for ax in (windows, events):
    assert all(float(t).is_integer() for t in ax.get_xticks())


def _panes_over(outputs, windows: int, timings) -> list:
  """Panes over ``windows`` windows from the run's first: the i-th window has
  i % 5 + 1 panes, the n-th of them of ``timings[n % len(timings)]``."""
  size_ms = outputs.window_size_s * 1000
  start = outputs.panes[0]['window_start'] // size_ms * size_ms
  return [dict(outputs.panes[0], window_start=start + i * size_ms,
               timing=timings[n % len(timings)])
          for i in range(windows) for n in range(i % 5 + 1)]


def test_the_completeness_chart_bins_a_long_run_in_whole_windows_and_keeps_every_pane(
    incident_run, figures):
  outputs = run_outputs.load(incident_run)
  timings = ('EARLY', 'ON_TIME', 'LATE')
  panes = _panes_over(outputs, 1000, timings)  # more windows than bins
  [ax] = figures(outputs._replace(panes=panes))['Window completeness'].axes
  assert len(ax.patches) == len(timings)  # one filled outline per timing, not one bar per bin
  assert ax.get_ylabel() == 'panes per 5 windows (all keys)'  # 1,000 windows in 200 bins
  # the stack's top is every bin's panes: 5 windows of 1..5 panes each, 15;
  # EARLY, the bottom, 7 of them (1 + 1 + 1 + 2 + 2), ON_TIME 5 (0 + 1 + 1 + 1 + 2)
  tops = {label: p.get_xy()[:, 1].max()
          for p, label in zip(*ax.get_legend_handles_labels())}
  assert tops == {'EARLY': 7, 'ON_TIME': 7 + 5, 'LATE': 15}


def test_the_completeness_chart_of_one_timing_has_one_bin_per_window(incident_run, figures):
  outputs = run_outputs.load(incident_run)
  [ax] = figures(outputs._replace(panes=_panes_over(outputs, 10, ('ON_TIME',))))[
      'Window completeness'].axes
  [outline] = ax.patches
  assert ax.get_ylabel() == 'panes per window (all keys)'
  assert outline.get_xy()[:, 1].max() == 5 and ax.get_ylim()[1] > 5
