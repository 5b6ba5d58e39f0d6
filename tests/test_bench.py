"""The benchmarks' own logic: verdicts, summaries, what they read. No timing is
asserted: benchmarks print figures, tests check how they are computed."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from tools import bench
from tools.bench import stream as bench_stream
from tools.bench.stream import (
    latency_summary, max_sustained, parse_rates, percentile, step_verdict)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _samples(rate, seconds, read_share, routed_share, lag=0, noise=0):
  """Observations every second: the pipeline reads and routes shares of the rate."""
  return [(float(t), int(rate * t), max(0, int(rate * read_share * t) - lag),
           max(0, int(rate * routed_share * t) - lag - (noise if t % 2 else 0)))
          for t in range(seconds + 1)]


def test_a_step_whose_backlog_stays_put_is_sustained():
  step = step_verdict(1000, _samples(1000, 60, 1.0, 1.0, lag=1500), slack_s=5)
  assert step['sustained'] is True
  assert step['published'] == 60000 and step['publish_rate'] == 1000.0
  assert step['backlog_end'] == 1500 and step['unrouted_end'] == 1500
  assert abs(step['backlog_growth']) < 1500 and step['samples'] == 61


def test_a_growing_backlog_beyond_the_slack_is_not_sustained():
  # 80 % of the rate read: the backlog grows by 12 s of traffic over 60 s.
  step = step_verdict(1000, _samples(1000, 60, 0.8, 0.8), slack_s=5)
  assert step['sustained'] is False and step['backlog_growth'] == 12000
  assert step['receive_rate'] == 800.0
  # 95 %: 3 s of traffic, within the slack
  assert step_verdict(1000, _samples(1000, 60, 0.95, 0.95), 5)['sustained']


def test_one_noisy_snapshot_does_not_decide_a_step():
  # every other observation trails by 3,000 routed events (accounting rewritten
  # every 2 s), the last one among them: the trend is flat, the snapshots are not
  samples = _samples(500, 61, 1.0, 1.0, noise=3000)
  assert samples[-1][1] - samples[-1][3] == 3000 and samples[0][1] - samples[0][3] == 0
  step = step_verdict(500, samples, slack_s=5)
  assert step['sustained'] is True and abs(step['unrouted_growth']) < 2500


def test_reading_is_not_enough_events_must_also_be_routed():
  step = step_verdict(500, _samples(500, 60, 1.0, 0.3), slack_s=5)
  assert step['backlog_growth'] == 0 and step['sustained'] is False


def test_a_step_verdict_refuses_nonsense():
  with pytest.raises(ValueError):
    step_verdict(0, _samples(10, 5, 1, 1), 5)
  with pytest.raises(ValueError):
    step_verdict(10, _samples(10, 5, 1, 1), -1)
  with pytest.raises(ValueError):
    step_verdict(10, _samples(10, 5, 1, 1)[:1], 5)


def test_slope_is_least_squares():
  assert bench_stream.slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2)
  assert bench_stream.slope([(0, 7)]) == 0 and bench_stream.slope([(1, 2), (1, 5)]) == 0


def test_the_highest_sustained_rate_stops_at_the_first_failure():
  steps = [{'rate': r, 'sustained': s, 'reached': True}
           for r, s in ((250, True), (500, True), (1000, False), (2000, True))]
  assert max_sustained(steps) == 500
  assert max_sustained([{'rate': 250, 'sustained': False, 'reached': True}]) is None
  assert max_sustained([]) is None


def test_a_rate_the_publisher_did_not_reach_is_not_sustained():
  # The publisher sent 60 % of the 2,500/s asked; the pipeline kept up with that.
  short = step_verdict(2500, _samples(1500, 60, 1.0, 1.0), slack_s=5)
  assert short['sustained'] is True and short['reached'] is False
  assert step_verdict(1000, _samples(1000, 60, 1.0, 1.0), 5)['reached'] is True
  full = step_verdict(1000, _samples(1000, 60, 1.0, 1.0), 5)
  assert max_sustained([full, short]) == 1000 and max_sustained([short, full]) is None


def test_percentiles_are_nearest_rank():
  values = [float(v) for v in range(1, 21)]  # 1..20
  assert percentile(values, 50) == 10 and percentile(values, 95) == 19
  assert percentile(values, 100) == 20 and percentile([3.0], 95) == 3.0
  assert percentile([], 50) is None
  assert latency_summary([(60000, 2.04), (60000, 1.0), (120000, 9.96)]) == {
      'windows': 3, 'window_ends': 2, 'p50_s': 2.0, 'p95_s': 10.0, 'max_s': 10.0}
  assert latency_summary([]) == {
      'windows': 0, 'window_ends': 0, 'p50_s': None, 'p95_s': None, 'max_s': None}


def test_rates_must_be_positive_and_increasing():
  assert parse_rates('250,500,1000') == [250.0, 500.0, 1000.0]
  for bad in ('500,250', '0,10', 'fast', ''):
    with pytest.raises(argparse.ArgumentTypeError):
      parse_rates(bad)


def test_the_watcher_reads_the_accounting_and_dates_on_time_panes(tmp_path):
  accounting, aggregates = tmp_path / 'accounting.json', tmp_path / 'aggregates.jsonl'
  watcher = bench_stream.Watcher(str(tmp_path))
  watcher.poll()  # nothing written yet
  assert watcher.counts() == (0, 0)
  accounting.write_text(json.dumps(
      {'received': 10, 'invalid': 1, 'too_late': 2, 'duplicate': 3, 'aggregated': 3}))

  def pane(start, timing, index):
    return json.dumps({'customer_id': 'c', 'key': 'k', 'window_start': start,
                       'window_end': start + 60000, 'timing': timing, 'pane_index': index})
  # a line cut in the middle is read once it is whole
  first = pane(0, 'EARLY', 0) + '\n' + pane(0, 'ON_TIME', 1) + '\n'
  aggregates.write_text(first + pane(60000, 'ON_TIME', 0)[:20])
  watcher.poll()
  assert watcher.counts() == (10, 9)
  assert list(watcher.on_time_seen) == [('c', 'k', 0)]
  with open(aggregates, 'a') as f:
    f.write(pane(60000, 'ON_TIME', 0)[20:] + '\n' + pane(0, 'LATE', 2) + '\n')
  watcher.poll()
  assert set(watcher.on_time_seen) == {('c', 'k', 0), ('c', 'k', 60000)}
  ends = sorted(end for end, _ in watcher.on_time_seen.values())
  assert ends == [60000, 120000]
  [(end, seconds)] = watcher.latencies(0, 100000)  # windows that ended in [0, 100 s)
  assert end == 60000 and seconds > 0

  # A run in progress writes into its staging folder: the watcher follows it.
  from pipeline.runfolder.files import MANIFEST, RUNNING, STAGING_PREFIX
  staging = tmp_path / (STAGING_PREFIX + 'abc')
  staging.mkdir()
  (staging / MANIFEST).write_text(json.dumps({'status': RUNNING, 'started_at': 'now'}))
  (staging / 'accounting.json').write_text(json.dumps(
      {'received': 20, 'invalid': 0, 'too_late': 0, 'duplicate': 0, 'aggregated': 20}))
  (staging / 'aggregates.jsonl').write_text(pane(120000, 'ON_TIME', 0) + '\n')
  watcher.poll()
  assert watcher.counts() == (20, 20)
  assert ('c', 'k', 120000) in watcher.on_time_seen and ('c', 'k', 0) in watcher.on_time_seen


def test_cpu_time_and_descendants_of_a_process_tree_are_read_from_proc():
  child = subprocess.Popen(
      [sys.executable, '-c', 'import time; sum(range(10**7)); print("up", flush=True); '
       'time.sleep(60)'], stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline().strip() == 'up'  # after some CPU work
    assert child.pid in bench_stream.descendants(os.getpid())
    assert bench_stream.tree_cpu_seconds(os.getpid(), with_descendants=False) > 0
    assert bench_stream.tree_cpu_seconds(child.pid) > 0
  finally:
    child.kill()
    child.wait()


def test_steady_spread_ignores_the_warm_up():
  assert bench.steady_spread([100, 200, 100, 110, 105], 2) == pytest.approx(0.1 / 1.05)
  assert bench.steady_spread([100], 3) is None


def test_the_stream_bench_names_what_to_start_when_services_are_down(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'tools', 'bench', 'stream', '--bootstrap-servers',
       '127.0.0.1:9', '--job_endpoint=localhost:9', '--runner=PortableRunner',
       '--kafka-expansion-service=localhost:9', '--workdir', str(tmp_path)],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert 'scripts/kafka.sh start' in result.stderr
  assert 'scripts/flink.sh start' in result.stderr
  assert result.stdout == ''


def test_connections_to_a_port_are_counted_per_process():
  import socket
  server = socket.socket()
  server.bind(('127.0.0.1', 0))
  server.listen(1)
  port = server.getsockname()[1]
  assert bench_stream.tcp_connections(os.getpid(), port) == 0
  client = socket.create_connection(('127.0.0.1', port))
  accepted, _ = server.accept()
  try:
    assert bench_stream.tcp_connections(os.getpid(), port) == 1
  finally:
    for s in (client, accepted, server):
      s.close()


def test_the_runner_is_found_in_either_spelling():
  assert bench._runner(['--runner', 'PortableRunner']) == 'PortableRunner'
  assert bench._runner(['--job_endpoint=x:1', '--runner=PortableRunner']) == 'PortableRunner'
  assert bench._runner(['--streaming']) == 'DirectRunner'


def test_the_decode_limit_counts_the_cores_the_run_works_on(monkeypatch):
  monkeypatch.setattr(os, 'cpu_count', lambda: 2)
  assert bench._cores([], 300_000) == 2  # a large bulk replay: a worker process per core
  assert bench._cores(['--direct_num_workers', '1'], 300_000) == 1
  flink = ['--runner', 'FlinkRunner', '--flink_master', '127.0.0.1:18081']
  assert bench._cores([*flink, '--parallelism', '1'], 300_000) == 1
  assert bench._cores([*flink, '--parallelism', '2'], 300_000) == 2
  assert bench._cores(flink, 300_000) == 2  # not given: at most every core
  assert bench._cores([*flink, '--parallelism=8'], 300_000) == 2  # no more than the machine has


def test_steady_slope_is_the_growth_per_sample_after_the_warm_up():
  assert bench.steady_slope([500, 100, 102, 104, 106], 1) == pytest.approx(2.0)
  assert bench.steady_slope([100, 300, 100, None, 100], 0) == pytest.approx(-150 / 8.75)
  assert bench.steady_slope([7, 7, 7], 0) == 0
  assert bench.steady_slope([1, 2], 1) is None
  assert bench.steady_spread([100, None, 110], 0) == pytest.approx(10 / 105)


def test_the_live_heap_of_a_running_jvm_is_read_with_jcmd(tmp_path):
  source = tmp_path / 'Idle.java'
  source.write_text('public class Idle { public static void main(String[] a) throws Exception {'
                    ' byte[] kept = new byte[8 << 20]; System.out.println("up");'
                    ' Thread.sleep(120000); System.out.println(kept.length); } }\n')
  jvm = subprocess.Popen(['java', '-Xmx256m', str(source)], stdout=subprocess.PIPE, text=True)
  try:
    assert jvm.stdout.readline().strip() == 'up'
    live = bench.jvm_live_heap_mib(jvm.pid)
    assert live is not None and 8 < live < 256  # the 8 MiB array is live
  finally:
    jvm.kill()
    jvm.wait()
  assert bench.jvm_live_heap_mib(os.getpid()) is None  # not a JVM
