"""Launching a run: options → config → build → run → reconcile → report."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import re
import resource
import signal
import sys
import threading
import time
from typing import Callable, List, Optional, Union

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    PipelineOptions, PortableOptions, StandardOptions)

from pipeline.readback import report
from pipeline.readback.metrics import METRICS_NAME
from pipeline.launch.build import build, build_run, is_streaming, read_source
from pipeline.settings.checks import ConfigError
from pipeline.settings.config import RunConfig, watermark_risks
from pipeline.settings.options import FlinkRunnerJavaOptions
from pipeline.settings.runners import (
    capabilities, finish_bundles_at_checkpoints, reach_pubsub_emulator, runner_name,
    tune_live_bundles, use_every_core)
from pipeline.readback.reconciliation import (
    Reconciliation, RollupAccounting, reconcile_run, refused_lines,
    rollup_lines)
from transforms.flow.accounting import LAUNCHER_PID
from transforms.flow.bulk import ReadReplayInChunks
from pipeline.runfolder.files import (
    COMPLETE, FAILED, INCOMPLETE, RUNNING, STOPPED, FolderBusy, RunFolder, create_empty,
    write_json_atomically)
from transforms.rules.model import CATEGORIES
from pipeline.runfolder import names
from pipeline.runfolder.objects import ObjectRunFolder
from transforms.connectors.writers import is_local
from transforms.rules.replay import ReplayError
from pipeline.launch.submit import (
    check_flink_job_server, cluster_master, detach, detached_config, submit_detached)
from pipeline.launch.summary import (
    RUNNER_LATE_DROPS, accounting_warnings, print_accounting, print_metrics, runner_late_drops,
    source_warnings)


def _redact(dsn: Optional[str]) -> Optional[str]:
  """``dsn`` without its password."""
  return dsn and re.sub(r'(password\s*=\s*)\S+', r'\1***',
                        re.sub(r'(://[^:/@]*:)[^@]*@', r'\1***@', dsn))


def _replay_timeline(source):
  """A replay source's index (bulk) or compiled replay (stream); None if it has neither."""
  return getattr(source, 'index', None) or getattr(source, 'replay', None)


def describe_input(config: RunConfig, source=None) -> dict:
  """What the run reads: a replay's path and size (its sha256 is added at the
  end), Kafka's bootstrap servers and topics, or Pub/Sub subscriptions."""
  kind = config.source_kind
  if kind == 'replay':
    timeline = _replay_timeline(source)
    return {'kind': kind, 'path': os.path.abspath(config.source_target),
            'size_bytes': os.path.getsize(config.source_target),
            'messages': getattr(timeline, 'messages', None),
            'sources': list(getattr(timeline, 'sources', ()))}
  if kind == 'kafka':
    bootstrap, topics = config.kafka
    return {'kind': kind, 'bootstrap': bootstrap, 'topics': topics,
            'max_records_per_topic': config.kafka_max_records}
  return {'kind': kind, 'subscriptions': config.pubsub_subscriptions,
          'max_messages_per_subscription': config.pubsub_max_messages}



def settle_live_options(options: PipelineOptions, config: RunConfig) -> None:
  """What a run of ``config`` sets on its runner's options, for every pipeline
  that reads a live source (the product, and the benchmarks' ceiling beside it):
  short bundles, bundles finished before checkpoints, the emulator's address."""
  tune_live_bundles(options, config.unbounded)
  finish_bundles_at_checkpoints(options, config.checkpointed)
  reach_pubsub_emulator(options, config.pubsub_expansion_service is not None)

@dataclasses.dataclass
class StagedRun:
  """A run in progress: its folder (pipeline/runfolder/files.py), the config whose
  paths point into the staging folder, and the job once it started."""
  folder: Union[RunFolder, ObjectRunFolder]
  config: RunConfig
  #: The config whose paths the launcher reads the staged files at (``config``
  #: itself, unless OUTPUT_DIR is on an object store: then a local copy).
  reading: RunConfig
  result: Optional[beam.runners.runner.PipelineResult] = None
  started: float = dataclasses.field(default_factory=time.monotonic)

  def ended(self, **fields) -> dict:
    return {'job_state': None if self.result is None else str(self.result.state), **fields}


