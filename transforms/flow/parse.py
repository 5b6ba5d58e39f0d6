"""Contract section 1 in a pipeline: a payload becomes an Event or a dead letter
(the rules are ``transforms.rules.payload``)."""

from __future__ import annotations

from typing import Iterable

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from transforms.rules.model import INVALID, DeadLetter, Event, RawMessage
from transforms.rules.payload import InvalidPayload, parse_payload

INVALID_TAG = 'invalid'


def millis_to_timestamp(millis: int) -> Timestamp:
  return Timestamp(micros=millis * 1000)


class _ParseFn(beam.DoFn):

  def __init__(self):
    self.received = Metrics.counter('tidemark', 'received')
    self.invalid = Metrics.counter('tidemark', 'invalid')

  def process(self, message: RawMessage) -> Iterable:
    self.received.inc()
    try:
      fields = parse_payload(message.data)
    except InvalidPayload as e:
      self.invalid.inc()
      yield pvalue.TaggedOutput(
          INVALID_TAG,
          DeadLetter(INVALID, message.source, message.data, str(e), message.message_id))
      return
    event = Event(
        *fields, message.source, message.data, message.arrival_watermark, message.message_id)
    yield TimestampedValue(event, millis_to_timestamp(event.event_time))


class ParseEvents(beam.PTransform):
  """Payloads to timestamped Events; rule breakers to the ``invalid`` output.

  Returns a DoOutputsTuple with ``events`` (Event, stamped with its event
  time) and ``invalid`` (DeadLetter with reason ``invalid``).
  """

  def expand(self, messages: beam.PCollection[RawMessage]):
    outputs = messages | 'Validate' >> beam.ParDo(_ParseFn()).with_outputs(
        INVALID_TAG, main='events')
    return outputs
