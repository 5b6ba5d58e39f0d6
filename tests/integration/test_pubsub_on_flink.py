"""Pub/Sub subscriptions (the emulator) → ``python -m pipeline run`` on Flink →
the contract, through Tidemark's Java read (Beam's PubsubIO, java/src).

Phase 1 is a backlog of historical traffic (the simulator's incident-like mix:
boundary events, redeliveries, garbage) in three subscriptions, one of them
lagging, plus what the simulator does not make: a valid event whose ``ts``
attribute is garbage, one without attributes, a redelivery under a new message
id in another window. The job drains it, the watermark follows the ``ts``
attributes and, once the subscriptions are idle for a minute, the wall clock,
so every window closes. Phase 2 then publishes stragglers: two far beyond the
allowed lateness (too late: dead letters) and one within it (a LATE pane).
The expected outcome is the contract read independently: no phase-1 event can
be too late (the lateness exceeds the traffic's disorder), every phase-2
straggler's fate is fixed by its age.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import as_sent, letters, live_outcome, read_jsonl
from integration.conftest import flink_args
from tools import reference
from transforms.rules.model import final_panes_of, payload_bytes

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT = 'tidemark-it'
SOURCES = ('A', 'B', 'C')
WINDOW_S, LATENESS_S = 10, 600
MESSAGES = 3000
#: How long after the backlog the watermark is at the wall clock and the gate
#: knows it: the Java read's readers follow the wall clock after a minute without
#: messages (RecentEventTimeSource.IDLE), and the gate learns the jump in rounds of
#: closing timers, one per watermark advance.
WALL_CLOCK_WATERMARK_S = 60 + 30


def _subscriptions(run: str) -> dict:
  from google.cloud import pubsub_v1
  publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
  paths = {}
  for source in SOURCES:
    topic = publisher.create_topic(name=publisher.topic_path(PROJECT, f'{run}{source}')).name
    paths[source] = subscriber.create_subscription(request={
        'name': subscriber.subscription_path(PROJECT, f'{run}sub-{source}'),
        'topic': topic, 'ack_deadline_seconds': 60}).name
  return paths


def _require_rest(emulator: str) -> None:
  """Java PubsubIO speaks the REST API, which Google's emulator serves beside
  gRPC; the Go fallback (scripts/pubsub-emulator.sh on a machine without the
  Debian package) serves gRPC only."""
  import urllib.error
  import urllib.request
  try:
    with urllib.request.urlopen(f'http://{emulator}/v1/projects/{PROJECT}/topics', timeout=10):
      return
  except (urllib.error.URLError, OSError) as e:
    raise AssertionError(
        f'the Pub/Sub emulator at {emulator} has no REST API ({e}): Java PubsubIO needs '
        'Google\'s emulator (google-cloud-cli-pubsub-emulator)') from None


def _event(event_id: str, value: float, event_time: int, customer: str = 'finserve') -> str:
  return json.dumps({'event_id': event_id, 'customer_id': customer, 'key': 'k',
                     'value': value, 'event_time': event_time})


def _tail(log) -> str:
  log.seek(0)
  return log.read()[-3000:]


def _wait(what, predicate, timeout_s, run, log, state=lambda: ''):
  """Waits for ``predicate``; a failure shows ``state()`` (what the run wrote) and the log."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if run.poll() is not None:
      raise AssertionError(f'the run ended while waiting for {what}: {_tail(log)}')
    if predicate():
      return
    time.sleep(1)
  raise AssertionError(f'timed out waiting for {what}: {state()}\n{_tail(log)}')