def prepare_output(config: RunConfig, options: Optional[PipelineOptions] = None,
                   source=None) -> StagedRun:
  """Opens the run's staging folder (nothing in OUTPUT_DIR changes before the
  commit) with a ``running`` manifest; returns the run, whose config writes
  there. Every contract file exists from the start; the accounting, all
  zeros, is replaced as messages are accounted for (an empty input emits none)."""
  runner = runner_name(options)
  environment = options.view_as(PortableOptions).environment_type if options else None
  # Workers write here on the DirectRunner and LOOPBACK; elsewhere on their own disks.
  here = capabilities(runner).in_process or (environment or '').upper() == 'LOOPBACK'
  settings = {**dataclasses.asdict(config), 'postgres_dsn': _redact(config.postgres_dsn)}
  owned = (names.OUTPUT_FILES, re.compile(names.OWNED_FOLDERS))
  manifest = {'runner': runner, 'settings': settings, 'input': describe_input(config, source)}
  folder: Union[RunFolder, ObjectRunFolder]
  # a job restored from a checkpoint or savepoint continues the files it wrote
  resumes = bool(options and options.view_as(FlinkRunnerJavaOptions).savepoint_path)
  if is_local(config.output_dir):
    try:
      folder = RunFolder(config.output_dir, *owned, here, manifest, resumes=resumes).open()
    except FolderBusy as e:
      raise ConfigError('--output-dir', str(e)) from None
  else:
    try:
      folder = ObjectRunFolder(config.output_dir, *owned, manifest).open()
    except Exception as e:  # pylint: disable=broad-except  # each filesystem fails its own way
      raise ConfigError('--output-dir', f'cannot write to {config.output_dir}: {e}') from None
  staged = dataclasses.replace(config, output_dir=folder.path(config.output_dir),
                               sqlite_path=folder.path(config.sqlite_path))
  reading = dataclasses.replace(staged, output_dir=folder.local_path(staged.output_dir))
  for size_config in (reading,) + reading.rollup_configs:
    for path in (size_config.aggregates_path, size_config.dead_letter_path) + (
        (size_config.duplicates_path,) if config.rollups else ()):
      create_empty(path)
    if not (folder.resumes and os.path.exists(size_config.accounting_path)):
      write_json_atomically(size_config.accounting_path, dict.fromkeys(CATEGORIES, 0))
  if config.source_kind == 'replay':  # the index hashed it already
    folder.identify_input(config.source_target, getattr(_replay_timeline(source), 'sha256', None))
  return StagedRun(folder, staged, reading)


class StopSignals:
  """SIGINT and SIGTERM during a run: ``stop(signum)`` runs at once and the
  process exits with its code (Beam's clean-up can wait for ever on workers it
  stops), or without ``stop`` KeyboardInterrupt is raised (an unbounded run
  stops its stream). While ``deferred`` (the commit) a signal is only
  remembered, for the exit code; a second signal exits at once."""

  def __init__(self, stop: Optional[Callable[[int], int]] = None):
    self.received: Optional[int] = None
    self._stop = stop
    self._deferring = False

  def install(self) -> 'StopSignals':
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, _frame) -> None:
    if self.received is not None:
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.received = signum
    if self._deferring:
      return
    if self._stop is None:
      raise KeyboardInterrupt(signal.Signals(signum).name)
    os._exit(self._stop(signum))  # pylint: disable=protected-access

  @contextlib.contextmanager
  def deferred(self):
    self._deferring = True
    try:
      yield
    finally:
      self._deferring = False


def _wait_until_finished(result) -> None:
  """Waits for the job; raises if it failed. A job cancelled from outside (the
  runner's UI or job service, a benchmark) stopped like an interrupted one."""
  try:
    result.wait_until_finish()
  except RuntimeError:
    if result.state != beam.runners.runner.PipelineState.CANCELLED:
      raise
    print('tidemark: the job was cancelled; stopping', file=sys.stderr)


