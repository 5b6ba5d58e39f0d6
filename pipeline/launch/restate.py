"""python -m pipeline restate: the complete truth of closed windows, from history.

    python -m pipeline restate OUTPUT_DIR --from TIME --to TIME
        [--source replay:PATH | kafka:BOOTSTRAP/TOPIC[,TOPIC...]] [--margin SECONDS]
        [--postgres-dsn DSN] [--dry-run]

OUTPUT_DIR is a finished run's folder; its windows in [--from, --to) (RFC 3339,
on window boundaries) are restated by the rule of contract section 7 from the
source the run read (or --source): every valid event whose event time falls in
a window counts, each event_id once, with no lateness cut. A window whose
restated value differs from what a sink holds gets a row with timing RESTATED
and the next pane_index in that sink (the run folder's aggregates.jsonl, its
SQLite database, its PostgreSQL table); the others are not touched, so running
it again writes nothing. The audit goes to OUTPUT_DIR/restated/FROM_TO.json,
the accounting.json becomes the restated outputs' accounting, and the report
and metrics are written again.

Exit codes: 0 restated (or nothing to restate), 2 refused before anything was
written (the message names the option), 1 failed while writing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.readback.outputs import FINISHED
from pipeline.readback.stored import FilesSink, PostgresSink, Sink, SqliteSink
from pipeline.runfolder import names
from pipeline.runfolder.files import (
    FolderBusy, lock_folder, read_json, utc_now, write_json_atomically)
from pipeline.settings.checks import ConfigError, check_seconds
from pipeline.settings.options import option_dests, parse_args
from pipeline.settings.runners import use_every_core
from pipeline.settings.targets import parse_kafka_target
from transforms.connectors.history import (
    KafkaUnreachable, ReadKafkaHistory, ReadReplayHistory, plan_kafka_history)
from transforms.flow.restate import OUTSIDE_RANGE, RestatedWindow, RestateWindows
from transforms.rules.model import (
    AGGREGATED, DUPLICATE, INVALID, RECEIVED, TOO_LATE, WindowAggregate, WindowSpec,
    final_panes_of, iso_millis, window_spec)
from transforms.rules.payload import InvalidPayload, parse_payload, parse_rfc3339_ms
from transforms.rules.replay import ReplayError
from transforms.rules.replay_index import index_replay
from transforms.rules.restatement import ADDED_TOO_LATE, RESTATED, RestateRange, same_figures

#: How far before --from and after --to + lateness a broker's history is read
#: (record time), for copies sent early and stragglers; seconds.
DEFAULT_MARGIN_S = 600
_FIGURES = ('count', 'sum', 'min', 'max')


class LiveRun(NamedTuple):
  """What a restatement needs of the finished run it restates."""
  directory: str
  manifest: dict
  #: message_id -> event time of every copy the run dead-lettered as too late
  too_late: Dict[str, int]


def read_live_run(folder: str) -> LiveRun:
  """The run's manifest and its too-late dead letters (streamed: nothing else
  of the folder is held); ConfigError if it is not a finished run's folder."""
  manifest = read_json(os.path.join(folder, names.MANIFEST))
  if not manifest or 'settings' not in manifest:
    raise ConfigError('OUTPUT_DIR', f'{folder}: no run.json with settings: not a Tidemark '
                      'output folder')
  if manifest.get('status') not in FINISHED:
    raise ConfigError('OUTPUT_DIR', f'the run in {folder} did not finish (run.json: '
                      f'{manifest.get("status")}): restate the windows of a finished run')
  too_late: Dict[str, int] = {}
  path = os.path.join(folder, names.DEAD_LETTERS)
  number = 0
  try:
    with open(path, encoding='utf-8') as f:
      for line in f:
        number += 1
        if '"too_late"' in line:
          letter = json.loads(line)
          if letter.get('reason') == TOO_LATE and letter.get('message_id'):
            too_late[letter['message_id']] = parse_payload(letter['data'])[4]
  except OSError as e:
    raise ConfigError('OUTPUT_DIR', f'cannot read {path}: {e.strerror or e}') from None
  except (ValueError, KeyError) as e:
    raise ConfigError('OUTPUT_DIR', f'{path}:{number}: not a dead letter of the run ({e})') from None
  return LiveRun(folder, manifest, too_late)


