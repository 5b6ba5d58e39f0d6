"""What a run's output folder holds, read back: the figures the report, the
charts and the metrics are made of.

``load`` reads ``run.json``, the accounting, the panes, the dead letters, the
duplicates and the reconciliation when the run wrote them, and what the replay
delivered: as a bulk replay recorded it (``arrivals.json``), or else from the
replay the run read when it is still there unchanged; ``breakdown`` splits the
accounting by source and by customer as far as those files tell.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import msgspec

from pipeline.runfolder import names
from pipeline.runfolder.files import file_identity
from transforms.rules.model import (
    AGGREGATED, CATEGORIES, DUPLICATE, INVALID, RECEIVED, TOO_LATE, WindowKey, WindowSpec,
    dead_letter_payload, final_panes_of, window_spec)
from transforms.rules.payload import InvalidPayload, parse_payload, parse_payloads, parse_rfc3339_ms
from transforms.rules.admission import AdmissionRules
from transforms.rules.replay import Arrivals, ReplayError, replay_sources, walk_replay


class NotARunFolder(ValueError):
  """The folder is not a Tidemark run's output folder."""

class RunOutputs(NamedTuple):
  """What one run's folder holds, read once."""
  directory: str
  manifest: dict
  accounting: Dict[str, int]
  panes: List[dict]
  dead_letters: List[dict]
  duplicates: Optional[List[dict]]  # None: the run did not record them
  reconciliation: Optional[dict]
  #: the replay the run read, if it is still there unchanged (else None):
  #: the messages it holds per source
  replay_received: Optional[Dict[str, int]]
  #: each source's watermark as the replay goes on: ``(messages so far, watermark ms)``
  replay_watermarks: Optional[Dict[str, List[Tuple[int, int]]]]
  #: every valid message that arrived after its window's end: ``(seconds the
  #: watermark was past that end, whether it was dead-lettered as too late)``
  replay_late: Optional[List[Tuple[float, bool]]] = None
  #: the audits of the run's restatements (``restated/*.json``), by range
  restatements: List[dict] = []
  #: ``payload_fields`` of each of ``letters()``, parsed once (None: invalid)
  letter_fields: List[Optional[tuple]] = []

  @property
  def window_size_s(self) -> int:
    return self.manifest['settings']['window_size_s']

  @property
  def allowed_lateness_s(self) -> int:
    return self.manifest['settings']['allowed_lateness_s']

  @property
  def status(self) -> str:
    return self.manifest.get('status', 'unknown')

  @property
  def finished(self) -> bool:
    """Whether the run finished: otherwise its figures are what it wrote before it stopped."""
    return self.status in FINISHED

  @property
  def unaccounted(self) -> int:
    """``received`` minus every outcome: 0 unless messages went missing."""
    return self.accounting.get(RECEIVED, 0) - sum(
        self.accounting.get(k, 0) for k in CATEGORIES if k != RECEIVED)

  def final_panes(self) -> Dict[WindowKey, dict]:
    """Each window's pane with the highest index."""
    return final_panes_of(self.panes)

  def letters(self) -> List[dict]:
    """The dead letters, then the duplicates."""
    return self.dead_letters + (self.duplicates or [])


class UnreadableOutput(ValueError):
  """An output file of a run that cannot be read as what it should be (empty,
  cut short, not JSON); the message names the file (and the line)."""


_JSON_DECODE = msgspec.json.Decoder().decode


def _loads(text: str):
  """JSON as the standard library reads it, by msgspec (faster); what msgspec
  refuses (NaN, out-of-range numbers, lone surrogates) ``json.loads`` decides.
  Raises ValueError."""
  try:
    return _JSON_DECODE(text)
  except (msgspec.DecodeError, UnicodeEncodeError):
    return json.loads(text)


def _json_lines(path: str) -> Optional[List[dict]]:
  if not os.path.exists(path):
    return None
  records = []
  with open(path, encoding='utf-8', errors='surrogateescape') as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        try:
          records.append(_loads(line))
        except ValueError as e:
          raise UnreadableOutput(f'{path}:{number}: not a JSON object ({e})') from None
  return records


def _json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8', errors='surrogateescape') as f:
    text = f.read()
  try:
    return _loads(text)
  except ValueError as e:
    what = 'empty' if not text.strip() else f'not JSON ({e})'
    raise UnreadableOutput(f'{path}: {what}') from None


class _EventTime(msgspec.Struct):
  event_time: Union[int, str]


_EVENT_TIME = msgspec.json.Decoder(_EventTime)


def _event_time(payload: str) -> Optional[int]:
  """The payload's event time, cheaply (no other check), or None."""
  try:
    t = _EVENT_TIME.decode(payload).event_time
    return t if isinstance(t, int) else parse_rfc3339_ms(t)
  except (msgspec.DecodeError, msgspec.ValidationError, InvalidPayload, UnicodeError):
    return None


Delivered = Tuple[Optional[Dict[str, int]], Optional[Dict[str, List[Tuple[int, int]]]],
                  Optional[List[Tuple[float, bool]]]]