def run_unbounded(options: PipelineOptions, config: RunConfig, source):
  """Runs until ``config.run_seconds`` have passed (then cancels) or until
  interrupted; the outputs hold what the windows emitted by then. Returns the
  PipelineResult."""
  p = beam.Pipeline(options=options)
  build(p, config, source)
  result = p.run()
  deadline = None if config.run_seconds is None else time.monotonic() + config.run_seconds
  try:
    if deadline is None:
      _wait_until_finished(result)
      return result
    while time.monotonic() < deadline:
      state = result.state
      if beam.runners.runner.PipelineState.is_terminal(state):
        _wait_until_finished(result)  # raises if it failed
        return result
      time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
  except KeyboardInterrupt:
    print('tidemark: interrupted; stopping', file=sys.stderr)
  finally:
    _cancel(result)
  return result


def _cancel(result, wait_s: float = 60) -> None:
  """Cancels a job that has not ended and waits a while for it to end."""
  is_terminal = beam.runners.runner.PipelineState.is_terminal
  if result is None or is_terminal(result.state):
    return
  try:
    result.cancel()
  except Exception:  # pylint: disable=broad-except
    return  # it ended meanwhile, or the runner cannot cancel
  deadline = time.monotonic() + wait_s
  while not is_terminal(result.state) and time.monotonic() < deadline:
    time.sleep(0.2)


def _end_worker_processes() -> None:
  """Ends the processes this launcher started (the DirectRunner's SDK
  workers), which would otherwise report the lost launcher at length, and
  silences what Beam's threads here would say about that."""
  threading.excepthook = lambda _args: None
  logging.disable(logging.CRITICAL)
  parents = {}
  for stat in glob.glob('/proc/[0-9]*/stat'):
    with contextlib.suppress(OSError, IndexError, ValueError), open(stat) as f:
      parents[int(stat.split('/')[2])] = int(f.read().rsplit(')', 1)[1].split()[1])
  ours, found = set(), {os.getpid()}
  while found:
    ours |= found
    found = {pid for pid, parent in parents.items() if parent in found} - ours
  for pid in ours - {os.getpid()}:
    with contextlib.suppress(OSError):
      os.kill(pid, signal.SIGTERM)


def stop_interrupted(run: StagedRun, signum: int) -> int:
  """Cancels an interrupted run's job, marks the run incomplete (OUTPUT_DIR
  keeps what it held) and returns 128 + the signal number. It may run in a
  signal handler, in the middle of a print: hence os.write."""
  name = signal.Signals(signum).name
  _cancel(run.result, wait_s=10)
  run.folder.abandon(INCOMPLETE, **run.ended(detail=f'{name} arrived before the input ended'))
  os.write(2, (f'tidemark: {name}: stopped before the input ended; nothing committed '
               f'({run.folder.output_dir} holds what it held before; partial outputs in '
               f'{run.folder.staging})\n').encode('utf-8', 'replace'))
  _end_worker_processes()
  return 128 + signum


