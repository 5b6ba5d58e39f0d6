"""``build``: the whole Tidemark pipeline, read top to bottom."""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from pipeline.settings.config import RunConfig, parse_aggregates_topic
from transforms.flow.accounting import (
    CountOutcomes, ReportProgress, SumOutcomes, accounting_progress)
from transforms.flow.bulk import (
    AdmitChunks, AggregateWindowsInBulk, DescribeArrivals, ParseChunks, ReadReplayInChunks)
from transforms.flow.diagnostics import SampleMemory
from transforms.rules.model import AGGREGATED, DUPLICATE, INVALID, RECEIVED, TOO_LATE
from transforms.flow.parse import ParseEvents
from transforms.rules.replay_index import index_replay
from transforms.flow.rollup import Rollup
from transforms.connectors.bigquery import WriteAggregatesToBigQuery, WriteDeadLettersToBigQuery
from transforms.connectors.writers import WriteJsonLines, WriteLatestJson, is_local
from transforms.connectors.postgres import UpsertPostgres, WriteDeadLettersToPostgres
from transforms.connectors.sinks import UpsertSqlite
from transforms.flow.stable import AwaitCheckpoint
from transforms.connectors.topics import PublishAggregatesToKafka, PublishAggregatesToPubSub
from transforms.connectors.pubsub import ReadPubSubEvents
from transforms.connectors.sources import EventSource, ReadKafkaEvents, ReadReplay


class Built(NamedTuple):
  """The pipeline's outputs, for tests and for the launcher: the primary
  window size's, and in ``rollups`` each rollup's (dead letters: too_late only)."""
  aggregates: beam.PCollection
  dead_letters: beam.PCollection
  accounting: beam.PCollection
  rollups: Tuple['Built', ...] = ()


#: The first word of a rollup's step labels (``Rollup3600s``); print_metrics
#: leaves those steps out.
ROLLUP_PREFIX = 'Rollup'


def read_source(config: RunConfig) -> Union[EventSource, ReadReplayInChunks]:
  """The source transform; a replay file is read and checked here, before
  anything runs (ReplayError names a bad line)."""
  if config.bulk:
    return ReadReplayInChunks(index_replay(config.source_target))
  if config.source_kind == 'replay':
    return ReadReplay(config.source_target, config.replay_processing_time)
  if config.source_kind == 'pubsub':
    return ReadPubSubEvents(
        config.pubsub_subscriptions, id_label=config.pubsub_id_label,
        expansion_service=config.pubsub_expansion_service,
        watermark_delay_s=config.expected_skew_s,
        max_num_records=config.pubsub_max_messages)
  if config.source_kind == 'kafka':
    bootstrap, sources = config.kafka
    return ReadKafkaEvents(
        bootstrap, sources, config.kafka_expansion_service,
        max_num_records=config.kafka_max_records,
        consumer_group=config.kafka_consumer_group)
  raise ValueError(f'unknown source {config.source!r}')


def database_sinks(
    config: RunConfig) -> Tuple[Optional[beam.PTransform], Optional[beam.PTransform]]:
  """``(aggregates writer, dead-letter writer)`` of ``--sink`` (None, None for files)."""
  if config.sink == 'postgres':
    assert config.postgres_dsn is not None  # RunConfig requires it for this sink
    return (UpsertPostgres(config.postgres_dsn, config.postgres_table, config.customer_id,
                           in_fire_order=config.rows_before_checkpoint),
            WriteDeadLettersToPostgres(config.postgres_dsn, config.postgres_dead_letter_table,
                                       config.customer_id,
                                       window_size_ms=config.window_size_s * 1000))
  if config.sink == 'bigquery':
    # RunConfig requires both tables for this sink
    assert config.bigquery_table is not None and config.bigquery_dead_letter_table is not None
    return (WriteAggregatesToBigQuery(
        config.bigquery_table, config.bigquery_dead_letter_table, config.customer_id,
        config.bigquery_expansion_service),
            WriteDeadLettersToBigQuery(
                config.bigquery_dead_letter_table, config.bigquery_expansion_service,
                config.customer_id))
  return None, None


