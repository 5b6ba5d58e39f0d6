"""The replay file (contract section 2): a recorded stream, read strictly.

A replay is compiled, before anything runs, into a list of steps:

* ``Messages(batch)``: messages that arrive one after another, each with the
  pipeline watermark at its arrival (``None`` while it is still at the
  beginning of time);
* ``Watermark(millis)``: the pipeline watermark (the minimum over every source
  named in the file) advances to ``millis``; the last step is ``None``, for
  infinity, so every window closes;
* ``ProcessingTime(seconds)``: processing time moves on.

Any line that is not one of the contract's shapes stops the compile with a
``ReplayError`` naming the line number.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

import msgspec

#: Watermarks are limited to instants Beam can represent as whole milliseconds.
MIN_WATERMARK_MS = -9223372036854775 + 1
MAX_WATERMARK_MS = 9223372036854775 - 1


class ReplayError(ValueError):
  """An operator error in a replay file; ``line`` is 1-based."""

  def __init__(self, path: str, line: int, reason: str):
    super().__init__(f'{path}:{line}: {reason}')
    self.path = path
    self.line = line
    self.reason = reason


class Message(NamedTuple):
  source: str
  data: str
  watermark: Optional[int]  # the pipeline watermark when it arrived
  #: how far its source's watermark was behind the most advanced source's
  source_lag_ms: Optional[int] = None


class Messages(NamedTuple):
  batch: List[Message]


class Watermark(NamedTuple):
  millis: Optional[int]  # None: infinity


class ProcessingTime(NamedTuple):
  seconds: float


Step = Union[Messages, Watermark, ProcessingTime]


class Replay(NamedTuple):
  steps: List[Step]
  sources: Tuple[str, ...]
  messages: int
  #: per source, the largest lag (ms) of its watermark behind the most
  #: advanced source's, over the run
  max_watermark_lag_ms: Dict[str, int]
  #: the file's identity in its messages' ids (``replay_digest``)
  digest: str = ''
  #: the file's whole sha256 (hex)
  sha256: str = ''


#: Hex digits of the file's sha256 in a replayed message's identity.
DIGEST_CHARS = 16


def file_sha256(path: str) -> str:
  """The file's sha256 (hex)."""
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def replay_digest(sha256: str) -> str:
  """The first ``DIGEST_CHARS`` hex digits of the file's sha256: with the
  message's number it identifies a replayed message (``model.message_identity``)."""
  return sha256[:DIGEST_CHARS]



def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def read_lines(path: str, start: int = 0, end: Optional[int] = None
                ) -> Iterator[Tuple[int, bytes, Optional[tuple]]]:
  """``(line number, bytes, (kind, source, payload) or None when blank)`` of
  the lines from byte ``start`` (a line's start) to ``end`` (one past a line's
  end; None: the end of the file), numbered from 1 at ``start``; raises
  ReplayError at the first bad line."""
  with open(path, 'rb') as f:
    f.seek(start)
    left = math.inf if end is None else end - start
    for number, raw in enumerate(f, start=1):
      if left <= 0:
        return
      left -= len(raw)
      fast = classify_line_fast(raw)  # msgspec refuses invalid UTF-8 too
      if fast is not None:
        yield number, raw, fast
        continue
      try:
        text = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise ReplayError(path, number, f'not UTF-8 ({e.reason})') from None
      yield number, raw, classify_line(path, number, text) if text.strip() else None


_JSON = msgspec.json.Decoder()


def _decode(text: Union[str, bytes]):
  """JSON as the standard library reads it, fast: msgspec takes strict JSON,
  and whatever it refuses (NaN, huge integers, lone surrogate escapes, errors)
  goes to ``json.loads``, which decides. Raises ValueError for anything that
  is not JSON, including a text nested too deeply to decode."""
  try:
    try:
      return _JSON.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError):
      return json.loads(text)
  except RecursionError:
    raise ValueError('nested too deeply') from None


class ReplayLine(msgspec.Struct, forbid_unknown_fields=True, gc=False):
  """The shapes of a replay line, for the fast path of ``classify_line``."""
  source: Union[str, msgspec.UnsetType] = msgspec.UNSET
  data: Union[str, msgspec.UnsetType] = msgspec.UNSET
  watermark: Union[int, msgspec.UnsetType] = msgspec.UNSET
  advance_processing_time: Union[int, float, msgspec.UnsetType] = msgspec.UNSET


LINE_DECODER = msgspec.json.Decoder(ReplayLine)
_UNSET = msgspec.UNSET


