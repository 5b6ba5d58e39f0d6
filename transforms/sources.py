"""Sources: each yields RawMessage (source name + untouched payload), with
event-time watermarks from the source, never from processing time."""

from __future__ import annotations

from typing import Iterable, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.testing.test_stream import TestStream
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp

from transforms.model import RawMessage
from transforms.replay import Messages, ProcessingTime, Replay, Watermark, compile_replay


def _millis(millis) -> Timestamp:
  return MIN_TIMESTAMP if millis is None else Timestamp(micros=millis * 1000)


def replay_to_test_stream(replay: Replay) -> TestStream:
  """The replay as a TestStream: message batches, watermark and processing-time
  steps in file order, then the watermark to infinity."""
  stream = TestStream()
  for step in replay.steps:
    if isinstance(step, Messages):
      stream.add_elements([
          beam.window.TimestampedValue(
              (m.source, m.data.encode('utf-8', 'surrogatepass'), m.source_lag_ms),
              _millis(m.watermark))
          for m in step.batch
      ])
    elif isinstance(step, Watermark):
      if step.millis is None:
        stream.advance_watermark_to_infinity()
      else:
        stream.advance_watermark_to(_millis(step.millis))
    elif isinstance(step, ProcessingTime):
      stream.advance_processing_time(step.seconds)
  return stream


class _ToRawMessageFn(beam.DoFn):
  """Rebuilds the message and records its source's watermark lag."""

  def __init__(self):
    self._lags = {}

  def process(self, element: Tuple[str, bytes, Optional[int]]) -> Iterable[RawMessage]:
    source, data, lag_ms = element
    if lag_ms is not None:
      if source not in self._lags:
        self._lags[source] = Metrics.distribution('tidemark', f'watermark_lag_ms/{source}')
      self._lags[source].update(lag_ms)
    # Payloads travel as bytes so that even one with a lone surrogate (not
    # UTF-8, hence invalid downstream) reaches the dead letter exactly as recorded.
    yield RawMessage(source, data.decode('utf-8', 'surrogatepass'))


class ReadReplay(beam.PTransform):
  """Replays a recorded stream exactly (contract section 2).

  The file is read and checked when the transform is constructed, so a bad
  line stops the run before anything executes (ReplayError names the line).
  Needs a streaming runner that executes TestStream.
  """

  def __init__(self, replay: Union[str, Replay]):
    super().__init__()
    self.replay = compile_replay(replay) if isinstance(replay, str) else replay

  def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[RawMessage]:
    return (
        pbegin
        | 'Stream' >> replay_to_test_stream(self.replay)
        | 'AsRawMessage' >> beam.ParDo(_ToRawMessageFn()))