def topic_sink(config: RunConfig) -> Optional[beam.PTransform]:
  """The publisher of ``--aggregates-topic`` (None when unset)."""
  if not config.aggregates_topic:
    return None
  kind, bootstrap, topic = parse_aggregates_topic(config.aggregates_topic)
  if kind == 'kafka':
    return PublishAggregatesToKafka(bootstrap, topic)
  return PublishAggregatesToPubSub(topic)


class WriteWindowOutputs(beam.PTransform):
  """One window size's outputs to the places ``config`` names: aggregates
  (JSON lines, SQLite, database), dead letters (JSON lines, database), the
  accounting record and, with ``duplicates``, the copies dedup dropped. On a
  checkpointed run every output first waits for its checkpoint, except the
  rows of a database that can take them at once
  (``RunConfig.rows_before_checkpoint``).

  Takes ``{'aggregates', 'dead_letters', 'accounting', 'duplicates'}``.
  """

  def __init__(self, config: RunConfig, duplicates: bool):
    super().__init__()
    self._config = config
    self._duplicates = duplicates
    self._upsert, self._append = database_sinks(config)

  def expand(self, outputs: Dict[str, beam.PCollection]) -> beam.pvalue.PDone:
    config = self._config
    fired = outputs
    if config.checkpointed:  # sinks see one history only, whatever is restored
      outputs = {name: pcoll | f'{name.title()}AwaitCheckpoint' >> AwaitCheckpoint()
                 for name, pcoll in outputs.items()}
    aggregates, dead_letters = outputs['aggregates'], outputs['dead_letters']

    def lines(path: str) -> WriteJsonLines:
      # after a restore, a local file is cut back to its checkpoint before the
      # replayed input appends again: every line once
      return WriteJsonLines(path, exactly_once=config.checkpointed and is_local(path))

    aggregates | 'WriteAggregates' >> lines(config.aggregates_path)
    if config.sqlite_path:
      aggregates | 'UpsertFinalAggregates' >> UpsertSqlite(config.sqlite_path)
    dead_letters | 'WriteDeadLetters' >> lines(config.dead_letter_path)
    outputs['accounting'] | 'WriteAccounting' >> WriteLatestJson(
        config.accounting_path, order=accounting_progress)
    if self._duplicates:
      outputs['duplicates'] | 'WriteDuplicates' >> lines(config.duplicates_path)
    upsert, append = self._upsert, self._append
    if upsert is not None and append is not None:
      if config.rows_before_checkpoint:
        refused = (fired['aggregates']
                   | f'Upsert{config.sink.title()}' >> upsert
                   | 'RefusedRowsAwaitCheckpoint' >> AwaitCheckpoint())
      else:
        refused = aggregates | f'Upsert{config.sink.title()}' >> upsert
      letters = dead_letters | f'DeadLetters{config.sink.title()}' >> append
      if config.sink in ('postgres', 'bigquery'):  # and other customers' dead letters
        refused = (
            (refused | 'RefusedRowsUnwindowed' >> beam.WindowInto(GlobalWindows()),
             letters | 'RefusedLettersUnwindowed' >> beam.WindowInto(GlobalWindows()))
            | 'AllRefused' >> beam.Flatten())
      refused | 'WriteRefused' >> lines(config.refused_path)
    return beam.pvalue.PDone(aggregates.pipeline)


def aggregate_window_size(
    config: RunConfig, label: str, messages: beam.PCollection,
    parsed: beam.pvalue.DoOutputsTuple, with_invalid: bool, with_duplicates: bool) -> Built:
  """route late → dedup → window & aggregate → write, for the window size and
  lateness of ``config``. Every window size counts every message, so each
  accounting adds up on its own; ``with_invalid`` puts the invalid payloads in
  its dead letters (the primary's: they are no window size's)."""
  windows = parsed.events | label >> Rollup(config.window, config.shards, config.early_firing_s)
  dead_letters = ((parsed.invalid, windows.too_late) if with_invalid else (windows.too_late,)
                  ) | f'{label}DeadLetters' >> beam.Flatten()
  accounting = {
      RECEIVED: messages,
      INVALID: parsed.invalid,
      TOO_LATE: windows.too_late,
      DUPLICATE: windows.duplicates,
      AGGREGATED: windows.aggregated,
  } | f'{label}Accounting' >> CountOutcomes(config.accounting_update_s)
  _ = {
      'aggregates': windows.aggregates,
      'dead_letters': dead_letters,
      'accounting': accounting,
      'duplicates': windows.duplicates,
  } | f'{label}Write' >> WriteWindowOutputs(config, with_duplicates)
  return Built(windows.aggregates, dead_letters, accounting)