class Plan(NamedTuple):
  """A restatement, checked: nothing has been written yet."""
  folder: str
  live: LiveRun
  spec: WindowSpec
  span: RestateRange
  source: str  # replay:PATH or kafka:...
  read: beam.PTransform
  sinks: List[Sink]
  #: per sink, its final row of each window of the range, as read before anything ran
  stored: Dict[str, Dict[tuple, dict]]
  too_late_live: frozenset
  messages: int


def _instant(field: str, text: str) -> int:
  try:
    return parse_rfc3339_ms(text)
  except InvalidPayload as e:
    raise ConfigError(field, f'{text!r} is not an RFC 3339 time such as 2024-01-15T14:00:00Z '
                      f'({e})') from None


def _live_source(live: LiveRun) -> str:
  described = live.manifest.get('input') or {}
  if described.get('kind') == 'replay':
    return 'replay:' + described['path']
  if described.get('kind') == 'kafka':
    return 'kafka:{}/{}'.format(described['bootstrap'], ','.join(
        f'{name}={topic}' for name, topic in sorted(described['topics'].items())))
  raise ConfigError('--source', f'the run read {described.get("kind") or "an unknown source"}; '
                    'give its history as --source replay:PATH or kafka:BOOTSTRAP/TOPIC')


def _history(source: str, spec: WindowSpec, span: RestateRange,
             margin_ms: int) -> Tuple[beam.PTransform, int]:
  kind, _, target = source.partition(':')
  if kind == 'replay':
    try:
      index = index_replay(target)
    except OSError as e:
      raise ConfigError('--source', f'cannot read {target}: {e.strerror or e}') from None
    except ReplayError as e:
      raise ConfigError('--source', str(e)) from None
    return ReadReplayHistory(index), index.messages
  if kind == 'kafka':
    bootstrap, topics = parse_kafka_target(target)
    closes = span.end_ms + spec.lateness_ms
    now = int(time.time() * 1000)
    if closes >= now:
      raise ConfigError('--to', f'the range is not closed: its last window closes at '
                        f'{iso_millis(closes)} (end + allowed lateness), after now')
    try:
      slices = plan_kafka_history(bootstrap, topics, span.start_ms - margin_ms,
                                  closes + margin_ms)
    except KafkaUnreachable as e:
      raise ConfigError('--source', str(e)) from None
    return ReadKafkaHistory(bootstrap, slices), sum(s.end - s.start for s in slices)
  raise ConfigError('--source', f'{source!r} is not replay:PATH or kafka:BOOTSTRAP/TOPIC[,...]')


def _sinks(live: LiveRun, postgres_dsn: Optional[str]) -> List[Sink]:
  settings = live.manifest['settings']
  sinks: List[Sink] = [FilesSink(os.path.join(live.directory, names.AGGREGATES))]
  sqlite = settings.get('sqlite_path')
  if sqlite:
    if os.path.basename(sqlite) == names.SQLITE:  # the run folder's own, wherever it is now
      sqlite = os.path.join(live.directory, names.SQLITE)
    sinks.append(SqliteSink(sqlite))
  if settings.get('sink') == 'postgres':
    if not postgres_dsn:
      raise ConfigError('--postgres-dsn', 'the run wrote to PostgreSQL: give its DSN (run.json '
                        'keeps it without the password)')
    sinks.append(PostgresSink(postgres_dsn, settings['postgres_table'], settings['customer_id']))
  elif settings.get('sink') not in ('files', None):
    raise ConfigError('OUTPUT_DIR', f'the run wrote to {settings["sink"]}, which a restatement '
                      'does not write yet; files, SQLite and PostgreSQL only')
  return sinks