def finish(run: StagedRun, config: RunConfig, groups_in_java: bool) -> int:
  """After the job: reconciles the staged outputs, then commits them
  (``complete``; ``stopped`` for an unbounded run stopped mid-way) or leaves
  them aside saying why. Returns the exit code."""
  seconds = time.monotonic() - run.started
  result, folder = run.result, run.folder
  assert result is not None  # finish() follows the job
  done = result.state == beam.runners.runner.PipelineState.DONE
  if not done and not config.unbounded:
    folder.abandon(INCOMPLETE, **run.ended(detail='the job was cancelled before its input ended'))
    print(f'tidemark: error: the job was cancelled before its input ended; nothing committed '
          f'(partial outputs in {folder.staging})', file=sys.stderr)
    return 1
  rollups: RollupAccounting = []
  note = None
  try:
    folder.gather()
  except Exception as e:  # pylint: disable=broad-except  # an object store failing its own way
    folder.abandon(FAILED, **run.ended(detail=f'the outputs could not be read: {e!r}'[:4000]))
    print(f'tidemark: error: the outputs could not be read from {folder.staging}: {e}; '
          'nothing committed', file=sys.stderr)
    return 1
  try:
    accounting, rollups = reconcile_run(run.reading)
    dropped = runner_late_drops(result) if groups_in_java else None
    if dropped:
      raise Reconciliation(
          f'the runner dropped {dropped:,} admitted events as expired '
          f'({RUNNER_LATE_DROPS[0]}.{RUNNER_LATE_DROPS[1]})')
  except Reconciliation as e:
    if done:
      folder.abandon(FAILED, **run.ended(detail=f'outputs do not reconcile: {e}'))
      print(f'tidemark: error: outputs do not reconcile: {e} (nothing committed; the outputs '
            f'are in {folder.staging})', file=sys.stderr)
      return 3
    # A stream stopped mid-way: the accounting is its last snapshot (rewritten
    # every few seconds) and windows still open have no final pane yet.
    with open(run.reading.accounting_path, encoding='utf-8') as f:
      accounting = json.load(f)
    note = (f'stopped mid-stream, so messages in flight and windows not yet closed are '
            f'not final: {e}')
    print(f'tidemark: note: {note}', file=sys.stderr)
  status = COMPLETE if done else STOPPED
  folder.commit(status, **run.ended(
      accounting=accounting, reconciled=note is None, detail=note, peak_rss_bytes=peak_rss_bytes(),
      rollups=[{'window_size_s': r.window_size_s, 'allowed_lateness_s': r.allowed_lateness_s,
                'folder': os.path.basename(r.output_dir), 'accounting': a}
               for r, a in rollups]))
  committed = dataclasses.replace(config, output_dir=folder.readable_dir)
  print_accounting(accounting, seconds)
  for warning in accounting_warnings(accounting):
    print(f'\n*** tidemark: WARNING: {warning}\n', file=sys.stderr, flush=True)
  for line in rollup_lines(committed, list(zip(committed.rollup_configs,
                                               (a for _, a in rollups)))):
    print(line.replace(folder.readable_dir, config.output_dir))
  print_metrics(result, groups_in_java)
  for line in refused_lines(committed):
    print(line.replace(folder.readable_dir, config.output_dir))
  try:
    page, _ = report.write(folder.readable_dir)
    print(f'report: {_shown(config.output_dir, page)} (metrics: {METRICS_NAME})')
  except (OSError, ValueError) as e:  # the outputs are committed; say what is missing
    print(f'tidemark: warning: no report was written: {e!r}', file=sys.stderr)
  try:
    folder.publish()
  except Exception as e:  # pylint: disable=broad-except  # an object store failing its own way
    print(f'tidemark: error: the run is complete in {folder.readable_dir} but could not be '
          f'published to {config.output_dir} (its run.json does not say complete): {e}',
          file=sys.stderr)
    return 1
  print(f'outputs in {_shown(config.output_dir)} (run.json: {status})')
  return 0


def _shown(output_dir: str, path: Optional[str] = None) -> str:
  """Where a committed file (or OUTPUT_DIR itself) is, as the user named it."""
  if not is_local(output_dir):
    return output_dir if path is None else f'{output_dir}/{os.path.basename(path)}'
  return os.path.abspath(output_dir if path is None else path)


def peak_rss_bytes() -> int:
  """The peak resident memory of the launcher or of its largest local worker
  process (the DirectRunner's, a LOOPBACK worker), whichever is larger."""
  return 1024 * max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                    resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


class LiveMetrics:
  """The run's metrics and report, served while it runs (``--serve-metrics``):
  from its staging folder, then from OUTPUT_DIR once committed, until the
  launcher exits. Listens before the run starts, so a taken port stops it."""

  def __init__(self, address: str):
    self.run: Optional[StagedRun] = None
    self._server = report.start_server(self._folder, address)
    host, _, port = address.rpartition(':')
    print(f'metrics: http://{host or "127.0.0.1"}:{port}/metrics (live), report at /',
          flush=True)

  def _folder(self) -> str:
    if self.run is None:
      raise OSError('the run has not started yet')
    folder = self.run.folder
    return folder.staging if os.path.isdir(folder.staging) else folder.output_dir


