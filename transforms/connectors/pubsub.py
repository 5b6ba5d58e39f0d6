"""The Pub/Sub source: one subscription per source name, each message a
RawMessage stamped with the event time of its timestamp attribute."""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage, ReadFromPubSub
from apache_beam.metrics import Metrics
from apache_beam.transforms.external import ExternalTransform, ImplicitSchemaPayloadBuilder
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Timestamp
from google.pubsub_v1 import types as pubsub_types

from transforms.connectors.sources import EventSource, decode_payload
from transforms.rules.model import RawMessage, message_identity

#: Subscription paths as Pub/Sub names them.
_PROJECT_ID = re.compile(r'[a-z][a-z0-9-]{4,28}[a-z0-9]|[a-z0-9.:-]{1,100}')
_SUBSCRIPTION_ID = re.compile(r'[A-Za-z][A-Za-z0-9._~%+-]{2,254}')


def check_subscription_path(path: str) -> None:
  """Raises ValueError unless ``path`` is ``projects/P/subscriptions/S``."""
  parts = path.split('/')
  if (len(parts) != 4 or parts[0] != 'projects' or parts[2] != 'subscriptions' or
      not _PROJECT_ID.fullmatch(parts[1]) or not _SUBSCRIPTION_ID.fullmatch(parts[3]) or
      parts[3].lower().startswith('goog')):
    raise ValueError(
        f'{path!r} is not a subscription path projects/PROJECT/subscriptions/NAME')


def timestamp_from_attribute(value: Optional[str]) -> Optional[Timestamp]:
  """The instant in a ``ts`` attribute (epoch ms, or RFC 3339), or None when it
  is missing or not a representable instant."""
  if not value:
    return None
  try:
    stamp = Timestamp(micros=int(value) * 1000)
  except (ValueError, OverflowError):
    try:
      stamp = Timestamp.from_rfc3339(value)
    except (ValueError, OverflowError):
      return None
  if not MIN_TIMESTAMP < stamp < MAX_TIMESTAMP:
    return None
  return stamp


class _StampFromAttributeFn(beam.DoFn):
  """PubsubMessage → RawMessage, stamped with the event time from the timestamp
  attribute; without a usable one the reader's timestamp (publish time) stays,
  and parsing decides from the payload."""

  def __init__(self, source: str, subscription: str, timestamp_attribute: str):
    self._source = source
    self._subscription = subscription
    self._attribute = timestamp_attribute
    self.unstamped = Metrics.counter('tidemark', 'pubsub_without_timestamp_attribute')

  def process(self, message: PubsubMessage) -> Iterable:
    raw = RawMessage(
        self._source, decode_payload(message.data or b''), None,
        message_identity('pubsub', self._subscription, message.message_id)
        if message.message_id else None)
    stamp = timestamp_from_attribute((message.attributes or {}).get(self._attribute))
    if stamp is None:
      self.unstamped.inc()
      yield raw
    else:
      yield TimestampedValue(raw, stamp)


#: Tidemark's Java Pub/Sub read (java/src/main/java/tidemark/pubsub): one
#: subscription's messages as the bytes of their ``google.pubsub.v1`` proto.
PUBSUB_READ_URN = 'beam:transform:tidemark:pubsub_read_events:v1'

#: How far (s) the Java read's watermark trails, by default, the newest event
#: time read: a message read up to this long after a newer one is still on time
#: (later, the gate judges it late or too late). A run sets it with
#: ``--expected-skew``.
WATERMARK_DELAY_S = 2

_PROTO = pubsub_types.PubsubMessage.pb()


def message_from_proto(data: bytes) -> PubsubMessage:
  """A ``google.pubsub.v1.PubsubMessage`` proto's bytes as Beam's PubsubMessage."""
  proto = _PROTO.FromString(data)
  return PubsubMessage(proto.data, dict(proto.attributes), proto.message_id or None)


