"""What each runner can do: the one table Tidemark consults about runners.

Every runner-dependent choice (where workers write, whether a replay runs in
bulk, what the Pub/Sub read may ask for, whether a TestStream may advance
processing time) reads a field of this table, by the runner's class name;
the options Tidemark sets per runner (``use_every_core``, ``tune_live_bundles``,
``finish_bundles_at_checkpoints``, ``reach_pubsub_emulator``) are here too.
"""

from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional, Union

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

class Capabilities(NamedTuple):
  #: The Python SDK's own runner: its workers are this process or its children,
  #: so they write on this machine (and group in Python, not in Java).
  in_process: bool
  #: A replay runs in bulk unless told otherwise: the DirectRunner's streaming
  #: mode manages a few hundred events per second.
  bulk_replays: bool
  #: ReadFromPubSub's ``id_label`` is honoured (the runner drops redeliveries);
  #: the DirectRunner refuses it.
  pubsub_id_label: bool
  #: Pub/Sub is read by Beam's Java PubsubIO through the expansion service: the
  #: runner does not run Python's ReadFromPubSub (portable Flink), but runs Java
  #: sources, and drops the redeliveries of a message id itself.
  java_pubsub_read: bool
  #: The Pub/Sub watermark is the wall clock, not the event times (the DirectRunner).
  wall_clock_pubsub_watermark: bool
  #: A TestStream may advance processing time (Flink refuses: "Advancing
  #: Processing time is not supported by the Flink Runner").
  test_stream_processing_time: bool
  #: Its workers may run on other machines (Dataflow): a local OUTPUT_DIR would
  #: be a different folder on each, so the outputs go to an object store.
  remote_workers: bool


_DIRECT = Capabilities(
    in_process=True, bulk_replays=True, pubsub_id_label=False, java_pubsub_read=False,
    wall_clock_pubsub_watermark=True, test_stream_processing_time=True, remote_workers=False)
_FLINK = Capabilities(
    in_process=False, bulk_replays=False, pubsub_id_label=False, java_pubsub_read=True,
    wall_clock_pubsub_watermark=False, test_stream_processing_time=False,
    remote_workers=False)  # a Flink cluster here, or one that mounts OUTPUT_DIR
#: Any runner not named here (Dataflow, ...).
OTHER = Capabilities(
    in_process=False, bulk_replays=False, pubsub_id_label=True, java_pubsub_read=False,
    wall_clock_pubsub_watermark=False, test_stream_processing_time=True, remote_workers=True)

RUNNERS: Dict[str, Capabilities] = {
    'DirectRunner': _DIRECT,
    'BundleBasedDirectRunner': _DIRECT,
    'SwitchingDirectRunner': _DIRECT,
    'FlinkRunner': _FLINK,
    'PortableRunner': _FLINK,  # Tidemark's portable runner is Flink's job server
}


def runner_name(options: Optional[PipelineOptions]) -> str:
  """The runner's class name (``DirectRunner`` when none is given)."""
  runner = options.view_as(StandardOptions).runner if options is not None else None
  runner = runner or 'DirectRunner'
  if not isinstance(runner, str):
    runner = type(runner).__name__
  return runner.rsplit('.', 1)[-1]


def capabilities(runner: Union[str, PipelineOptions, None]) -> Capabilities:
  """The table's row for a runner name (or the runner of ``options``)."""
  name = runner if isinstance(runner, str) else runner_name(runner)
  return RUNNERS.get(name.rsplit('.', 1)[-1], OTHER)


#: Beam Java's credential factory that gives no credentials (an emulator checks none).
NO_CREDENTIALS = 'org.apache.beam.sdk.extensions.gcp.auth.NoopCredentialFactory'

#: A bulk replay this large runs on one DirectRunner worker process per core
#: (below it, starting the processes costs more than they save).
PARALLEL_BULK_MESSAGES = 200_000


def use_every_core(options: PipelineOptions, argv: List[str], messages: int) -> None:
  """A large bulk replay on the DirectRunner: one worker process per core,
  unless ``--direct_num_workers`` was given."""
  if (not capabilities(options).bulk_replays or
      messages < PARALLEL_BULK_MESSAGES or
      any(a.startswith('--direct_num_workers') for a in argv)):
    return
  direct = options.view_as(DirectOptions)
  direct.direct_num_workers = os.cpu_count() or 1
  direct.direct_running_mode = 'multi_processing'


#: Flink's bundle time for live sources (ms; Flink's default is 1,000): each
#: fused stage holds its output watermark until its bundle ends, so a pane's
#: latency grows with it (p95 3.8 s at 250 ms, 8.7 s at 1,000 ms, measured).
LIVE_MAX_BUNDLE_TIME_MS = '250'


def tune_live_bundles(options: PipelineOptions, unbounded: bool) -> None:
  """Shorter bundles for an unbounded source (``unbounded``) on a portable
  runner, unless ``--max_bundle_time_mills`` was given."""
  from pipeline.settings.options import FlinkRunnerJavaOptions
  flink = options.view_as(FlinkRunnerJavaOptions)
  if (unbounded and not capabilities(options).in_process
      and flink.max_bundle_time_mills is None):
    flink.max_bundle_time_mills = LIVE_MAX_BUNDLE_TIME_MS


def finish_bundles_at_checkpoints(options: PipelineOptions, checkpointed: bool) -> None:
  """On a checkpointed portable run, has Flink finish each bundle before a
  checkpoint's barrier (``--finish_bundle_before_checkpointing``).

  Without it (Beam 2.62.0, ``DoFnOperator.snapshotState``) Flink finishes the
  bundle *inside* the snapshot and buffers what the bundle still emits (the
  window partials a bundle hands on when it ends) until after the barrier, but
  may pass the stage's new output watermark on first: the windowing downstream
  then finds those partials late and drops events the gate admitted (measured:
  8 and 9 of ~100,000 events, Kafka at 1,000 events/s, 10 s windows, 2 s
  checkpoints; none with this option). ``ConfigError`` refuses turning it off.
  """
  from pipeline.settings.options import FlinkRunnerJavaOptions
  if not checkpointed or capabilities(options).in_process:
    return
  flink = options.view_as(FlinkRunnerJavaOptions)
  if flink.finish_bundle_before_checkpointing is None:
    flink.finish_bundle_before_checkpointing = 'true'


def reach_pubsub_emulator(options: PipelineOptions, java_pubsub_read: bool) -> None:
  """Points the Java Pub/Sub read at the emulator the launcher's
  ``PUBSUB_EMULATOR_HOST`` names, without Google credentials: Java PubsubIO
  ignores that variable and takes its root URL from ``pubsubRootUrl`` (Python's
  own ``--pubsub_root_url`` does not reach it by that name). Nothing is changed
  without the variable or where ``--java_pubsub_root_url`` was given."""
  from pipeline.settings.options import JavaPubsubOptions
  emulator = os.environ.get('PUBSUB_EMULATOR_HOST')
  java = options.view_as(JavaPubsubOptions)
  if not java_pubsub_read or not emulator or java.pubsub_root_url is not None:
    return
  java.pubsub_root_url = f'http://{emulator}'
  if java.credential_factory_class is None:
    java.credential_factory_class = NO_CREDENTIALS