def main(argv: Optional[List[str]] = None) -> int:
  """``python -m pipeline run``: run, reconcile, print the accounting."""
  from pipeline.settings.options import parse_args, tidemark_parser
  logging.getLogger('apache_beam').setLevel(logging.WARNING)
  argv = list(sys.argv[1:] if argv is None else argv)
  if '-h' in argv or '--help' in argv:
    sys.stdout.write(tidemark_parser().format_help())
    return 0
  try:
    options = parse_args(argv)
    config = RunConfig.from_options(options)
    source = read_source(config)
  except KeyboardInterrupt:  # while a large replay is checked and indexed
    print('tidemark: SIGINT: stopped while reading the input; nothing was run or written',
          file=sys.stderr)
    return 128 + signal.SIGINT
  except (ConfigError, ReplayError) as e:
    print(f'tidemark: error: {e}', file=sys.stderr)
    return 2
  except OSError as e:  # the replay changed after it was checked
    print(f'tidemark: error: --source: cannot read {e.filename!r}: {e.strerror}',
          file=sys.stderr)
    return 2
  standard = options.view_as(StandardOptions)
  standard.streaming = is_streaming(config)
  if not standard.runner:
    standard.runner = 'DirectRunner'
  # Read now: the portable runner clears the runner option when it submits the job.
  runner_caps = capabilities(options)
  # progress lines name the worker process that counts them, if not this one
  os.environ[LAUNCHER_PID] = str(os.getpid())
  if config.bulk:
    assert isinstance(source, ReadReplayInChunks)
    use_every_core(options, argv, source.index.messages)
  settle_live_options(options, config)
  try:
    check_flink_job_server(options)
    warnings = watermark_risks(config, runner_name(options))
  except ConfigError as e:
    print(f'tidemark: error: {e}', file=sys.stderr)
    return 2
  warnings += source_warnings(config)
  for warning in warnings:
    print(f'\n*** tidemark: WARNING: {warning}\n', file=sys.stderr, flush=True)

  master = cluster_master(options)
  if master is not None and config.unbounded:  # a live job on a cluster runs detached
    config = detached_config(config)
  live = None
  if config.serve_metrics:
    try:
      live = LiveMetrics(config.serve_metrics)
    except OSError as e:
      print(f'tidemark: error: --serve-metrics: cannot listen on {config.serve_metrics}: '
            f'{e.strerror or e}', file=sys.stderr)
      return 2
  try:
    run = prepare_output(config, options, source)
  except ConfigError as e:
    print(f'tidemark: error: {e}', file=sys.stderr)
    return 2
  if live is not None:
    live.run = run
  if master is not None and config.unbounded:
    name = detach(options, config.customer_id)
    p = beam.Pipeline(options=options)
    build_run(p, run.config, source)
    return submit_detached(options, p, master, name, run.folder.staging,
                           lambda job: run.folder.update(RUNNING, flink_job=job))
  # A bounded run stops at once; an unbounded one stops its stream and commits it.
  signals = StopSignals(
      None if config.unbounded else lambda signum: stop_interrupted(run, signum)).install()
  try:
    if config.unbounded:
      run.result = run_unbounded(options, run.config, source)
    else:
      p = beam.Pipeline(options=options)
      build_run(p, run.config, source)
      run.result = p.run()
      _wait_until_finished(run.result)
  except KeyboardInterrupt:
    return stop_interrupted(run, signals.received or signal.SIGINT)
  except Exception as e:
    run.folder.abandon(FAILED, **run.ended(detail=f'the job failed: {e!r}'[:4000]))
    raise
  with signals.deferred():
    # Beam Java's GroupByKey counts what it drops as expired; the Python runners' do not.
    code = finish(run, config, groups_in_java=not runner_caps.in_process)
  return code or (128 + signals.received if signals.received else 0)