def _arrivals(output_dir: str) -> Optional[Delivered]:
  """``(received per source, watermark history, late messages)`` as a bulk
  replay recorded them (``arrivals.json``), or None if the run did not."""
  described = _json(os.path.join(output_dir, names.ARRIVALS))
  if described is None:
    return None
  return (described['received'],
          {source: [(n, mark) for n, mark in points]
           for source, points in described['watermarks'].items()},
          [(behind, too_late) for behind, too_late in described['late']])


def _replay(manifest: dict, dead_letters: List[dict], window: WindowSpec) -> Delivered:
  """``(received per source, watermark history, late messages)`` of the replay
  the run read, streamed once; (None, None, None) when the run did not read a
  replay or the file is gone or changed since. A late message is matched to the
  too-late dead letters by its source and payload."""
  described = manifest.get('input') or {}
  path = described.get('path')
  if described.get('kind') != 'replay' or not path or not os.path.exists(path):
    return None, None, None
  if 'sha256' in described and file_identity(path).get('sha256') != described['sha256']:
    return None, None, None
  too_late = collections.Counter((d['source'], d['data']) for d in dead_letters
                                 if d['reason'] == TOO_LATE)
  rules = AdmissionRules(window)
  late: List[Tuple[float, bool]] = []
  try:
    sources = tuple(described.get('sources') or replay_sources(path))
    arrivals = Arrivals(sources)
    for kind, source, payload, watermark in walk_replay(path, sources):
      arrivals.add(kind, source, payload)
      if kind != 'data' or watermark is None:
        continue
      event_time = _event_time(payload)
      if event_time is not None and rules.past_end(event_time, watermark) is None:
        continue  # arrived before its window's end: the cheap look at its time is enough
      fields = payload_fields(payload)
      if fields is None:
        continue
      behind = rules.past_end(fields[4], watermark)
      if behind is None:
        continue
      matched = too_late[(source, payload)] > 0
      too_late[(source, payload)] -= matched
      late.append((behind / 1000, matched))
  except (ReplayError, OSError):
    return None, None, None
  return arrivals.sources_received(), arrivals.watermarks, late


#: Run statuses whose accounting is the run's whole (``pipeline.runfolder.files.COMMITTED``).
FINISHED = ('complete', 'stopped')


def written_so_far(outputs: 'RunOutputs') -> Dict[str, int]:
  """The accounting of what a run that did not finish wrote before it stopped:
  its dead letters, duplicates and the events in its final panes; ``received``
  is their sum (messages whose outcome it wrote), not what it read."""
  counts = collections.Counter(d['reason'] for d in outputs.dead_letters)
  accounting = {INVALID: counts[INVALID], TOO_LATE: counts[TOO_LATE],
                DUPLICATE: len(outputs.duplicates or ()),
                AGGREGATED: sum(p['count'] for p in outputs.final_panes().values())}
  return {RECEIVED: sum(accounting.values()), **accounting}


def _restatements(output_dir: str) -> List[dict]:
  folder = os.path.join(output_dir, names.RESTATED_DIR)
  if not os.path.isdir(folder):
    return []
  return [_json(os.path.join(folder, name)) or {} for name in sorted(os.listdir(folder))
          if name.endswith('.json')]


def load(output_dir: str) -> RunOutputs:
  """Reads a run's folder; raises NotARunFolder when it has no ``run.json``.

  A run that did not finish (interrupted, killed, failed) is read as what it
  wrote before it stopped: its accounting is counted from its outputs, and the
  replay it read is not taken for what it received."""
  manifest = _json(os.path.join(output_dir, names.MANIFEST))
  if manifest is None or 'settings' not in manifest:
    raise NotARunFolder(f'{output_dir}: no run.json with settings: not a Tidemark output folder')
  finished = manifest.get('status') in FINISHED
  dead_letters = _json_lines(os.path.join(output_dir, names.DEAD_LETTERS)) or []
  received, history, late = (None, None, None)
  if finished:
    settings = manifest['settings']
    received, history, late = _arrivals(output_dir) or _replay(
        manifest, dead_letters,
        window_spec(settings['window_size_s'], settings['allowed_lateness_s']))
  outputs = RunOutputs(
      directory=output_dir, manifest=manifest,
      accounting=(finished and _json(os.path.join(output_dir, names.ACCOUNTING)) or
                  dict.fromkeys(CATEGORIES, 0)),
      panes=_json_lines(os.path.join(output_dir, names.AGGREGATES)) or [],
      dead_letters=dead_letters,
      duplicates=_json_lines(os.path.join(output_dir, names.DUPLICATES)),
      reconciliation=_json(os.path.join(output_dir, names.RECONCILIATION)),
      replay_received=received, replay_watermarks=history, replay_late=late,
      restatements=_restatements(output_dir))
  outputs = outputs._replace(letter_fields=_letter_fields(outputs.letters()))
  return outputs if finished else outputs._replace(accounting=written_so_far(outputs))


