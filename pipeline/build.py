"""``build``: the whole Tidemark pipeline, read top to bottom."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import apache_beam as beam

from pipeline.config import RunConfig, parse_aggregates_topic
from transforms.accounting import CountOutcomes, ReportProgress
from transforms.aggregate import AggregateWindows
from transforms.bulk import (
    AggregateWindowsInBulk, CountChunkOutcomes, ParseChunks, ReadReplayInChunks,
    RouteChunksTooLate)
from transforms.dedup import DeduplicateEvents
from transforms.diagnostics import SampleMemory
from transforms.lateness import RouteTooLate
from transforms.model import AGGREGATED, DUPLICATE, INVALID, RECEIVED, TOO_LATE
from transforms.parse import ParseEvents
from transforms.replay import index_replay
from transforms.sinks import (
    PublishAggregatesToKafka, PublishAggregatesToPubSub, UpsertPostgres, UpsertSqlite, WriteAggregatesToBigQuery, WriteDeadLettersToBigQuery,
    WriteDeadLettersToPostgres, WriteJsonLines, WriteLatestJson)
from transforms.sources import ReadKafkaEvents, ReadPubSubEvents, ReadReplay


class Built(NamedTuple):
  """The pipeline's outputs, for tests and for the launcher."""
  aggregates: beam.PCollection
  dead_letters: beam.PCollection
  accounting: beam.PCollection


def read_source(config: RunConfig) -> beam.PTransform:
  """The source transform; a replay file is read and checked here, before
  anything runs (ReplayError names a bad line)."""
  if config.source_kind == 'replay' and config.replay_mode == 'bulk':
    return ReadReplayInChunks(index_replay(config.source_target))
  if config.source_kind == 'replay':
    return ReadReplay(config.source_target, config.replay_processing_time)
  if config.source_kind == 'pubsub':
    return ReadPubSubEvents(config.pubsub_subscriptions, id_label=config.pubsub_id_label)
  if config.source_kind == 'kafka':
    bootstrap, sources = config.kafka
    return ReadKafkaEvents(
        bootstrap, sources, config.kafka_expansion_service,
        max_num_records=config.kafka_max_records)
  raise ValueError(f'unknown source {config.source!r}')


def database_sinks(
    config: RunConfig) -> Tuple[Optional[beam.PTransform], Optional[beam.PTransform]]:
  """``(aggregates writer, dead-letter writer)`` of ``--sink`` (None, None for files)."""
  if config.sink == 'postgres':
    return (UpsertPostgres(config.postgres_dsn, config.postgres_table, config.customer_id),
            WriteDeadLettersToPostgres(config.postgres_dsn, config.postgres_dead_letter_table))
  if config.sink == 'bigquery':
    return (WriteAggregatesToBigQuery(
        config.bigquery_table, config.bigquery_dead_letter_table, config.customer_id,
        config.bigquery_expansion_service),
            WriteDeadLettersToBigQuery(
                config.bigquery_dead_letter_table, config.bigquery_expansion_service))
  return None, None


def topic_sink(config: RunConfig) -> Optional[beam.PTransform]:
  """The publisher of ``--aggregates-topic`` (None when unset)."""
  if not config.aggregates_topic:
    return None
  kind, bootstrap, topic = parse_aggregates_topic(config.aggregates_topic)
  if kind == 'kafka':
    return PublishAggregatesToKafka(bootstrap, topic)
  return PublishAggregatesToPubSub(topic)


def build(p: beam.Pipeline, config: RunConfig, source: beam.PTransform) -> Built:
  """read → parse → route late → dedup → window & aggregate → write."""
  size, lateness = config.window_size_s, config.allowed_lateness_s

  messages = p | 'Read' >> source
  if isinstance(source, ReadReplay):
    messages = messages | 'Progress' >> ReportProgress(source.replay.messages)
  parsed = messages | 'Parse' >> ParseEvents()
  routed = parsed.events | 'RouteTooLate' >> RouteTooLate(
      size, lateness, config.shards, source.arrival_watermarks)
  unique = routed.on_time | 'Deduplicate' >> DeduplicateEvents(size, lateness)
  aggregates = unique.unique | 'Aggregate' >> AggregateWindows(
      size, lateness, config.early_firing_s)
  dead_letters = (parsed.invalid, routed.too_late) | 'DeadLetters' >> beam.Flatten()
  accounting = {
      RECEIVED: messages,
      INVALID: parsed.invalid,
      TOO_LATE: routed.too_late,
      DUPLICATE: unique.duplicate,
      AGGREGATED: unique.unique,
  } | 'Accounting' >> CountOutcomes(config.accounting_update_s)

  write(config, aggregates, dead_letters, accounting)
  if config.sample_memory_s:
    (parsed.events
     | 'SampleMemory' >> SampleMemory(config.sample_memory_s)
     | 'WriteMemorySamples' >> WriteJsonLines(config.memory_path))
  return Built(aggregates, dead_letters, accounting)


def build_bulk(p: beam.Pipeline, config: RunConfig, source: ReadReplayInChunks) -> Built:
  """The same flow over a whole replay at once, on a batch runner: chunks of
  messages carry the watermark and processing time of their arrival, and the
  rules are applied to the replay's timeline (transforms/bulk.py)."""
  size, lateness = config.window_size_s, config.allowed_lateness_s

  chunks = p | 'Read' >> source
  parsed = chunks | 'Parse' >> ParseChunks()
  routed = parsed.events | 'RouteTooLate' >> RouteChunksTooLate(size, lateness)
  windows = routed.on_time | 'DedupAndAggregate' >> AggregateWindowsInBulk(
      size, lateness, config.early_firing_s, source.index)
  dead_letters = (
      (parsed.invalid, routed.too_late)
      | 'DeadLetters' >> beam.Flatten()
      | 'OnePerMessage' >> beam.FlatMap(lambda letters: letters))
  accounting = {
      RECEIVED: chunks,
      INVALID: parsed.invalid,
      TOO_LATE: routed.too_late,
      DUPLICATE: windows.duplicate,
      AGGREGATED: windows.aggregated,
  } | 'Accounting' >> CountChunkOutcomes()

  write(config, windows.panes, dead_letters, accounting)
  return Built(windows.panes, dead_letters, accounting)


def write(config: RunConfig, aggregates: beam.PCollection, dead_letters: beam.PCollection,
          accounting: beam.PCollection) -> None:
  """Every configured output: files, SQLite, a topic, a database."""
  aggregates | 'WriteAggregates' >> WriteJsonLines(config.aggregates_path)
  if config.sqlite_path:
    aggregates | 'UpsertFinalAggregates' >> UpsertSqlite(config.sqlite_path)
  publish = topic_sink(config)
  if publish is not None:
    aggregates | 'PublishAggregates' >> publish
  dead_letters | 'WriteDeadLetters' >> WriteJsonLines(config.dead_letter_path)
  accounting | 'WriteAccounting' >> WriteLatestJson(config.accounting_path)
  upsert, append = database_sinks(config)
  if upsert is not None:
    refused = aggregates | f'Upsert{config.sink.title()}' >> upsert
    refused | 'WriteRefused' >> WriteJsonLines(config.refused_path)
    dead_letters | f'DeadLetters{config.sink.title()}' >> append