def classify_line_fast(text: Union[str, bytes]):
  """``classify_line`` for well-formed lines, or None: then ``classify_line`` decides
  (and names what is wrong)."""
  try:
    line = LINE_DECODER.decode(text)
  except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
    return None
  source = line.source
  if source is not _UNSET and source and line.advance_processing_time is _UNSET:
    if line.data is not _UNSET and line.watermark is _UNSET:
      return 'data', source, line.data
    mark = line.watermark
    if line.data is _UNSET and mark is not _UNSET and MIN_WATERMARK_MS <= mark <= MAX_WATERMARK_MS:
      return 'watermark', source, mark
  elif (source is _UNSET and line.data is _UNSET and line.watermark is _UNSET and
        line.advance_processing_time is not _UNSET and line.advance_processing_time >= 0):
    if math.isfinite(line.advance_processing_time):
      return 'processing_time', None, line.advance_processing_time
  return None


def classify_line(path: str, number: int, text: str):
  """``(kind, source, payload)`` of a line that ``classify_line_fast`` could not
  take, or ReplayError saying what is wrong with it."""
  try:
    obj = _decode(text)
  except ValueError as e:
    raise ReplayError(path, number, f'not JSON ({e})') from None
  if not isinstance(obj, dict):
    raise ReplayError(path, number, f'expected a JSON object, got {type(obj).__name__}')
  keys = set(obj)
  if keys == {'source', 'data'} or keys == {'source', 'watermark'}:
    source = obj['source']
    if not isinstance(source, str) or not source:
      raise ReplayError(path, number, '"source" must be a non-empty string')
    if 'data' in obj:
      if not isinstance(obj['data'], str):
        raise ReplayError(path, number, '"data" must be a string (the payload as received)')
      return 'data', source, obj['data']
    mark = obj['watermark']
    if not _is_int(mark):
      raise ReplayError(path, number, '"watermark" must be an integer (epoch ms)')
    if not MIN_WATERMARK_MS <= mark <= MAX_WATERMARK_MS:
      raise ReplayError(path, number, f'"watermark" {mark} is out of range')
    return 'watermark', source, mark
  if keys == {'advance_processing_time'}:
    seconds = obj['advance_processing_time']
    if (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or
        not math.isfinite(seconds) or seconds < 0):
      raise ReplayError(
          path, number, '"advance_processing_time" must be a non-negative number of seconds')
    return 'processing_time', None, seconds
  raise ReplayError(
      path, number,
      'unknown line shape with keys %s; expected {"source","data"}, '
      '{"source","watermark"} or {"advance_processing_time"}' % sorted(keys))


class Timeline:
  """The pipeline watermark and processing time as a replay's lines arrive.

  Steps are numbered in file order: each run of messages with nothing else
  between them is one step, and so is each watermark or processing-time line
  that changes something.
  """

  def __init__(self, sources: Tuple[str, ...]):
    self.source_marks: Dict[str, Optional[int]] = {s: None for s in sources}
    self.max_lag: Dict[str, int] = {s: 0 for s in sources}
    self.watermark: Optional[int] = None  # the pipeline watermark; None: beginning of time
    self.processing_time = 0.0  # seconds since the start
    self.step = -1
    self._in_messages = False

  def arrive(self) -> None:
    """A message arrives: the first of a run starts a step."""
    if not self._in_messages:
      self.step += 1
      self._in_messages = True

  def lag(self, source: str) -> Optional[int]:
    """The source's lag behind the most advanced one (None: no watermark yet)."""
    if self.watermark is None:
      return None
    marks = self._every_mark()
    return max(marks.values()) - marks[source]

  def _every_mark(self) -> Dict[str, int]:
    """Each source's watermark, once every source has one."""
    return {s: m for s, m in self.source_marks.items() if m is not None}

  def advance_processing_time(self, seconds: float) -> bool:
    """Returns whether this is a step (it moved processing time on)."""
    if seconds <= 0:
      return False
    self.processing_time += seconds
    self.step += 1
    self._in_messages = False
    return True

  def advance_watermark(self, source: str, millis: int) -> bool:
    """Returns whether the pipeline watermark moved (a step). Raises
    ValueError if the source's watermark moves backwards."""
    previous = self.source_marks[source]
    if previous is not None and millis < previous:
      raise ValueError(
          f'watermark of source {source!r} moves backwards ({millis} < {previous})')
    self.source_marks[source] = millis
    if any(m is None for m in self.source_marks.values()):
      return False
    marks = self._every_mark()
    lowest = min(marks.values())
    highest = max(marks.values())
    for s, m in marks.items():
      self.max_lag[s] = max(self.max_lag[s], highest - m)
    if self.watermark is not None and lowest <= self.watermark:
      return False
    self.watermark = lowest
    self.step += 1
    self._in_messages = False
    return True

  def finish(self) -> None:
    """The end of the file: every watermark advances to infinity (one step)."""
    self.step += 1
    self._in_messages = False

  def apply(self, kind: str, source: Optional[str], payload) -> bool:
    """One line (a message, a source's watermark, processing time); returns
    whether the watermark or processing time moved (ValueError: it went back)."""
    if kind == 'data':
      self.arrive()
      return False
    if kind == 'processing_time':
      return self.advance_processing_time(payload)
    assert source is not None  # a watermark line names its source
    return self.advance_watermark(source, payload)