def _letter_fields(letters: List[dict]) -> List[Optional[tuple]]:
  """``payload_fields`` of each letter, parsed together; None for an invalid
  one (its payload is not read again)."""
  wanted = [i for i, record in enumerate(letters) if record['reason'] != INVALID]
  parsed = parse_payloads([letters[i]['data'] for i in wanted])
  fields: List[Optional[tuple]] = [None] * len(letters)
  for at, *event in zip(parsed.position, parsed.event_id, parsed.customer_id, parsed.key,
                        parsed.value, parsed.event_time):
    fields[wanted[at]] = tuple(event)
  return fields


def payload_fields(data: str) -> Optional[tuple]:
  """``(event_id, customer_id, key, value, event_time)``, or None if invalid."""
  try:
    return parse_payload(data)
  except InvalidPayload:
    return None


# --- the figures ---------------------------------------------------------------


class Breakdown(NamedTuple):
  """The accounting split by source and by customer, as far as the outputs
  tell: ``{group: {outcome: count}}``."""
  by_source: Dict[str, Dict[str, int]]
  by_customer: Dict[str, Dict[str, int]]
  #: what the per-source split could not separate (duplicates are only known
  #: per source when the run recorded them): the name of the merged outcome
  merged: Optional[str]


def breakdown(outputs: RunOutputs) -> Breakdown:
  """Dead letters and duplicates name their source and (when the payload
  parses) customer; final panes name their customer; a replay names every
  message's source. What is left per source once the dead letters and
  duplicates are taken out is ``aggregated`` (or ``admitted or duplicate``
  when the run did not record its duplicates)."""
  by_source: Dict[str, Dict[str, int]] = collections.defaultdict(collections.Counter)
  by_customer: Dict[str, Dict[str, int]] = collections.defaultdict(collections.Counter)
  for record, parsed in zip(outputs.letters(), outputs.letter_fields):
    by_source[record['source']][record['reason']] += 1
    if parsed is not None:
      by_customer[parsed[1]][record['reason']] += 1
  for pane in outputs.final_panes().values():
    by_customer[pane['customer_id']][AGGREGATED] += pane['count']
  merged = None
  if outputs.replay_received is not None:
    merged = AGGREGATED if outputs.duplicates is not None else 'admitted or duplicate'
    for source, count in outputs.replay_received.items():
      counts = by_source[source]
      counts[RECEIVED] = count
      counts[merged] = count - sum(counts[k] for k in (INVALID, TOO_LATE, DUPLICATE))
  return Breakdown(dict(by_source), dict(by_customer), merged)



def watermark_lags(outputs: RunOutputs) -> Dict[str, float]:
  """For a replay: how many seconds each source's last watermark is behind the
  most advanced source's ({} when the outputs hold no watermark history)."""
  last = {s: h[-1][1] for s, h in (outputs.replay_watermarks or {}).items() if h}
  if not last:
    return {}
  ahead = max(last.values())
  return {s: (ahead - last[s]) / 1000 if s in last else 0.0
          for s in outputs.replay_watermarks or {}}


class Lag(NamedTuple):
  """The source whose watermark ended furthest behind, and the one ahead."""
  slowest: str
  seconds: float
  ahead: str


def slowest_source(outputs: RunOutputs) -> Optional[Lag]:
  """The lagging source of a replay (``watermark_lags``), or None when every
  source ended level or the outputs hold no watermark history."""
  lags = watermark_lags(outputs)
  if not lags or max(lags.values()) <= 0:
    return None
  slowest = max(sorted(lags), key=lambda s: lags[s])
  return Lag(slowest, lags[slowest], min(sorted(lags), key=lambda s: lags[s]))


class DeadLetterKind(NamedTuple):
  """Dead letters that failed for the same stated reason."""
  reason: str
  what: str  # the detail (an invalid payload), or the closed window (too late)
  letters: int
  example: str  # the first such payload; bytes that are not UTF-8 as \\xNN


def dead_letter_kinds(outputs: RunOutputs) -> List[DeadLetterKind]:
  """The dead letters grouped by what went wrong, most frequent first: invalid
  payloads by their ``detail``, too-late ones by the window that had closed
  (their details differ by the event time only)."""
  size_ms = outputs.window_size_s * 1000
  groups: Dict[Tuple[str, str], List] = {}
  closed: Dict[int, str] = {}  # window start → what its too-late letters say
  for record, parsed in zip(outputs.dead_letters, outputs.letter_fields):
    what = record.get('detail', '')
    if parsed is not None and record['reason'] == TOO_LATE:
      start = parsed[4] - parsed[4] % size_ms
      if start not in closed:
        closed[start] = (f'window [{_instant(start)}, {_instant(start + size_ms)}) had closed '
                         f'(allowed lateness {outputs.allowed_lateness_s} s)')
      what = closed[start]
    group = groups.setdefault((record['reason'], what), [0, record])
    group[0] += 1
  kinds = [DeadLetterKind(reason, what, count,
                          dead_letter_payload(first).decode('utf-8', 'backslashreplace'))
           for (reason, what), (count, first) in groups.items()]
  return sorted(kinds, key=lambda k: (-k.letters, k.reason, k.what))


def _instant(millis: int) -> str:
  return datetime.datetime.fromtimestamp(millis / 1000, datetime.timezone.utc).strftime(
      '%Y-%m-%dT%H:%M:%SZ')