def prepare(args: argparse.Namespace) -> Plan:
  """Every check, in order; ConfigError naming the option for the first that fails."""
  folder = args.output_dir
  live = read_live_run(folder)
  settings = live.manifest['settings']
  spec = window_spec(settings['window_size_s'], settings['allowed_lateness_s'])
  span = RestateRange(_instant('--from', args.start), _instant('--to', args.end))
  try:
    span.check(spec)
  except ValueError as e:
    raise ConfigError('--from/--to', str(e)) from None
  margin_ms = check_seconds('--margin', args.margin) * 1000
  sinks = _sinks(live, args.postgres_dsn)
  stored: Dict[str, Dict[tuple, dict]] = {}
  for sink in sinks:  # reachable, before anything is read
    try:
      stored[sink.name] = sink.finals(span, spec.size_ms)
    except Exception as e:  # pylint: disable=broad-except  # each database fails its own way
      raise ConfigError('--postgres-dsn' if sink.name == 'postgres' else 'OUTPUT_DIR',
                        f'cannot read the {sink.name} sink: {e}') from None
  source = args.source or _live_source(live)
  read, messages = _history(source, spec, span, margin_ms)
  return Plan(folder, live, spec, span, source, read, sinks, stored, frozenset(live.too_late),
              messages)


def beam_options(argv: List[str]) -> PipelineOptions:
  """The Beam options after the restatement's own, each checked (ConfigError for
  an unknown one, or a run setting: a restatement takes the run's)."""
  run_flags = set(option_dests().values())
  for arg in argv:
    if arg.split('=', 1)[0] in run_flags:
      raise ConfigError(arg.split('=', 1)[0], "is a setting of python -m pipeline run; a "
                        "restatement takes the run's own (its run.json)")
  return parse_args(argv)


def restate(plan: Plan, options: PipelineOptions,
            argv: List[str]) -> Tuple[List[RestatedWindow], Dict[str, int]]:
  """Runs the batch flow; returns the range's windows and the counts of what was read."""
  use_every_core(options, argv, plan.messages)
  windows: List[RestatedWindow] = []
  counts: Dict[str, int] = {}
  with tempfile.TemporaryDirectory(prefix='tidemark-restate-') as scratch:
    with beam.Pipeline(options=options) as p:
      restated = p | 'History' >> plan.read | 'Restate' >> RestateWindows(
          plan.spec, plan.span, plan.too_late_live)
      (restated.windows
       | 'WindowsAsJson' >> beam.Map(lambda w: json.dumps(w._asdict()))
       | 'WriteWindows' >> beam.io.WriteToText(os.path.join(scratch, 'windows')))
      (restated.counts
       | 'CountsAsJson' >> beam.Map(json.dumps)
       | 'WriteCounts' >> beam.io.WriteToText(os.path.join(scratch, 'counts')))
    for name in sorted(os.listdir(scratch)):
      with open(os.path.join(scratch, name), encoding='utf-8') as f:
        for line in f:
          if name.startswith('windows'):
            record = json.loads(line)
            windows.append(RestatedWindow(**{**record, 'after': tuple(record['after']),
                                             'live': tuple(record['live'])}))
          else:
            category, n = json.loads(line)
            counts[category] = counts.get(category, 0) + n
  counts = {k: counts.get(k, 0) for k in (INVALID, DUPLICATE, AGGREGATED, OUTSIDE_RANGE)}
  counts['read'] = sum(counts.values())
  return sorted(windows, key=lambda w: (w.window_start, w.customer_id, w.key)), counts


def _figures(row: Optional[dict]) -> Optional[dict]:
  return None if row is None else {k: row[k] for k in _FIGURES + ('pane_index', 'timing')}


def _as_figures(values: tuple) -> Dict[str, object]:
  return dict(zip(_FIGURES, values))


