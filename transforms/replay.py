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

import json
import math
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

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


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _read_lines(path: str) -> Iterator[Tuple[int, str]]:
  with open(path, 'rb') as f:
    for number, raw in enumerate(f, start=1):
      try:
        yield number, raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise ReplayError(path, number, f'not UTF-8 ({e.reason})') from None


def _classify(path: str, number: int, text: str):
  try:
    obj = json.loads(text)
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


def compile_replay(path: str) -> Replay:
  """Reads and checks the whole file, then returns its steps."""
  lines = []
  sources: Dict[str, None] = {}
  for number, text in _read_lines(path):
    if not text.strip():
      continue
    kind, source, payload = _classify(path, number, text)
    if source is not None:
      sources.setdefault(source)
    lines.append((number, kind, source, payload))

  source_marks: Dict[str, Optional[int]] = {s: None for s in sources}
  max_lag = {s: 0 for s in sources}
  steps: List[Step] = []
  pipeline_mark: Optional[int] = None
  messages = 0
  for number, kind, source, payload in lines:
    if kind == 'data':
      messages += 1
      lag = None
      if pipeline_mark is not None:
        lag = max(source_marks.values()) - source_marks[source]
      message = Message(source, payload, pipeline_mark, lag)
      if steps and isinstance(steps[-1], Messages):
        steps[-1].batch.append(message)
      else:
        steps.append(Messages([message]))
    elif kind == 'processing_time':
      if payload > 0:
        steps.append(ProcessingTime(payload))
    else:
      previous = source_marks[source]
      if previous is not None and payload < previous:
        raise ReplayError(
            path, number,
            f'watermark of source {source!r} moves backwards ({payload} < {previous})')
      source_marks[source] = payload
      if all(m is not None for m in source_marks.values()):
        lowest = min(source_marks.values())
        highest = max(source_marks.values())
        for s, m in source_marks.items():
          max_lag[s] = max(max_lag[s], highest - m)
        if pipeline_mark is None or lowest > pipeline_mark:
          pipeline_mark = lowest
          steps.append(Watermark(lowest))
  steps.append(Watermark(None))
  return Replay(steps, tuple(sources), messages, max_lag)
