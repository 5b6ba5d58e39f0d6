"""Monitoring against the real things: promtool, Chromium, Prometheus, Flink.

* the alerting rules pass ``promtool check rules`` and their unit tests
  (tests/monitoring/alerts_test.yml, evaluated by Prometheus' own engine);
* a run's report page renders every chart in headless Chromium;
* a real Prometheus (scripts/monitoring.sh) scrapes a Kafka → Flink job
  through Flink's Prometheus reporter, and its ``tidemark_events_total``
  equals the job's accounting;
* the same Prometheus scrapes two finished replays served by
  ``python -m pipeline report --serve``: the incident's (source C lags past the
  allowed lateness) and a steady one; the lagging-source alert fires for the
  first, for source C only, and nothing fires for the second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from integration.conftest import REPO
from integration.test_flink_faults import LATENESS_S, Customer, flink_cluster  # noqa: F401 (fixture)
from tests.conftest import data, mark, payload, write_replay

pytestmark = pytest.mark.integration

SCRIPT = os.path.join(REPO, 'scripts', 'monitoring.sh')
PROMETHEUS = 'http://127.0.0.1:' + os.environ.get('PROMETHEUS_PORT', '19090')
RULES = os.path.join(REPO, 'templates', 'monitoring', 'alerts.yml')
SERVED = {'lagging': 19465, 'steady': 19466}
FLINK_REPORTERS = [f'127.0.0.1:{p}' for p in range(19249, 19253)]
T0 = 1705543200000  # 2024-01-18T02:00:00Z


def _script(*args: str) -> str:
  result = subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, f'{SCRIPT} {args}:\n{result.stdout}\n{result.stderr}'
  return result.stdout


@pytest.fixture(scope='module')
def tools():
  _script('install')


def _run(out: str, *args: str) -> None:
  result = subprocess.run(
      [sys.executable, '-m', 'pipeline', 'run', '--output-dir', out, *args], cwd=REPO,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two finished replays: the incident's, and one whose sources keep step."""
  base = tmp_path_factory.mktemp('runs')
  lagging = str(base / 'lagging')
  _run(lagging)  # the bundled incident replay
  lines = []
  for minute in range(10):
    for source in ('A', 'B'):
      lines.append(data(source, payload(f'{source}{minute}', T0 + minute * 60_000 + 5_000)))
    for source in ('A', 'B'):
      lines.append(mark(source, T0 + (minute + 1) * 60_000))
  steady = str(base / 'steady')
  _run(steady, '--source', 'replay:' + write_replay(str(base / 'steady.jsonl'), lines))
  return {'lagging': lagging, 'steady': steady}