def corrections(plan: Plan, windows: List[RestatedWindow]) -> Tuple[list, Dict[str, list]]:
  """The audit's windows and, per sink, the rows to add."""
  stored = plan.stored  # the lock holds the folder; a database row only moves to a higher pane
  files = stored['files']
  restated = {(w.customer_id, w.key, w.window_start, w.window_end): w for w in windows}
  rows: Dict[str, list] = {sink.name: [] for sink in plan.sinks}
  audit = []
  for window in sorted(set(restated) | set(files), key=lambda w: (w[2], w[0], w[1])):
    truth = restated.get(window)
    after = truth.after if truth else (0, 0.0, None, None)
    written = {}
    for sink in plan.sinks:
      before = stored[sink.name].get(window)
      if same_figures(before, after) or after[0] == 0 or not sink.takes(window[0]):
        continue  # holds the truth (or no row can say it, or the sink is another customer's)
      index = 0 if before is None else before['pane_index'] + 1
      customer_id, key, start, end = window
      count, total, low, high = after
      rows[sink.name].append(WindowAggregate(
          customer_id, key, start, end, count, total, low, high, index, RESTATED))
      written[sink.name] = index
    before = files.get(window)
    ids_differ = bool(truth and (truth.added or truth.removed))
    if not written and not ids_differ and not (after[0] == 0 and before is not None):
      continue
    live = truth.live if truth else (0, 0.0, None, None)
    audit.append({
        'customer_id': window[0], 'key': window[1],
        'window_start': window[2], 'window_end': window[3],
        'before': _figures(before), 'after': _as_figures(after),
        'live_reconstructed': _as_figures(live),
        'explained': same_figures(before, live),
        'added': [dict(zip(('event_id', 'message_id', 'reason'), a)) for a in truth.added]
        if truth else [],
        'removed': [dict(zip(('event_id', 'message_id', 'reason'), r)) for r in truth.removed]
        if truth else [],
        'written': written,
        **({'unwritten': 'the restated window has no events; no row can hold that, so the '
                         'stored row stays'} if after[0] == 0 else {}),
    })
  return audit, rows


def _too_late_in_range(plan: Plan) -> int:
  return sum(1 for event_time in plan.live.too_late.values()
             if plan.span.holds(plan.spec.start(event_time)))


def restated_accounting(folder: str, live_accounting: Dict[str, int]) -> Dict[str, int]:
  """The accounting of the folder's outputs after its restatements: what the
  live run received, its invalid; its too late less those a restatement now
  counts or finds duplicate; aggregated from the final panes; duplicate the rest."""
  recovered = 0
  audits = os.path.join(folder, names.RESTATED_DIR)
  for name in sorted(os.listdir(audits)) if os.path.isdir(audits) else ():
    with open(os.path.join(audits, name), encoding='utf-8') as f:
      recovered += json.load(f)['too_late_read']
  with open(os.path.join(folder, names.AGGREGATES), encoding='utf-8') as f:
    finals = final_panes_of(json.loads(line) for line in f if line.strip())
  aggregated = sum(pane['count'] for pane in finals.values())
  too_late = live_accounting[TOO_LATE] - recovered
  received, invalid = live_accounting[RECEIVED], live_accounting[INVALID]
  return {RECEIVED: received, INVALID: invalid, TOO_LATE: too_late,
          DUPLICATE: received - invalid - too_late - aggregated, AGGREGATED: aggregated}


