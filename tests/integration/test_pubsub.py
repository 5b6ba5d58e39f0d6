"""The Pub/Sub source end to end against the Pub/Sub emulator started by
``scripts/pubsub-emulator.sh``: the simulator publishes (shifted to now), the
real pipeline runs on the streaming DirectRunner until the windows have closed,
and its outputs must equal an independent reading of what was published."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from conftest import live_outcome, read_jsonl
from tools import reference
from transforms.rules.model import dead_letter_payload, final_panes_of, payload_bytes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT = 'tidemark-it'
WINDOW_S = 5
LATENESS_S = 10
SOURCES = ('A', 'B', 'C')
#: Few enough that the DirectRunner's first pull per subscription (10 messages
#: at most) takes them all: once a subscription is empty, the Java emulator
#: holds each pull ~30 s and the DirectRunner's single worker waits with it.
SIMULATED = 24

pytestmark = pytest.mark.integration


def _clients():
  from google.cloud import pubsub_v1
  return pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()


@pytest.fixture
def topics(emulator):
  """One topic and subscription per source, unique to the test."""
  publisher, subscriber = _clients()
  run = uuid.uuid4().hex[:8]
  prefix = f'it-{run}-'
  subscriptions = {}
  for source in SOURCES:
    topic = publisher.create_topic(name=publisher.topic_path(PROJECT, prefix + source)).name
    subscriptions[source] = subscriber.create_subscription(request={
        'name': subscriber.subscription_path(PROJECT, f'it-{run}-sub-{source}'),
        'topic': topic,
        'ack_deadline_seconds': 60,
    }).name
  yield prefix, subscriptions
  for source, path in subscriptions.items():
    subscriber.delete_subscription(subscription=path)
    publisher.delete_topic(topic=publisher.topic_path(PROJECT, prefix + source))


def _cli(*args, module='pipeline'):
  env = {**os.environ, 'PYTHONPATH': REPO}
  return subprocess.run(
      [sys.executable, '-m', module, *args], cwd=REPO, capture_output=True, text=True,
      timeout=300, env=env)


def test_simulated_traffic_through_the_emulator_equals_an_independent_count(
    topics, tmp_path):
  from google.cloud import pubsub_v1
  prefix, subscriptions = topics
  record = tmp_path / 'sent.jsonl'
  result = _cli(
      'simulate', '--to', 'pubsub', '--project', PROJECT, '--topic-prefix', prefix,
      '--messages', str(SIMULATED), '--event-rate', '20', '--seed', '11',
      '--window-size', str(WINDOW_S), '--allowed-lateness', str(LATENESS_S),
      '--sources', 'A:0.4:1,B:0.35:1,C:0.25:2', '--straggler-share', '0',
      '--boundary-share', '0.15', '--redelivery-share', '0.15', '--garbage-share', '0.15',
      '--shift-to-now', '--record', str(record), module='tools')
  assert result.returncode == 0, result.stderr
  assert 'messages/s' in result.stdout
  # As the wire carries them: a lone surrogate goes out as invalid UTF-8
  # (model.payload_bytes) and comes back in the lossless surrogateescape form
  # (transforms.connectors.sources).
  sent = [(r['source'], payload_bytes(r['data']).decode('utf-8', 'surrogateescape'))
          for r in read_jsonl(str(record))]
  assert len(sent) == SIMULATED

  # What the simulator does not make: a valid event whose ts attribute is
  # garbage, one without attributes, and a payload that is not UTF-8.
  publisher = pubsub_v1.PublisherClient()
  valid = next(json.loads(d) for _, d in sent if reference.validate(d))
  extras = []
  for n, (source, attrs) in enumerate(
      (('B', {'ts': 'garbage'}), ('C', {}), ('B', {'ts': '99999999999999999999999'}))):
    body = json.dumps({**valid, 'event_id': f'extra-{n}', 'value': 1000 + n})
    publisher.publish(publisher.topic_path(PROJECT, prefix + source), body.encode('utf-8'),
                      **attrs).result(timeout=30)
    extras.append((source, body))
  not_utf8 = b'{"event_id": "bin", "customer_id": "x\xff\xfe"}'
  publisher.publish(publisher.topic_path(PROJECT, prefix + 'C'), not_utf8,
                    ts=str(valid['event_time'])).result(timeout=30)
  publisher.stop()
  sent += extras + [('C', not_utf8.decode('utf-8', 'surrogateescape'))]
  print('messages per subscription:', collections.Counter(s for s, _ in sent))

  expected_accounting, expected_windows, expected_invalid, _ = live_outcome(sent, WINDOW_S)
  assert expected_accounting['invalid'] >= 2 and expected_accounting['duplicate'] >= 1
  last_close_ms = max(w[3] for w in expected_windows) + LATENESS_S * 1000

  # Run the real pipeline (config → build) until every message is counted and
  # the wall-clock watermark has closed the last window, then cancel.
  from apache_beam.options.pipeline_options import PipelineOptions
  import apache_beam as beam
  from pipeline.launch.build import build, read_source
  from pipeline.settings.config import RunConfig, watermark_risks
  out = tmp_path / 'out'
  out.mkdir()
  source = 'pubsub:' + ','.join(f'{s}={p}' for s, p in sorted(subscriptions.items()))
  options = PipelineOptions([
      '--runner=DirectRunner', '--streaming', f'--source={source}',
      f'--window-size={WINDOW_S}', f'--allowed-lateness={LATENESS_S}',
      '--early-firing=0', f'--output-dir={out}', '--expected-skew=3'])
  config = RunConfig.from_options(options)
  assert config.pubsub_id_label is None  # the DirectRunner refuses id_label
  assert watermark_risks(config, 'DirectRunner') == []
  p = beam.Pipeline(options=options)
  build(p, config, read_source(config))
  started = time.monotonic()
  run = p.run()
  accounting = {}
  try:
    deadline = started + 200
    while time.monotonic() < deadline:
      time.sleep(1)
      if os.path.exists(config.accounting_path):
        with open(config.accounting_path, encoding='utf-8') as f:
          now = json.load(f)
        accounting = now
      finals = final_panes_of(read_jsonl(config.aggregates_path))
      parts = sum(accounting.get(c, 0) for c in (
          'invalid', 'too_late', 'duplicate', 'aggregated'))
      if (accounting.get('received') == len(sent) == parts and
          time.time() * 1000 > last_close_ms + 2000 and
          sum(p['count'] for p in finals.values()) == accounting.get('aggregated') and
          all(p['timing'] != 'EARLY' for p in finals.values())):
        break
  finally:
    run.cancel()
  print(f'pipeline ran {time.monotonic() - started:.1f} s; {accounting}')

  assert accounting == expected_accounting
  finals = final_panes_of(read_jsonl(config.aggregates_path))
  assert {w: (p['count'], p['sum'], p['min'], p['max']) for w, p in finals.items()} == {
      w: (c, pytest.approx(s), lo, hi) for w, (c, s, lo, hi) in expected_windows.items()}
  dead = read_jsonl(config.dead_letter_path)
  assert all(d['reason'] == 'invalid' for d in dead)
  assert sorted((d['source'], dead_letter_payload(d)) for d in dead) == sorted(
      (source, payload_bytes(data)) for source, data in expected_invalid)
  binary = [d for d in dead if d['data'].startswith('{"event_id": "bin"')]
  assert dead_letter_payload(binary[0]) == not_utf8
  assert binary[0]['data'] == not_utf8.decode('utf-8', 'replace')