def test_a_pubsub_backlog_and_its_stragglers_on_flink_equal_the_contract(
    emulator, flink_job_server, tmp_path):
  from google.cloud import pubsub_v1
  _require_rest(emulator)
  run_id = f'fl-{uuid.uuid4().hex[:8]}-'
  subscriptions = _subscriptions(run_id)
  env = {**os.environ, 'PYTHONPATH': REPO, 'PUBSUB_EMULATOR_HOST': emulator}
  record = tmp_path / 'sent.jsonl'
  simulated = subprocess.run(
      [sys.executable, '-m', 'tools', 'simulate', '--to', 'pubsub', '--project', PROJECT,
       '--topic-prefix', run_id, '--messages', str(MESSAGES), '--rate', '0',
       '--event-rate', '50', '--seed', '5', '--window-size', str(WINDOW_S),
       '--allowed-lateness', str(LATENESS_S), '--sources', 'A:0.4:1,B:0.35:1,C:0.25:20',
       '--straggler-share', '0', '--record', str(record)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert simulated.returncode == 0, simulated.stderr
  sent = [(r['source'], payload_bytes(r['data']).decode('utf-8', 'surrogateescape'))
          for r in read_jsonl(str(record))]
  first = json.loads(next(d for _, d in sent if reference.validate(d)))
  t0 = first['event_time']
  publisher = pubsub_v1.PublisherClient()

  def publish(source, body, **attributes):
    publisher.publish(publisher.topic_path(PROJECT, run_id + source), body.encode(),
                      **attributes).result(timeout=30)
    sent.append((source, body))

  publish('B', _event('ts-garbage', 1001.0, t0 + 1), ts='garbage')
  publish('C', _event('no-attributes', 1002.0, t0 + 2))
  publish('A', _event(first['event_id'], 1003.0, t0 + 5 * WINDOW_S * 1000), ts=str(t0))

  out = tmp_path / 'out'
  source = 'pubsub:' + ','.join(f'{s}={p}' for s, p in sorted(subscriptions.items()))
  log = open(tmp_path / 'run.log', 'w+', encoding='utf-8')  # a pipe would fill and stall it
  run = subprocess.Popen(
      [sys.executable, '-m', 'pipeline', 'run', *flink_args(flink_job_server), '--streaming',
       f'--source={source}', f'--window-size={WINDOW_S}', f'--allowed-lateness={LATENESS_S}',
       '--checkpointing_interval=2000', '--parallelism=2', f'--output-dir={out}'],
      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
  def folder():
    """While it runs, the run's staging folder (run.json names it); then OUTPUT_DIR."""
    try:
      manifest = json.loads((out / 'run.json').read_text(encoding='utf-8'))
    except (OSError, ValueError):
      return out
    return out / manifest['staging'] if manifest.get('status') == 'running' else out

  def accounting():
    try:
      return json.loads((folder() / 'accounting.json').read_text(encoding='utf-8'))
    except (OSError, ValueError):
      return {}

  def finals():
    return final_panes_of(read_jsonl(str(folder() / 'aggregates.jsonl')))

  try:
    phase1 = len(sent)
    # The backlog drained and, once the subscriptions idle, every window closed.
    _wait('phase 1 counted and closed', lambda: (
        accounting().get('received') == phase1 and
        sum(p['count'] for p in finals().values()) == accounting().get('aggregated') and
        all(p['timing'] != 'EARLY' for p in finals().values())), 360, run, log,
        lambda: f'accounting {accounting()} of {phase1} sent')
    # The backlog's windows close as soon as the watermark passes them (2 s behind
    # what was read); the stragglers below are judged against the wall clock, which
    # the watermark follows once the readers idle. A straggler read before would be
    # judged, rightly, against the backlog's day (admitted, not too late).
    time.sleep(WALL_CLOCK_WATERMARK_S)
    now = int(time.time() * 1000)
    publish('A', _event('too-late-1', 2001.0, t0 + 3))
    publish('B', _event('too-late-2', 2002.0, now - (LATENESS_S + 5 * WINDOW_S) * 1000),
            ts=str(now - (LATENESS_S + 5 * WINDOW_S) * 1000))
    late = now - 3 * WINDOW_S * 1000
    publish('C', _event('late-within', 2003.0, late), ts=str(late))
    expected_accounting, expected_windows, _, _ = live_outcome(
        sent, WINDOW_S, {'too-late-1', 'too-late-2'})
    _wait('phase 2 counted', lambda: (
        accounting() == expected_accounting and
        sum(p['count'] for p in finals().values()) == expected_accounting['aggregated']),
        120, run, log, lambda: f'accounting {accounting()}, expected {expected_accounting}')
  finally:
    run.send_signal(signal.SIGINT)
    run.wait(timeout=180)
  assert json.loads((out / 'run.json').read_text(encoding='utf-8'))['status'] == 'stopped'
  assert accounting() == expected_accounting, _tail(log)
  got = finals()
  assert {w: (p['count'], p['sum'], p['min'], p['max']) for w, p in got.items()} == {
      w: (c, pytest.approx(s), lo, hi) for w, (c, s, lo, hi) in expected_windows.items()}
  late_window = next(p for p in got.values() if p['min'] == 2003.0)
  assert late_window['timing'] == 'LATE'
  dead = read_jsonl(str(out / 'dead_letter.jsonl'))
  invalid = [(s, d) for s, d in sent if reference.validate(d) is None]
  assert letters(dead, 'invalid') == as_sent(invalid)
  too_late = [(s, d) for s, d in sent if '"too-late-' in d]
  assert letters(dead, 'too_late') == as_sent(too_late)
  identities = [d['message_id'] for d in dead]
  assert len(set(identities)) == len(dead), 'a dead letter is stored twice'
  assert all(i.startswith('pubsub:') for i in identities), identities[:3]


#: Messages per subscription of the bounded read: more than one split's pull, so
#: readers close with pulled, unread messages that others must still get.
BOUNDED_PER_SUBSCRIPTION = 1500


def test_a_bounded_pubsub_read_drains_the_backlog_and_the_run_completes(
    emulator, flink_job_server, tmp_path):
  """``--pubsub-max-messages``: the job reads that many messages from each
  subscription, every window closes and the run ends by itself, complete and
  reconciled; nothing read twice, nothing left (a redelivered message id would
  be counted twice, a missing one would hold the read open)."""
  from google.cloud import pubsub_v1
  _require_rest(emulator)
  run_id = f'fb-{uuid.uuid4().hex[:8]}-'
  subscriptions = _subscriptions(run_id)
  publisher = pubsub_v1.PublisherClient()
  t0 = (int(time.time()) - 3600) * 1000
  sent, futures = [], []
  for s, source in enumerate(SOURCES):
    for i in range(BOUNDED_PER_SUBSCRIPTION):
      if i % 97 == 5:
        body = '{"event_id": "torn'  # garbage: a dead letter
      elif i % 50 == 7:  # a redelivery of the event before it: a duplicate
        body = _event(f'{source}-{i - 1}', float(i - 1), t0 + (i - 1) * 40 + s)
      else:
        body = _event(f'{source}-{i}', float(i), t0 + i * 40 + s,
                      ('finserve', 'acme.io')[i % 2])
      futures.append(publisher.publish(
          publisher.topic_path(PROJECT, run_id + source), body.encode(), ts=str(t0 + i * 40)))
      sent.append((source, body))
  for future in futures:
    future.result(timeout=60)

  out = tmp_path / 'out'
  source = 'pubsub:' + ','.join(f'{s}={p}' for s, p in sorted(subscriptions.items()))
  run = subprocess.run(
      [sys.executable, '-m', 'pipeline', 'run', *flink_args(flink_job_server), '--streaming',
       f'--source={source}', f'--pubsub-max-messages={BOUNDED_PER_SUBSCRIPTION}',
       f'--window-size={WINDOW_S}', f'--allowed-lateness={LATENESS_S}', '--parallelism=2',
       f'--output-dir={out}'],
      cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO, 'PUBSUB_EMULATOR_HOST': emulator},
      capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  assert json.loads((out / 'run.json').read_text(encoding='utf-8'))['status'] == 'complete'

  expected_accounting, expected_windows, invalid, _ = live_outcome(sent, WINDOW_S)
  accounting = json.loads((out / 'accounting.json').read_text(encoding='utf-8'))
  assert accounting == expected_accounting
  assert accounting['received'] == len(SOURCES) * BOUNDED_PER_SUBSCRIPTION
  got = final_panes_of(read_jsonl(str(out / 'aggregates.jsonl')))
  assert {w: (p['count'], p['sum'], p['min'], p['max']) for w, p in got.items()} == {
      w: (c, pytest.approx(s), lo, hi) for w, (c, s, lo, hi) in expected_windows.items()}
  assert all(p['timing'] != 'EARLY' for p in got.values())
  dead = read_jsonl(str(out / 'dead_letter.jsonl'))
  assert letters(dead, 'invalid') == as_sent(invalid)
  assert len({d['message_id'] for d in dead}) == len(dead), 'a dead letter is stored twice'