def build(p: beam.Pipeline, config: RunConfig, source: EventSource) -> Built:
  """read → parse → for the window size and every rollup: route late → dedup
  → window & aggregate → write."""
  messages = p | 'Read' >> source
  if source.expected_messages is not None:
    messages = messages | 'Progress' >> ReportProgress(source.expected_messages)
  parsed = messages | 'Parse' >> ParseEvents()
  # Rollups are reconciled against the primary windows event by event, which
  # needs every copy each size dropped as a duplicate too (duplicates.jsonl).
  reconciled = bool(config.rollups)
  primary = aggregate_window_size(
      config, 'Primary', messages, parsed, with_invalid=True,
      with_duplicates=reconciled)
  rollups = tuple(
      aggregate_window_size(
          rollup, f'{ROLLUP_PREFIX}{rollup.window_size_s}s', messages, parsed,
          with_invalid=False, with_duplicates=True)
      for rollup in config.rollup_configs)

  publish = topic_sink(config)
  if publish is not None:  # the primary's panes only: consumers key them by window_start
    panes = primary.aggregates
    if config.checkpointed:
      panes = panes | 'PublishAwaitCheckpoint' >> AwaitCheckpoint()
    panes | 'PublishAggregates' >> publish
  if config.sample_memory_s:
    (parsed.events
     | 'SampleMemory' >> SampleMemory(config.sample_memory_s)
     | 'WriteMemorySamples' >> WriteJsonLines(config.memory_path))
  return primary._replace(rollups=rollups)


def build_bulk(p: beam.Pipeline, config: RunConfig, source: ReadReplayInChunks) -> Built:
  """The same flow over a whole replay at once, on a batch runner: read →
  parse → route late → dedup → window & aggregate → write, in chunks of
  messages that carry the watermark and processing time of their arrival, the
  rules applied along the replay's timeline (transforms/flow/bulk.py)."""

  chunks = p | 'Read' >> source | 'Progress' >> ReportProgress(source.index.messages, chunks=True)
  parsed = chunks | 'Parse' >> ParseChunks(source.index.digest)
  admitted = parsed | 'RouteLateAndDedup' >> AdmitChunks(config.window, source.index)
  panes = admitted.admitted | 'Aggregate' >> AggregateWindowsInBulk(
      config.window, config.early_firing_s, source.index)
  dead_letters = admitted.dead_letters | 'OnePerMessage' >> beam.FlatMap(lambda letters: letters)
  accounting = admitted.counts | 'Accounting' >> SumOutcomes()

  _ = {
      'aggregates': panes,
      'dead_letters': dead_letters,
      'accounting': accounting,
  } | 'Write' >> WriteWindowOutputs(config, duplicates=False)
  (admitted.late
   | 'Arrivals' >> DescribeArrivals(source.index.arrivals)
   | 'WriteArrivals' >> WriteLatestJson(config.arrivals_path))
  publish = topic_sink(config)
  if publish is not None:
    panes | 'PublishAggregates' >> publish
  return Built(panes, dead_letters, accounting)


def is_streaming(config: RunConfig) -> bool:
  """Replays, Pub/Sub and Kafka are streams, watermarks and all; a bulk replay
  knows its whole timeline in advance and runs as a batch (``RunConfig.bulk``)."""
  return not config.bulk


def build_run(p: beam.Pipeline, config: RunConfig, source) -> Built:
  """The graph of the run's flow (``RunConfig.bulk``): the streaming pipeline
  (``build``), or for a bulk replay the same rules over the whole file
  (``build_bulk``)."""
  return (build_bulk if config.bulk else build)(p, config, source)