@pytest.fixture(scope='module')
def prometheus(tools, runs, tmp_path_factory):
  """A real Prometheus with Tidemark's rules, scraping the served runs and
  the Flink cluster's reporters every second."""
  servers = [subprocess.Popen(
      [sys.executable, '-m', 'pipeline', 'report', runs[name], '--serve', f'127.0.0.1:{port}'],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      for name, port in SERVED.items()]
  config = tmp_path_factory.mktemp('prometheus') / 'prometheus.yml'
  scrape = [{'job_name': name, 'static_configs': [{'targets': [f'127.0.0.1:{port}']}]}
            for name, port in SERVED.items()]
  scrape.append({'job_name': 'flink', 'static_configs': [{'targets': FLINK_REPORTERS}]})
  config.write_text(json.dumps({  # JSON is YAML
      'global': {'scrape_interval': '1s', 'evaluation_interval': '1s'},
      'rule_files': [RULES], 'scrape_configs': scrape}))
  try:
    _script('start', str(config))
    yield PROMETHEUS
  finally:
    _script('stop')
    for server in servers:
      server.terminate()
      server.wait(10)


def _api(path: str, **params) -> dict:
  url = f'{PROMETHEUS}/api/v1/{path}' + ('?' + urllib.parse.urlencode(params) if params else '')
  with urllib.request.urlopen(url, timeout=10) as response:
    body = json.load(response)
  assert body['status'] == 'success', body
  return body['data']


def _alerts() -> list:
  return _api('alerts')['alerts']


def test_the_alerting_rules_check_and_pass_their_unit_tests(tools):
  checked = subprocess.run(['promtool', 'check', 'rules', RULES], capture_output=True,
                           text=True, timeout=60)
  assert checked.returncode == 0 and 'SUCCESS: 12 rules found' in checked.stdout, (
      checked.stdout + checked.stderr)
  tested = subprocess.run(
      ['promtool', 'test', 'rules', 'alerts_test.yml'], capture_output=True, text=True,
      timeout=60, cwd=os.path.join(REPO, 'tests', 'monitoring'))
  assert tested.returncode == 0 and 'SUCCESS' in tested.stdout, tested.stdout + tested.stderr


def test_the_report_renders_every_chart_in_chromium(tools, runs):
  page = os.path.join(runs['lagging'], 'report.html')
  result = subprocess.run(
      ['chromium', '--headless', '--no-sandbox', '--disable-gpu', '--virtual-time-budget=10000',
       '--dump-dom', 'file://' + page], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  # set by the page's script once the browser has decoded each chart image
  assert '<html lang="en" data-charts="5" data-charts-rendered="5">' in result.stdout
  # what on-call reads first: the lagging source and every kind of dead letter
  assert "C: its watermark ended 88 s behind source A's" in result.stdout
  assert 'Dead letters by reason (23 kinds)' in result.stdout
  shot = os.path.join(os.path.dirname(page), 'report.png')
  subprocess.run(['chromium', '--headless', '--no-sandbox', '--disable-gpu',
                  '--hide-scrollbars', '--window-size=1100,2400', f'--screenshot={shot}',
                  'file://' + page], capture_output=True, timeout=120, check=True)
  assert os.path.getsize(shot) > 50_000  # a page with charts, not a blank one


def test_prometheus_scrapes_a_flink_job_and_its_figures_equal_the_accounting(
    prometheus, flink_cluster, kafka_broker, postgres_dsn, tmp_path):  # noqa: F811
  customer = Customer(tmp_path, kafka_broker, postgres_dsn)
  customer.deploy()
  flink_job = flink_cluster.wait_for_job(customer.job_name, 120)
  try:
    customer.publish(20)
    expected = customer.expected()
    customer.settle(expected)
    name = customer.job_name.replace('-', '_')  # as Flink's reporter writes it

    def scraped() -> dict:
      series = _api('query', query=f'tidemark_events_total{{runner="flink",customer="{name}"}}')
      return {s['metric']['outcome']: int(float(s['value'][1])) for s in series['result']}

    deadline = time.monotonic() + 60
    accounting = customer.accounting()
    while time.monotonic() < deadline:
      figures = scraped()
      if {k: figures.get(k, 0) for k in accounting} == accounting:
        break
      time.sleep(1)
    assert {k: figures.get(k, 0) for k in accounting} == accounting == expected.accounting
    # once nothing is in flight, received = the outcomes, in Prometheus' own terms
    # (the recorded tidemark_unaccounted_events compares with five minutes ago)
    job = f'runner="flink",customer="{name}"'
    balance = _api('query', query=f'sum(tidemark_events_total{{{job},outcome="received"}}) - '
                                  f'sum(tidemark_events_total{{{job},outcome!="received"}})')
    assert [float(s['value'][1]) for s in balance['result']] == [0.0]
    # the source's watermark, from Flink's own gauge on the Kafka source operator:
    # the traffic is stamped as it is sent, so it follows the wall clock
    source = customer.topic.replace('.', '_').replace('-', '_')
    [mark] = _api('query', query=f'tidemark_source_watermark_seconds{{{job}}}')['result']
    assert mark['metric']['source'] == source
    assert time.time() - 120 < float(mark['value'][1]) <= time.time() + 5
    lag = _api('query', query=f'tidemark_watermark_lag_seconds{{{job}}}')['result']
    assert [(s['metric']['source'], float(s['value'][1])) for s in lag] == [(source, 0.0)]
    lateness = _api('query', query=f'tidemark_allowed_lateness_seconds{{{job}}}')['result']
    assert [float(s['value'][1]) for s in lateness] == [LATENESS_S]
  finally:
    flink_cluster.cancel(flink_job.jid)


def test_the_lagging_source_alert_fires_on_the_lagging_replay_only(prometheus):
  # the rule holds for 2 minutes before it fires
  deadline = time.monotonic() + 200
  while time.monotonic() < deadline:
    firing = [a for a in _alerts() if a['state'] == 'firing']
    if any(a['labels']['alertname'] == 'TidemarkSourceWatermarkLagging' for a in firing):
      break
    time.sleep(2)
  alerts = _alerts()
  lagging = [a for a in alerts if a['labels']['alertname'] == 'TidemarkSourceWatermarkLagging']
  assert [(a['labels']['source'], a['state']) for a in lagging] == [('C', 'firing')]
  # nothing about either replay's accounting, and nothing at all for the steady one
  assert not [a for a in alerts if a['labels']['alertname'] in (
      'TidemarkUnaccountedEvents', 'TidemarkRunNotComplete')]
  lag = _api('query', query='tidemark_watermark_lag_seconds')['result']
  by_job = {(s['metric']['job'], s['metric']['source']): float(s['value'][1]) for s in lag}
  assert by_job[('steady', 'A')] == by_job[('steady', 'B')] == 0
  assert by_job[('lagging', 'C')] > 30


def test_every_dashboard_query_runs_on_the_real_prometheus(prometheus):
  with open(os.path.join(REPO, 'templates', 'monitoring', 'grafana-dashboard.json')) as f:
    dashboard = json.load(f)
  queries = [t['expr'] for panel in dashboard['panels'] for t in panel['targets']]
  assert len(queries) >= 10
  for query in queries:
    result = _api('query', query=query)['result']  # a bad query fails here
    if 'flink_' not in query:  # the served runs carry every tidemark_* series
      assert result, f'no data for {query}'
