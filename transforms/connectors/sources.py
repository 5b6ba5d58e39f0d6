"""Sources: each yields RawMessage (source name + untouched payload), with
event-time watermarks from the source, never from processing time."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import apache_beam as beam
import msgspec
from apache_beam.coders import coders
from apache_beam.io.kafka import ReadFromKafka
from apache_beam.metrics import Metrics
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp
from apache_beam.transforms.window import TimestampedValue

from transforms.rules.model import RawMessage, message_identity, stable_shard
from transforms.rules.replay import (
    MIN_WATERMARK_MS, Messages, ProcessingTime, Replay, Watermark, compile_replay)


def _millis(millis) -> Timestamp:
  return MIN_TIMESTAMP if millis is None else Timestamp(micros=millis * 1000)


#: (source, (payload bytes, (source watermark lag ms or -1, (pipeline watermark
#: ms at arrival, the message's number in the file)))) in Beam's portable
#: KV/string/bytes/varint coders (pairs only: a longer tuple has no portable
#: coder), so that runners written in other languages (Flink's Java TestStream)
#: can decode it.
#: Each travels keyed by its ``arrival_key``.
REPLAY_ELEMENT_CODER = coders.TupleCoder([
    coders.VarIntCoder(),
    coders.TupleCoder([
        coders.StrUtf8Coder(),
        coders.TupleCoder([
            coders.BytesCoder(),
            coders.TupleCoder([
                coders.VarIntCoder(),
                coders.TupleCoder([coders.VarIntCoder(), coders.VarIntCoder()])])])])])
ReplayElement = Tuple[int, Tuple[str, Tuple[bytes, Tuple[int, Tuple[int, int]]]]]

#: How many keys a replay's messages travel under from the source to the gate.
ARRIVAL_KEYS = 16


class _EventIdOnly(msgspec.Struct):
  event_id: Any = None


_EVENT_ID = msgspec.json.Decoder(_EventIdOnly)


def arrival_key(data: str) -> int:
  """The key a replayed message travels under: every copy of an ``event_id``
  has the same one, so copies reach the gate in the order they arrived even on
  a runner that spreads the source's output over parallel workers (a keyed
  exchange keeps each key's order; a plain one does not). Payloads without a
  string ``event_id`` (invalid ones) take key 0."""
  try:
    event_id = _EVENT_ID.decode(data).event_id
    return stable_shard(event_id, ARRIVAL_KEYS) if isinstance(event_id, str) else 0
  except (msgspec.DecodeError, UnicodeEncodeError, RecursionError):  # nested too deep
    return 0

#: The arrival watermark of a message that came before any watermark line.
BEGINNING_OF_TIME_MS = MIN_WATERMARK_MS - 1


def replay_to_test_stream(replay: Replay, processing_time: bool = True) -> TestStream:
  """The replay as a TestStream: message batches, watermark and processing-time
  steps in file order, then the watermark to infinity.

  With ``processing_time=False`` the processing-time steps are left out (they
  only pace early panes); runners such as Flink refuse them.
  """
  stream = TestStream(coder=REPLAY_ELEMENT_CODER)
  number = 0
  for step in replay.steps:
    if isinstance(step, Messages):
      elements = []
      for m in step.batch:
        number += 1
        elements.append(TimestampedValue(
            (arrival_key(m.data),
             (m.source, (m.data.encode('utf-8', 'surrogatepass'),
                         (-1 if m.source_lag_ms is None else m.source_lag_ms,
                          (BEGINNING_OF_TIME_MS if m.watermark is None else m.watermark,
                           number))))),
            _millis(m.watermark)))
      stream.add_elements(elements)
    elif isinstance(step, Watermark):
      if step.millis is None:
        stream.advance_watermark_to_infinity()
      else:
        stream.advance_watermark_to(_millis(step.millis))
    elif isinstance(step, ProcessingTime) and processing_time:
      stream.advance_processing_time(step.seconds)
  return stream.with_output_types(ReplayElement)


class _ToRawMessageFn(beam.DoFn):
  """Rebuilds the message and records its source's watermark lag.

  A keyed step (it declares state, which it never uses), so that the runner
  routes the source's output by ``arrival_key``: each key's messages in the
  order the source emitted them."""
  KEYED = ReadModifyWriteStateSpec('keyed', coders.VarIntCoder())

  def __init__(self, arrival_watermarks: bool, digest: str):
    self._arrival_watermarks = arrival_watermarks
    self._digest = digest
    self._lags: Dict[str, Any] = {}  # source → its lag distribution

  def process(self, element: ReplayElement,
              _keyed=beam.DoFn.StateParam(KEYED)) -> Iterable[RawMessage]:
    _, (source, (data, (lag_ms, (watermark, number)))) = element
    if lag_ms >= 0:
      if source not in self._lags:
        self._lags[source] = Metrics.distribution('tidemark', f'watermark_lag_ms/{source}')
      self._lags[source].update(lag_ms)
    # Payloads travel as bytes so that even one with a lone surrogate (not
    # UTF-8, hence invalid downstream) reaches the dead letter exactly as recorded.
    yield RawMessage(
        source, data.decode('utf-8', 'surrogatepass'),
        watermark if self._arrival_watermarks else None,
        message_identity('replay', self._digest, number))


class EventSource(beam.PTransform):
  """What every source of the streaming pipeline is: a PTransform from the
  pipeline's start to ``RawMessage(source, data, arrival_watermark)``, one
  per received message, stamped with its event time where the source knows it.

  ``arrival_watermarks`` says whether the messages carry the pipeline
  watermark they arrived under (a replay states it; the gate then decides by
  it exactly) or not (a live source: only the runner knows the watermark).
  ``expected_messages`` is how many messages the source delivers, when that is
  known before the run (a replay), else None.
  """

  arrival_watermarks: bool = False

  @property
  def expected_messages(self) -> Optional[int]:
    return None


class ReadReplay(EventSource):
  """Replays a recorded stream exactly (contract section 2).

  The file is read and checked when the transform is constructed, so a bad
  line stops the run before anything executes (ReplayError names the line).
  Needs a streaming runner that executes TestStream. ``processing_time=False``
  leaves out the replay's processing-time steps, for runners that cannot
  advance processing time (Flink); only early panes depend on them.

  Each message carries the pipeline watermark at its arrival, which the file
  states exactly, so too-late routing needs no probing of the runner.
  ``arrival_watermarks=False`` leaves it out: the replay then behaves like a
  live source, whose watermark only the runner knows.
  """

  def __init__(
      self,
      replay: Union[str, Replay],
      processing_time: bool = True,
      arrival_watermarks: bool = True):
    super().__init__()
    self.replay = compile_replay(replay) if isinstance(replay, str) else replay
    self.processing_time = processing_time
    self.arrival_watermarks = arrival_watermarks

  @property
  def expected_messages(self) -> int:
    return self.replay.messages

  def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[RawMessage]:
    return (
        pbegin
        | 'Stream' >> replay_to_test_stream(self.replay, self.processing_time)
        | 'AsRawMessage' >> beam.ParDo(
            _ToRawMessageFn(self.arrival_watermarks, self.replay.digest)))


def decode_payload(data: bytes) -> str:
  """The payload bytes as a string, losslessly.

  Valid UTF-8 decodes as usual. Any byte that is not part of valid UTF-8 becomes
  a lone surrogate U+DC80..U+DCFF (PEP 383 ``surrogateescape``), which parsing
  refuses as invalid, so the message reaches the dead letter, where JSON writes
  it as ``\\udcXX``; ``data.encode('utf-8', 'surrogateescape')`` gives back the
  exact bytes that were published.
  """
  return bytes(data).decode('utf-8', 'surrogateescape')


# --- Kafka --------------------------------------------------------------------

def kafka_partitions_without_records(
    bootstrap_servers: str, topics: Iterable[str], timeout_s: float = 10.0) -> List[str]:
  """``topic/partition`` of every partition that holds no record: under the
  ``CreateTime`` policy each holds the pipeline watermark at the beginning of
  time until its first record arrives, so no window closes before then."""
  from confluent_kafka import Consumer, TopicPartition
  consumer = Consumer({'bootstrap.servers': bootstrap_servers, 'group.id': 'tidemark-check',
                       'enable.auto.commit': False})
  try:
    empty = []
    for topic in topics:
      metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
      for partition in sorted(metadata.partitions):
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=timeout_s)
        if low == high:
          empty.append(f'{topic}/{partition}')
    return empty
  finally:
    consumer.close()


def kafka_raw_message(record, source: str) -> RawMessage:
  """A Kafka record (Kafka IO's row with metadata) as the message of
  ``source``, identified by its topic, partition and offset."""
  return RawMessage(
      source, decode_payload(record.value or b''), None,
      message_identity('kafka', record.topic, record.partition, record.offset))


class ReadKafkaEvents(EventSource):
  """Reads one Kafka topic per source name (Beam's cross-language ReadFromKafka).

  Record timestamps are the event time (``CreateTime``), so each partition's
  watermark follows its records: a partition that has had no record yet holds
  the pipeline watermark at the beginning of time, and a partition that is
  caught up (no backlog) lets its watermark follow the wall clock. The record
  key (the customer_id) is not needed: the payload is the source of truth.

  ``sources`` maps source name to topic. ``expansion_service`` is the address
  of a Java expansion service that serves Kafka IO (never downloaded).
  ``max_num_records`` (per topic) makes the read bounded, for tests.
  ``consumer_group`` (``group.id``): the read's offsets are committed to it
  when a checkpoint completes (a job restored from a checkpoint or savepoint
  resumes from the offsets stored in it; a new job of the group from the
  committed ones).
  """


  def __init__(
      self,
      bootstrap_servers: str,
      sources: Mapping[str, str],
      expansion_service: str,
      consumer_config: Optional[Mapping[str, str]] = None,
      max_num_records: Optional[int] = None,
      consumer_group: Optional[str] = None):
    super().__init__()
    if not bootstrap_servers:
      raise ValueError('bootstrap_servers must be set')
    if not sources:
      raise ValueError('sources must name at least one topic')
    for name, topic in sources.items():
      if not name or not topic:
        raise ValueError(f'source name and topic must be non-empty, got {name!r}={topic!r}')
    if not expansion_service:
      raise ValueError('expansion_service must be set (host:port)')
    if max_num_records is not None and max_num_records <= 0:
      raise ValueError(f'max_num_records must be positive, got {max_num_records!r}')
    self._bootstrap = bootstrap_servers
    self._sources = dict(sources)
    self._expansion_service = expansion_service
    self._consumer_config = {
        'bootstrap.servers': bootstrap_servers,
        'auto.offset.reset': 'earliest',
        **(consumer_config or {}),
    }
    self._max_num_records = max_num_records
    if consumer_group is not None:
      self._consumer_config['group.id'] = consumer_group
    self._commit_offsets = consumer_group is not None

  def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[RawMessage]:
    per_topic = []
    for name, topic in sorted(self._sources.items()):
      records = pbegin | f'Read_{name}' >> ReadFromKafka(
          consumer_config=self._consumer_config,
          topics=[topic],
          timestamp_policy=ReadFromKafka.create_time_policy,
          max_num_records=self._max_num_records,
          commit_offset_in_finalize=self._commit_offsets,
          with_metadata=True,
          expansion_service=self._expansion_service)
      per_topic.append(
          records | f'AsRawMessage_{name}' >> beam.Map(
              kafka_raw_message, name).with_output_types(RawMessage))
    return per_topic | 'AllTopics' >> beam.Flatten()