class ReadPubSubEvents(EventSource):
  """Reads one Pub/Sub subscription per source name and flattens them into
  RawMessage(source, payload), identified by subscription and message id.

  Payloads that are not UTF-8 are kept losslessly (see ``decode_payload``).
  Each message is stamped with the event time of its ``timestamp_attribute``
  (the publisher's); a message whose attribute is missing or malformed keeps
  the reader's time and still reaches parsing, which decides its outcome and
  window from the payload. One bad attribute never stops the read.

  Two reads give the same messages:

  * without ``expansion_service``, Beam's Python ``ReadFromPubSub`` (the
    DirectRunner; Dataflow runs it natively), stamped in a DoFn because the
    DirectRunner's reader raises on a malformed attribute.
    ``reader_timestamps=True`` also hands the attribute to that reader, so a
    runner whose watermark follows it (Dataflow) estimates event-time
    watermarks. ``id_label`` asks the runner to drop redeliveries by that
    attribute; only runners that support it may set it.
  * with ``expansion_service`` (the HOST:PORT of a Java expansion service that
    serves Tidemark's Java classes), Beam's Java ``PubsubIO`` (``PUBSUB_READ_URN``,
    java/src), for portable runners that run Java sources but not the Python read
    (Flink). Its reader stamps every message with the highest event time read
    so far (the attributes'), and its watermark is the stamp it read
    ``watermark_delay_s`` earlier (None: ``WATERMARK_DELAY_S``), so the
    watermark follows event time and neither a straggler nor a message without
    a usable attribute holds it back;
    messages are acknowledged when the runner finalizes the checkpoint that
    holds them. With ``max_num_records`` it reads that many messages from each
    subscription and ends (Beam's bounded read of an unbounded source: the
    messages are acknowledged as the read ends, redeliveries dropped by
    message id), so the job's windows close and the run finishes.
  """

  def __init__(
      self,
      subscriptions: Mapping[str, str],
      timestamp_attribute: str = 'ts',
      id_label: Optional[str] = None,
      reader_timestamps: bool = False,
      expansion_service: Optional[str] = None,
      watermark_delay_s: Optional[int] = None,
      max_num_records: Optional[int] = None):
    super().__init__()
    if not subscriptions:
      raise ValueError('subscriptions must name at least one source')
    for source, path in subscriptions.items():
      if not isinstance(source, str) or not source:
        raise ValueError(f'source names must be non-empty strings, got {source!r}')
      check_subscription_path(path)
    if len(set(subscriptions.values())) != len(subscriptions):
      raise ValueError('each source needs its own subscription')
    if not timestamp_attribute:
      raise ValueError('timestamp_attribute must be set')
    if id_label is not None and not id_label:
      raise ValueError('id_label must be None or a non-empty attribute name')
    if expansion_service is not None and (id_label or reader_timestamps):
      raise ValueError('the Java read stamps by the timestamp attribute itself and takes no '
                       'id_label (redeliveries are dropped by message id, duplicates by the gate)')
    if watermark_delay_s is None:
      watermark_delay_s = WATERMARK_DELAY_S
    elif watermark_delay_s < 0:
      raise ValueError(f'watermark_delay_s must not be negative, got {watermark_delay_s!r}')
    if max_num_records is not None and (expansion_service is None or max_num_records <= 0):
      raise ValueError('max_num_records must be positive, and needs the Java read '
                       f'(expansion_service), got {max_num_records!r}')
    self.subscriptions = dict(subscriptions)
    self._timestamp_attribute = timestamp_attribute
    self._id_label = id_label
    self._reader_timestamps = reader_timestamps
    self._expansion_service = expansion_service
    self.watermark_delay_s = watermark_delay_s
    self.max_num_records = max_num_records

  def java_read_config(self, subscription: str) -> dict:
    """The fields of the Java read's expansion request for ``subscription``
    (a field that is None is left out: without ``max_num_records`` the read is
    unbounded)."""
    return {
        'subscription': subscription,
        'timestamp_attribute': self._timestamp_attribute,
        'watermark_delay_ms': self.watermark_delay_s * 1000,
        'max_num_records': self.max_num_records}

  def _read(self, pbegin: beam.pvalue.PBegin, source: str,
            subscription: str) -> beam.PCollection[PubsubMessage]:
    if self._expansion_service is None:
      return pbegin | f'Read_{source}' >> ReadFromPubSub(
          subscription=subscription,
          with_attributes=True,
          id_label=self._id_label,
          timestamp_attribute=(
              self._timestamp_attribute if self._reader_timestamps else None))
    return (
        pbegin
        | f'Read_{source}' >> ExternalTransform(
            PUBSUB_READ_URN, ImplicitSchemaPayloadBuilder(self.java_read_config(subscription)),
            self._expansion_service)
        | f'FromProto_{source}' >> beam.Map(message_from_proto).with_output_types(PubsubMessage))

  def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[RawMessage]:
    per_source = []
    for source, subscription in sorted(self.subscriptions.items()):
      per_source.append(
          self._read(pbegin, source, subscription)
          | f'Stamp_{source}' >> beam.ParDo(
              _StampFromAttributeFn(source, subscription, self._timestamp_attribute)
          ).with_output_types(RawMessage))
    return tuple(per_source) | 'AllSources' >> beam.Flatten()