def apply(plan: Plan, windows: List[RestatedWindow], counts: Dict[str, int],
          dry_run: bool) -> dict:
  """Writes the rows, the audit, the accounting and the report; returns the audit."""
  audit_windows, rows = corrections(plan, windows)
  recovered = sum(1 for w in audit_windows for a in w['added'] if a['reason'] == ADDED_TOO_LATE)
  too_late_read = sum(w.too_late_live for w in windows)
  start, end = iso_millis(plan.span.start_ms), iso_millis(plan.span.end_ms)
  audit = {
      'from': start, 'to': end, 'restated_at': utc_now(), 'source': plan.source,
      'window_size_s': plan.spec.size_ms // 1000,
      'allowed_lateness_s': plan.spec.lateness_ms // 1000,
      'accounting': counts,
      'too_late_live': _too_late_in_range(plan), 'too_late_recovered': recovered,
      'too_late_read': too_late_read,
      'windows_in_range': len(windows),
      'windows_changed': sum(1 for w in audit_windows if w['written']),
      'rows_written': {name: len(sink_rows) for name, sink_rows in rows.items()},
      'windows': audit_windows,
  }
  if dry_run:
    return audit
  audits = os.path.join(plan.folder, names.RESTATED_DIR)
  name = names.RESTATEMENT.format(start=start.replace(':', ''), end=end.replace(':', ''))
  unchanged = not any(rows.values()) and os.path.exists(os.path.join(audits, name))
  if unchanged:  # restated before: every sink holds the truth, and its audit stays
    audit['unchanged'] = True
  else:
    for sink in plan.sinks:
      sink.add(rows[sink.name])
    os.makedirs(audits, exist_ok=True)
    write_json_atomically(os.path.join(audits, name), audit)
  # (again when unchanged: an earlier restatement may have stopped before it)
  live_accounting = plan.live.manifest['accounting']
  write_json_atomically(os.path.join(plan.folder, names.ACCOUNTING),
                        restated_accounting(plan.folder, live_accounting))
  return audit


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m pipeline restate', description=__doc__.split('\n\n')[0],
      allow_abbrev=False,
      epilog='Beam options (--runner, --direct_num_workers, ...) may follow.')
  parser.add_argument('output_dir', metavar='OUTPUT_DIR', help="a finished run's --output-dir")
  parser.add_argument('--from', dest='start', required=True, metavar='TIME',
                      help='the first window start, RFC 3339 (e.g. 2024-01-15T14:00:00Z)')
  parser.add_argument('--to', dest='end', required=True, metavar='TIME',
                      help='the end of the last window, RFC 3339')
  parser.add_argument('--source', help="the history: replay:PATH or kafka:BOOTSTRAP/TOPIC[,...] "
                      "(default: what the run read)")
  parser.add_argument('--margin', type=int, default=DEFAULT_MARGIN_S, metavar='SECONDS',
                      help='a broker is read from --from minus this to --to plus the allowed '
                      f'lateness plus this, in record time (default {DEFAULT_MARGIN_S})')
  parser.add_argument('--postgres-dsn', help="the PostgreSQL the run wrote to")
  parser.add_argument('--dry-run', action='store_true', help='print the audit, write nothing')
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  args, beam_args = _parser().parse_known_args(argv)
  try:
    lock_folder(args.output_dir, lambda: f'{args.output_dir} is being written by a run: '
                'restate it once the run has ended')
    options = beam_options(beam_args)
    plan = prepare(args)
  except FolderBusy as e:
    print(f'tidemark: error: OUTPUT_DIR: {e}', file=sys.stderr)
    return 2
  except ConfigError as e:
    print(f'tidemark: error: {e}', file=sys.stderr)
    return 2
  try:
    windows, counts = restate(plan, options, beam_args)
    audit = apply(plan, windows, counts, args.dry_run)
    if not args.dry_run and not audit.get('unchanged'):
      from pipeline.readback import report
      report.write(plan.folder)
  except Exception as e:  # pylint: disable=broad-except  # the job, a sink or the disk
    # every write is idempotent and the audit comes after the sinks: again finishes it
    print(f'tidemark: error: the restatement failed ({type(e).__name__}: {e}); run the same '
          'restatement again to finish it', file=sys.stderr)
    return 1
  if args.dry_run:
    print(json.dumps(audit, indent=1))
    return 0
  if audit.get('unchanged'):
    print(f'nothing to restate from {audit["from"]} to {audit["to"]}: every sink holds the '
          f'restated values (audit: {os.path.join(plan.folder, names.RESTATED_DIR)})')
    return 0
  print(f'restated {audit["from"]} to {audit["to"]}: {counts["read"]:,} read '
        f'({counts[INVALID]:,} invalid, {counts[DUPLICATE]:,} duplicate, '
        f'{counts[AGGREGATED]:,} in the range, {counts[OUTSIDE_RANGE]:,} in other windows); '
        f'{audit["windows_changed"]:,} of {audit["windows_in_range"]:,} windows corrected, '
        f'{audit["too_late_recovered"]:,} too-late events now counted')
  print(f'audit: {os.path.join(plan.folder, names.RESTATED_DIR)}')
  return 0