def walk_timeline(path: str, timeline: Timeline, lines: Iterable[tuple]) -> Iterator[Tuple[tuple, bool]]:
  """The one walk of a replay's timeline: each line ``(number, kind, source,
  payload)`` applied to ``timeline`` and yielded with whether it moved it (other
  kinds, an index's chunk marks, pass through); ReplayError names a bad line."""
  for line in lines:
    number, kind, source, payload = line[:4]
    if kind not in ('data', 'watermark', 'processing_time'):
      yield line, False
      continue
    try:
      moved = timeline.apply(kind, source, payload)
    except ValueError as e:
      raise ReplayError(path, number, str(e)) from None
    yield line, moved


def _checked_lines(path: str, sources: Dict[str, None]) -> Iterator[tuple]:
  """Every non-blank line as ``(offset, number, kind, source, payload)``,
  adding the sources it names to ``sources``; raises ReplayError at the first
  bad line."""
  offset = 0
  for number, raw, line in read_lines(path):
    if line is not None:
      kind, source, payload = line
      if source is not None:
        sources.setdefault(source)
      yield offset, number, kind, source, payload
    offset += len(raw)


def _validated_lines(path: str) -> Tuple[List[tuple], Tuple[str, ...]]:
  """Every non-blank line as ``(number, kind, source, payload)``, and the sources."""
  sources: Dict[str, None] = {}
  return [line[1:] for line in _checked_lines(path, sources)], tuple(sources)


def compile_replay(path: str) -> Replay:
  """Reads and checks the whole file, then returns its steps."""
  lines, sources = _validated_lines(path)
  timeline = Timeline(sources)
  steps: List[Step] = []
  messages = 0
  for (_, kind, source, payload), moved in walk_timeline(path, timeline, lines):
    if kind == 'data':
      messages += 1
      message = Message(source, payload, timeline.watermark, timeline.lag(source))
      if steps and isinstance(steps[-1], Messages):
        steps[-1].batch.append(message)
      else:
        steps.append(Messages([message]))
    elif moved and kind == 'processing_time':
      steps.append(ProcessingTime(payload))
    elif moved:
      steps.append(Watermark(timeline.watermark))
  timeline.finish()
  steps.append(Watermark(None))
  sha256 = file_sha256(path)
  return Replay(steps, sources, messages, timeline.max_lag, replay_digest(sha256), sha256)


def replay_sources(path: str) -> Tuple[str, ...]:
  """The sources a replay names, in order of first mention (a checking pass)."""
  sources: Dict[str, None] = {}
  for _ in _checked_lines(path, sources):
    pass
  return tuple(sources)


def walk_replay(path: str, sources: Tuple[str, ...]) -> Iterator[tuple]:
  """The file streamed, nothing kept: each line as ``(kind, source, payload, pipeline watermark
  after it)``; ``sources`` as ``replay_sources`` gives them. ReplayError as ``compile_replay``."""
  timeline = Timeline(sources)
  lines = (line[1:] for line in _checked_lines(path, dict.fromkeys(sources)))
  for (_, kind, source, payload), _ in walk_timeline(path, timeline, lines):
    yield kind, source, payload, timeline.watermark


class Arrivals:
  """What a replay delivered, source by source, in file order: the messages
  each source sent and each source's watermark as the messages went on
  (``(messages arrived so far, watermark ms)`` at each of its watermark lines)."""

  def __init__(self, sources: Iterable[str] = ()):
    self.received: Dict[str, int] = dict.fromkeys(sources, 0)
    self.watermarks: Dict[str, List[Tuple[int, int]]] = {s: [] for s in self.received}
    self.messages = 0

  def add(self, kind: str, source: Optional[str], payload) -> None:
    """One line as ``(kind, source, payload)``."""
    if source is None:  # processing time
      return
    if source not in self.received:
      self.received[source] = 0
      self.watermarks[source] = []
    if kind == 'data':
      self.messages += 1
      self.received[source] += 1
    else:
      self.watermarks[source].append((self.messages, payload))

  def extend(self, later: 'Arrivals') -> None:
    """What ``later`` saw, after what this one saw."""
    for source, received in later.received.items():
      self.received[source] = self.received.get(source, 0) + received
      self.watermarks.setdefault(source, []).extend(
          (self.messages + before, mark) for before, mark in later.watermarks[source])
    self.messages += later.messages

  def sources_received(self) -> Dict[str, int]:
    """The messages of each source that sent any."""
    return {s: n for s, n in self.received.items() if n}

  def to_json_dict(self) -> dict:
    return {'received': self.sources_received(),
            'watermarks': {s: [list(p) for p in points] for s, points in self.watermarks.items()}}
