"""``--aggregates-topic``: the real pipeline on a small replay publishes every
pane to a real Kafka broker (scripts/kafka.sh, no Flink) and to the Pub/Sub
emulator (scripts/pubsub-emulator.sh); what a consumer reads back must be every
pane, keyed and attributed by customer, and the highest pane per window must be
the final aggregates."""

from __future__ import annotations

import collections
import json
import sqlite3
import time
import uuid

import pytest

from conftest import MINUTE, SECOND, T0, data, mark, payload, run_replay

pytestmark = pytest.mark.integration

W0, W1 = T0, T0 + MINUTE
WINDOW = lambda a: (a['customer_id'], a['key'], a['window_start'], a['window_end'])  # noqa: E731

#: Two customers, two keys; ON_TIME and LATE panes (a window with three panes).
LINES = [
    data('A', payload('f1', W0 + 1 * SECOND, 2.0)),
    data('A', payload('f2', W0 + 2 * SECOND, 3.0, key='MSFT')),
    data('B', payload('a1', W0 + 3 * SECOND, 7.0, customer_id='acme.io')),
    data('A', payload('f3', W1 + 5 * SECOND, 1.5)),
    mark('A', W1 + 10 * SECOND), mark('B', W1 + 10 * SECOND),  # W0 on time
    data('A', payload('late1', W0 + 30 * SECOND, 10.0)),  # LATE pane 1
    mark('A', W1 + 15 * SECOND),
    data('A', payload('late2', W0 + 40 * SECOND, -4.0)),  # LATE pane 2
    data('B', payload('late3', W0 + 50 * SECOND, 1.0, customer_id='acme.io')),
    mark('A', W1 + 5 * MINUTE), mark('B', W1 + 5 * MINUTE),
]

#: The final figures, worked out by hand: window → (count, sum, min, max).
FINAL = {
    ('finserve', 'AAPL', W0, W1): (3, 8.0, -4.0, 10.0),
    ('finserve', 'MSFT', W0, W1): (1, 3.0, 3.0, 3.0),
    ('acme.io', 'AAPL', W0, W1): (2, 8.0, 1.0, 7.0),
    ('finserve', 'AAPL', W1, W1 + MINUTE): (1, 1.5, 1.5, 1.5),
}


def _highest_panes(panes):
  best = {}
  for p in panes:
    if WINDOW(p) not in best or p['pane_index'] > best[WINDOW(p)]['pane_index']:
      best[WINDOW(p)] = p
  return best


def _check_pane_log(received, out, sqlite_path):
  """``received``: the consumed panes. Every emitted pane arrived (once each,
  as no bundle was retried) and the pane-aware reading is the final result."""
  emitted = out.aggregates
  assert len(emitted) > len(FINAL)  # several panes per window were emitted
  key = lambda p: json.dumps(p, sort_keys=True)  # noqa: E731
  assert collections.Counter(map(key, received)) == collections.Counter(map(key, emitted))
  best = _highest_panes(received)
  assert {w: (p['count'], p['sum'], p['min'], p['max']) for w, p in best.items()} == FINAL
  assert any(p['pane_index'] > 0 for p in best.values())  # a LATE pane superseded one
  # The pipeline's own pane-aware store (SQLite upsert) agrees, pane index included.
  with sqlite3.connect(sqlite_path) as conn:
    stored = {(r[0], r[1], r[2], r[3]): r[4:] for r in conn.execute(
        'SELECT customer_id, key, window_start, window_end, count, sum, min, max, '
        'pane_index FROM aggregates')}
  assert stored == {w: FINAL[w] + (p['pane_index'],) for w, p in best.items()}


def test_every_pane_reaches_a_kafka_topic_keyed_by_customer(tmp_path, kafka_broker):
  from confluent_kafka import Consumer
  from confluent_kafka.admin import AdminClient, NewTopic
  topic = f'aggregates-{uuid.uuid4().hex[:8]}'
  admin = AdminClient({'bootstrap.servers': kafka_broker})
  admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(60)
  try:
    out = run_replay(tmp_path, LINES, aggregates_topic=f'kafka:{kafka_broker}/{topic}')
    consumer = Consumer({
        'bootstrap.servers': kafka_broker, 'group.id': f'it-{uuid.uuid4().hex}',
        'auto.offset.reset': 'earliest', 'enable.auto.commit': False})
    consumer.subscribe([topic])
    records, deadline = [], time.time() + 60
    try:
      while len(records) < len(out.aggregates) and time.time() < deadline:
        msg = consumer.poll(1.0)
        if msg is not None:
          assert msg.error() is None, msg.error()
          records.append(msg)
      extra = consumer.poll(2.0)  # nothing more than the emitted panes
      assert extra is None or extra.error() is not None, extra.value()
    finally:
      consumer.close()
    received = []
    for msg in records:
      pane = json.loads(msg.value().decode('utf-8'))
      assert msg.key() == pane['customer_id'].encode('utf-8')
      assert msg.timestamp()[1] == pane['window_end'] - 1
      received.append(pane)
    # One key, one partition: a customer's panes are never split.
    partitions = collections.defaultdict(set)
    for msg in records:
      partitions[msg.key()].add(msg.partition())
    assert all(len(p) == 1 for p in partitions.values())
    _check_pane_log(received, out, str(tmp_path / 'out' / 'aggregates.sqlite'))
  finally:
    admin.delete_topics([topic])[topic].result(60)


def test_every_pane_reaches_a_pubsub_topic_with_its_attributes(tmp_path, emulator):
  from google.cloud import pubsub_v1
  publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
  run = uuid.uuid4().hex[:8]
  topic = publisher.create_topic(name=publisher.topic_path('tidemark-it', f'aggs-{run}')).name
  subscription = subscriber.create_subscription(request={
      'name': subscriber.subscription_path('tidemark-it', f'aggs-{run}-sub'), 'topic': topic,
      'ack_deadline_seconds': 60}).name
  try:
    out = run_replay(tmp_path, LINES, aggregates_topic=f'pubsub:{topic}')
    messages, deadline = [], time.time() + 60
    while len(messages) < len(out.aggregates) and time.time() < deadline:
      response = subscriber.pull(
          request={'subscription': subscription, 'max_messages': 100}, timeout=10)
      if response.received_messages:
        subscriber.acknowledge(request={'subscription': subscription, 'ack_ids': [
            m.ack_id for m in response.received_messages]})
      messages.extend(m.message for m in response.received_messages)
    received = []
    for message in messages:
      pane = json.loads(message.data.decode('utf-8'))
      assert dict(message.attributes) == {
          'customer_id': pane['customer_id'], 'pane_index': str(pane['pane_index']),
          'window_start': str(pane['window_start'])}
      received.append(pane)
    _check_pane_log(received, out, str(tmp_path / 'out' / 'aggregates.sqlite'))
  finally:
    subscriber.delete_subscription(subscription=subscription)
    publisher.delete_topic(topic=topic)
