"""Topic publishers: every emitted pane, for downstream consumers."""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Iterable, List

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.rules.model import WindowAggregate

_LOG = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Topics: every emitted pane, for downstream consumers.
#
# A topic of aggregates is a PANE LOG, not a table: it carries every pane of a
# window (EARLY, ON_TIME, LATE), each as the JSON object of contract section 4,
# and may carry a pane twice (a retried bundle publishes again). A consumer
# keeps, per (customer_id, key, window_start, window_end), the record with the
# highest pane_index, which is the pane-aware rule of the database writers;
# panes of one customer arrive in order on Kafka (one key, one partition) but a
# consumer must not rely on it.

#: How long finish_bundle waits for the broker to acknowledge a bundle.
PUBLISH_TIMEOUT_S = 120.0

_PUBSUB_TOPIC = re.compile(
    r'^projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/topics/[A-Za-z][A-Za-z0-9._~+%-]{2,254}$')
_KAFKA_TOPIC = re.compile(r'^[A-Za-z0-9._-]{1,249}$')


def aggregate_json(agg: WindowAggregate) -> bytes:
  """A pane as the UTF-8 JSON object of contract section 4."""
  return json.dumps(agg.to_json_dict(), separators=(',', ':'), allow_nan=False).encode('utf-8')


def check_pubsub_topic(path: str) -> str:
  """``path`` if it is ``projects/PROJECT/topics/TOPIC``; ValueError otherwise."""
  if not isinstance(path, str) or not _PUBSUB_TOPIC.match(path):
    raise ValueError(f'{path!r} is not projects/PROJECT/topics/TOPIC')
  return path


def check_kafka_topic(topic: str) -> str:
  if not isinstance(topic, str) or not _KAFKA_TOPIC.match(topic) or topic in ('.', '..'):
    raise ValueError(f'Kafka topic {topic!r} is not 1-249 characters of A-Z a-z 0-9 . _ -')
  return topic


class _PublishKafkaFn(beam.DoFn):
  """Produces each pane keyed by its customer, record time ``window_end - 1``
  (the window's last millisecond); a bundle ends only once the broker
  acknowledged all of it, else it fails and is retried."""

  def __init__(self, bootstrap: str, topic: str, timeout_s: float):
    self._bootstrap = bootstrap
    self._topic = topic
    self._timeout_s = timeout_s
    self._published = Metrics.counter('tidemark', 'kafka_panes_published')

  def setup(self):
    from confluent_kafka import Producer
    self._producer = Producer({
        'bootstrap.servers': self._bootstrap,
        'enable.idempotence': True,  # acks=all, no duplicates from the client's retries
        'linger.ms': 20,
    })

  def start_bundle(self):
    self._failures: List[str] = []
    self._pending = 0

  def _delivered(self, err, msg) -> None:
    if err is not None:
      self._failures.append(f'{msg.key()!r} at {msg.timestamp()[1]}: {err}')

  def process(self, agg: WindowAggregate) -> Iterable:
    while True:
      try:
        self._producer.produce(
            self._topic, key=agg.customer_id.encode('utf-8'), value=aggregate_json(agg),
            timestamp=agg.window_end - 1, on_delivery=self._delivered)
        break
      except BufferError:  # the local queue is full: let deliveries drain it
        self._producer.poll(0.5)
    self._pending += 1
    self._producer.poll(0)
    return ()

  def finish_bundle(self):
    if not self._pending:
      return
    left = self._producer.flush(self._timeout_s)
    if left:
      raise RuntimeError(
          f'Kafka topic {self._topic}: {left} panes not acknowledged within {self._timeout_s} s')
    if self._failures:
      raise RuntimeError(
          f'Kafka topic {self._topic}: {len(self._failures)} of {self._pending} panes '
          f'failed: {self._failures[:5]}')
    self._published.inc(self._pending)
    self._pending = 0

  def teardown(self):
    producer = getattr(self, '_producer', None)
    if producer is not None:
      producer.flush(5)


class PublishAggregatesToKafka(beam.PTransform):
  """Publishes every pane to a Kafka topic (a pane log: see above), record key
  the customer id (UTF-8), value the pane's JSON, record timestamp
  ``window_end - 1`` ms. At least once; a failed delivery fails the bundle."""

  def __init__(self, bootstrap: str, topic: str, timeout_s: float = PUBLISH_TIMEOUT_S):
    super().__init__()
    if not bootstrap:
      raise ValueError('bootstrap must be set')
    self._bootstrap = bootstrap
    self._topic = check_kafka_topic(topic)
    self._timeout_s = timeout_s

  def expand(self, aggregates: beam.PCollection[WindowAggregate]):
    return aggregates | 'Publish' >> beam.ParDo(
        _PublishKafkaFn(self._bootstrap, self._topic, self._timeout_s))


class _PublishPubSubFn(beam.DoFn):
  """Publishes each pane with attributes customer_id, pane_index and
  window_start; a bundle ends only once every publish succeeded."""

  def __init__(self, topic_path: str, timeout_s: float):
    self._topic_path = topic_path
    self._timeout_s = timeout_s
    self._published = Metrics.counter('tidemark', 'pubsub_panes_published')

  def setup(self):
    from google.cloud import pubsub_v1
    self._publisher = pubsub_v1.PublisherClient()

  def start_bundle(self):
    self._futures: List[Any] = []

  def process(self, agg: WindowAggregate) -> Iterable:
    self._futures.append(self._publisher.publish(
        self._topic_path, aggregate_json(agg), customer_id=agg.customer_id,
        pane_index=str(agg.pane_index), window_start=str(agg.window_start)))
    return ()

  def finish_bundle(self):
    futures, self._futures = self._futures, []
    for future in futures:
      future.result(timeout=self._timeout_s)  # raises the publish error
    self._published.inc(len(futures))

  def teardown(self):
    publisher = getattr(self, '_publisher', None)
    if publisher is not None:
      publisher.stop()


class PublishAggregatesToPubSub(beam.PTransform):
  """Publishes every pane to a Pub/Sub topic (a pane log: see above), data the
  pane's JSON, attributes ``customer_id``, ``pane_index``, ``window_start``.
  At least once; a failed publish fails the bundle."""

  def __init__(self, topic_path: str, timeout_s: float = PUBLISH_TIMEOUT_S):
    super().__init__()
    self._topic_path = check_pubsub_topic(topic_path)
    self._timeout_s = timeout_s

  def expand(self, aggregates: beam.PCollection[WindowAggregate]):
    return aggregates | 'Publish' >> beam.ParDo(
        _PublishPubSubFn(self._topic_path, self._timeout_s))
