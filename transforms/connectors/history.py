"""The raw history of a range, read as a bounded batch for a restatement.

Two sources, each giving chunks of raw copies ``(order, message_id, source,
payload bytes, live watermark or None)`` (``transforms.flow.restate.RawCopy``;
a payload travels as its bytes, ``transforms.rules.model.payload_bytes``, so
that one that is not UTF-8 crosses every coder):

* ``ReadReplayHistory``: a replay file, in line order, with the watermark each
  message arrived under (the file records it);
* ``ReadKafkaHistory``: every record of Kafka topics between two instants of
  record time: per partition, from the offset ``offsets_for_times`` gives for
  the first instant to the one it gives for the second (or the partition's end
  if no record has reached it yet), read by Kafka's own client in slices in
  parallel. Record time only finds the offsets: a record between them is read
  whatever its time (a straggler's, under ``CreateTime``, is old). Nothing is
  judged against a watermark; the source's order is record time, then source,
  partition and offset.
"""

from __future__ import annotations

import time
from typing import Dict, Iterable, List, NamedTuple

import apache_beam as beam

from transforms.rules.model import message_identity, payload_bytes
from transforms.rules.replay_index import ReplayIndex, read_chunk


class KafkaUnreachable(ConnectionError):
  """The brokers or a topic cannot be read."""


class ReadReplayHistory(beam.PTransform):
  """A checked replay (``transforms.rules.replay.index_replay``) as chunks of raw copies."""

  def __init__(self, index: ReplayIndex):
    super().__init__()
    self.index = index

  def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
    path, digest = self.index.path, self.index.digest

    def read(chunk) -> List[tuple]:
      return [((seq,), message_identity('replay', digest, seq + 1), source,
               payload_bytes(data), watermark)
              for seq, _step, watermark, _processing_time, source, data in read_chunk(path, chunk)]

    return (pbegin
            | 'Chunks' >> beam.Create(self.index.chunks)
            | 'Spread' >> beam.Reshuffle()
            | 'Read' >> beam.Map(read))


class KafkaSlice(NamedTuple):
  """Offsets ``[start, end)`` of one partition of a source's topic."""
  source: str
  topic: str
  partition: int
  start: int
  end: int


def _consumer(bootstrap_servers: str):
  from confluent_kafka import Consumer
  return Consumer({'bootstrap.servers': bootstrap_servers, 'group.id': 'tidemark-restate',
                   'enable.auto.commit': False, 'enable.partition.eof': True,
                   'log_level': 0})  # what fails is raised, not logged


def plan_kafka_history(bootstrap_servers: str, sources: Dict[str, str], from_ms: int,
                       to_ms: int, slice_records: int = 100_000,
                       timeout_s: float = 10.0) -> List[KafkaSlice]:
  """The slices of ``sources`` (name -> topic) from the first record at or after
  ``from_ms`` to the first at or after ``to_ms`` (record time), per partition.
  Raises KafkaUnreachable naming the broker or topic."""
  from confluent_kafka import KafkaException, TopicPartition
  consumer = _consumer(bootstrap_servers)
  try:
    slices = []
    for name, topic in sorted(sources.items()):
      try:
        metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
      except KafkaException as e:
        raise KafkaUnreachable(f'Kafka at {bootstrap_servers} did not answer: {e}') from None
      if metadata.error is not None or not metadata.partitions:
        raise KafkaUnreachable(f'topic {topic!r} cannot be read at {bootstrap_servers}: '
                               f'{metadata.error or "it has no partitions"}')
      partitions = sorted(metadata.partitions)
      try:
        starts = consumer.offsets_for_times(
            [TopicPartition(topic, p, from_ms) for p in partitions], timeout=timeout_s)
        ends = consumer.offsets_for_times(
            [TopicPartition(topic, p, to_ms) for p in partitions], timeout=timeout_s)
        highs = [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1]
                 for p in partitions]
      except KafkaException as e:
        raise KafkaUnreachable(f'the offsets of topic {topic!r} cannot be read: {e}') from None
      for partition, start, end, high in zip(partitions, starts, ends, highs):
        # -1: no record at or after the instant
        first = high if start.offset < 0 else start.offset
        last = high if end.offset < 0 else end.offset
        for offset in range(first, last, slice_records):
          slices.append(KafkaSlice(name, topic, partition, offset,
                                   min(offset + slice_records, last)))
    return slices
  finally:
    consumer.close()


class _ReadSliceFn(beam.DoFn):

  def __init__(self, bootstrap_servers: str, timeout_s: float):
    self._bootstrap = bootstrap_servers
    self._timeout_s = timeout_s

  def process(self, piece: KafkaSlice) -> Iterable[List[tuple]]:
    from confluent_kafka import KafkaError, TopicPartition
    consumer = _consumer(self._bootstrap)
    try:
      consumer.assign([TopicPartition(piece.topic, piece.partition, piece.start)])
      chunk: List[tuple] = []
      offset = piece.start
      deadline = time.monotonic() + self._timeout_s
      while offset < piece.end:
        # never more than the slice holds: consume() waits for as many as it is asked
        records = consumer.consume(num_messages=min(10_000, piece.end - offset), timeout=1.0)
        if not records:
          if time.monotonic() > deadline:
            raise KafkaUnreachable(f'no record of {piece.topic}/{piece.partition} at offset '
                                   f'{offset} within {self._timeout_s} s')
          continue
        deadline = time.monotonic() + self._timeout_s
        for record in records:
          error = record.error()
          if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
              continue
            raise KafkaUnreachable(f'{piece.topic}/{piece.partition}: {error}')
          offset = record.offset() + 1
          if record.offset() >= piece.end:
            break
          _, timestamp = record.timestamp()
          chunk.append(((timestamp, piece.source, piece.partition, record.offset()),
                        message_identity('kafka', piece.topic, piece.partition, record.offset()),
                        piece.source, record.value() or b'', None))
      yield chunk
    finally:
      consumer.close()


class ReadKafkaHistory(beam.PTransform):
  """The planned slices (``plan_kafka_history``) as chunks of raw copies."""

  def __init__(self, bootstrap_servers: str, slices: List[KafkaSlice], timeout_s: float = 30.0):
    super().__init__()
    if not bootstrap_servers:
      raise ValueError('bootstrap_servers must be set')
    self._bootstrap = bootstrap_servers
    self._slices = list(slices)
    self._timeout_s = timeout_s

  def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
    return (pbegin
            | 'Slices' >> beam.Create(self._slices)
            | 'Spread' >> beam.Reshuffle()
            | 'Read' >> beam.ParDo(_ReadSliceFn(self._bootstrap, self._timeout_s)))
