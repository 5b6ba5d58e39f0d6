"""Sources: each yields RawMessage (source name + untouched payload), with
event-time watermarks from the source, never from processing time."""

from __future__ import annotations

from typing import Mapping, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.io.kafka import ReadFromKafka
from apache_beam.testing.test_stream import TestStream
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp

from transforms.model import RawMessage
from transforms.replay import Messages, ProcessingTime, Replay, Watermark, compile_replay


def _millis(millis) -> Timestamp:
  return MIN_TIMESTAMP if millis is None else Timestamp(micros=millis * 1000)


#: (source, payload bytes) in Beam's portable KV/string/bytes coders, so that
#: runners written in other languages (Flink's Java TestStream) can decode it.
REPLAY_ELEMENT_CODER = coders.TupleCoder([coders.StrUtf8Coder(), coders.BytesCoder()])


def replay_to_test_stream(replay: Replay, processing_time: bool = True) -> TestStream:
  """The replay as a TestStream: message batches, watermark and processing-time
  steps in file order, then the watermark to infinity.

  With ``processing_time=False`` the processing-time steps are left out (they
  only pace early panes); runners such as Flink refuse them.
  """
  stream = TestStream(coder=REPLAY_ELEMENT_CODER)
  for step in replay.steps:
    if isinstance(step, Messages):
      stream.add_elements([
          beam.window.TimestampedValue(
              (m.source, m.data.encode('utf-8', 'surrogatepass')), _millis(m.watermark))
          for m in step.batch
      ])
    elif isinstance(step, Watermark):
      if step.millis is None:
        stream.advance_watermark_to_infinity()
      else:
        stream.advance_watermark_to(_millis(step.millis))
    elif isinstance(step, ProcessingTime) and processing_time:
      stream.advance_processing_time(step.seconds)
  return stream.with_output_types(Tuple[str, bytes])


def _raw_message(source: str, data: bytes) -> RawMessage:
  # Payloads travel as bytes so that even one with a lone surrogate (not
  # UTF-8, hence invalid downstream) reaches the dead letter exactly as recorded.
  return RawMessage(source, data.decode('utf-8', 'surrogatepass'))


class ReadReplay(beam.PTransform):
  """Replays a recorded stream exactly (contract section 2).

  The file is read and checked when the transform is constructed, so a bad
  line stops the run before anything executes (ReplayError names the line).
  Needs a streaming runner that executes TestStream. ``processing_time=False``
  leaves out the replay's processing-time steps, for runners that cannot
  advance processing time (Flink); only early panes depend on them.
  """

  def __init__(self, replay: Union[str, Replay], processing_time: bool = True):
    super().__init__()
    self.replay = compile_replay(replay) if isinstance(replay, str) else replay
    self.processing_time = processing_time

  def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[RawMessage]:
    return (
        pbegin
        | 'Stream' >> replay_to_test_stream(self.replay, self.processing_time)
        | 'AsRawMessage' >> beam.MapTuple(_raw_message))


#: Kafka payloads are bytes; RawMessage.data is text. Bytes are decoded as
#: UTF-8 with 'surrogateescape': valid UTF-8 reads as itself, and each byte of
#: an invalid sequence becomes a lone surrogate U+DC80..U+DCFF, which no valid
#: UTF-8 text can contain. The mapping is lossless (the bytes are
#: ``data.encode('utf-8', 'surrogateescape')``) and such a payload is invalid
#: downstream (it cannot be encoded as UTF-8), so it reaches the dead letter
#: with its data preserved.
KAFKA_PAYLOAD_ERRORS = 'surrogateescape'


def kafka_payload_to_text(value: Optional[bytes]) -> str:
  return (value or b'').decode('utf-8', KAFKA_PAYLOAD_ERRORS)


class ReadKafkaEvents(beam.PTransform):
  """Reads one Kafka topic per source name (Beam's cross-language ReadFromKafka).

  Record timestamps are the event time (``CreateTime``), so each partition's
  watermark follows its records: a partition that has had no record yet holds
  the pipeline watermark at the beginning of time, and a partition that is
  caught up (no backlog) lets its watermark follow the wall clock. The record
  key (the customer_id) is not needed: the payload is the source of truth.

  ``sources`` maps source name to topic. ``expansion_service`` is the address
  of a Java expansion service that serves Kafka IO (never downloaded).
  ``max_num_records`` (per topic) makes the read bounded, for tests.
  """

  def __init__(
      self,
      bootstrap_servers: str,
      sources: Mapping[str, str],
      expansion_service: str,
      consumer_config: Optional[Mapping[str, str]] = None,
      max_num_records: Optional[int] = None):
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

  def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[RawMessage]:
    per_topic = []
    for name, topic in sorted(self._sources.items()):
      records = pbegin | f'Read_{name}' >> ReadFromKafka(
          consumer_config=self._consumer_config,
          topics=[topic],
          timestamp_policy=ReadFromKafka.create_time_policy,
          max_num_records=self._max_num_records,
          expansion_service=self._expansion_service)
      per_topic.append(
          records | f'AsRawMessage_{name}' >> beam.Map(
              lambda kv, source=name: RawMessage(source, kafka_payload_to_text(kv[1]))))
    return per_topic | 'AllTopics' >> beam.Flatten()
