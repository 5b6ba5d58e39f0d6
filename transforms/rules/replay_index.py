"""A checked replay as chunks that workers read on their own: the bulk replay's input.

``index_replay`` checks every line (contract section 2) before anything runs,
cutting the file into scans that run in parallel on a large file, and keeps no
payloads: only where each chunk of messages starts, the timeline there, the
watermark and processing-time steps, and what each source delivered.
``read_chunk`` reads a chunk's messages line by line; ``read_chunk_columns``
reads the same messages as columns, handing the chunk's lines to msgspec as one
JSON array. That relies on the index's check: every line of the file is one
JSON value on its own, so the array holds exactly one element per line, and a
line that msgspec refuses where the standard library takes it
(``replay.classify_line``) is found by its position and read alone.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import copy
import itertools
import multiprocessing
import os
import re
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import msgspec

from transforms.rules.replay import (
    LINE_DECODER, Arrivals, ReplayError, Timeline, classify_line, classify_line_fast, ReplayLine, read_lines,
    walk_timeline, file_sha256, replay_digest)

#: A file is checked by one scan per core, in parallel, each scan of at least this many bytes.
PARALLEL_INDEX_BYTES = 32 * 1024 * 1024


class ChunkStart(NamedTuple):
  """Where a run of ``messages`` messages begins, and the timeline just before."""
  offset: int  # byte offset of the chunk's first line in the file
  first_message: int  # arrival order of its first message, from 0
  messages: int
  timeline: Timeline
  #: bytes from ``offset`` that hold its messages (None: to the end of the file)
  length: Optional[int] = None


class ReplayIndex(NamedTuple):
  """A checked replay as chunks that can be read independently, and its timeline."""
  path: str
  sources: Tuple[str, ...]
  messages: int
  chunks: List[ChunkStart]
  #: ``(step, pipeline watermark ms or None for infinity)`` of every watermark step
  watermark_steps: List[Tuple[int, Optional[int]]]
  #: ``(step, processing time s)`` of every processing-time step
  processing_time_steps: List[Tuple[int, float]]
  #: what each source delivered
  arrivals: Arrivals
  #: the file's identity in its messages' ids (``replay_digest``)
  digest: str = ''
  #: the file's whole sha256 (hex)
  sha256: str = ''


class _Scan(NamedTuple):
  """What a scan of a part of the file found, numbered within the part."""
  lines: int
  #: ``(line, reason)`` of the first bad line; the scan stopped there
  error: Optional[Tuple[int, str]]
  sources: List[str]
  #: control lines ``(line, kind, source, payload)``, runs of messages
  #: ``(line, 'data', None, count)`` and chunk starts ``(line, 'chunk',
  #: offset, messages before it in the part)``
  items: List[tuple]
  messages: int
  arrivals: Arrivals


def _scan(path: str, start: int, end: Optional[int], chunk_messages: int) -> _Scan:
  """Checks the lines of ``[start, end)`` (whole lines); a chunk starts at the
  part's first message and after every ``chunk_messages``."""
  sources: Dict[str, None] = {}
  items: List[tuple] = []
  arrivals = Arrivals()
  messages = run = lines = 0
  offset = start
  try:
    for lines, raw, line in read_lines(path, start, end):
      at, offset = offset, offset + len(raw)
      if line is None:
        continue
      kind, source, payload = line
      if source is not None:
        sources.setdefault(source)
      arrivals.add(kind, source, payload)
      if kind == 'data':
        if messages % chunk_messages == 0:
          if run:
            items.append((lines, 'data', None, run))
            run = 0
          items.append((lines, 'chunk', at, messages))
        messages += 1
        run += 1
      else:
        if run:
          items.append((lines, 'data', None, run))
          run = 0
        items.append((lines, kind, source, payload))
  except ReplayError as e:
    return _Scan(e.line, (e.line, e.reason), list(sources), items, messages, arrivals)
  if run:
    items.append((lines, 'data', None, run))
  return _Scan(lines, None, list(sources), items, messages, arrivals)


def _parts(path: str, parts: int) -> List[Tuple[int, Optional[int]]]:
  """``parts`` byte ranges of about equal size that begin and end at lines."""
  size = os.path.getsize(path)
  cuts = [0]
  with open(path, 'rb') as f:
    for k in range(1, parts):
      f.seek(max(size * k // parts - 1, cuts[-1]))
      f.readline()
      if cuts[-1] < f.tell() < size:
        cuts.append(f.tell())
  return [(a, b) for a, b in zip(cuts, cuts[1:])] + [(cuts[-1], None)]


def _scans(path: str, chunk_messages: int, parts: int) -> Tuple[List[_Scan], str]:
  """The scans of the file's parts, in order, and its sha256: one process per
  part (forked: it inherits what is imported), the hash meanwhile here."""
  ranges = _parts(path, parts)
  if len(ranges) == 1:
    return [_scan(path, 0, None, chunk_messages)], file_sha256(path)
  with concurrent.futures.ProcessPoolExecutor(
      len(ranges), mp_context=multiprocessing.get_context('fork')) as pool:
    running = [pool.submit(_scan, path, start, end, chunk_messages) for start, end in ranges]
    sha256 = file_sha256(path)
    return [scan.result() for scan in running], sha256


def index_replay(path: str, chunk_messages: int = 20000, parts: Optional[int] = None
                 ) -> ReplayIndex:
  """Reads and checks the whole file like ``compile_replay``, keeping no
  payloads: the file is cut into chunks of at most ``chunk_messages``
  messages, each with the timeline where it starts, for readers working in
  parallel. The file is checked in ``parts`` at once (default: one per core,
  each of ``PARALLEL_INDEX_BYTES`` or more)."""
  if chunk_messages <= 0:
    raise ValueError(f'chunk_messages must be positive, got {chunk_messages}')
  if parts is None:
    size = os.path.getsize(path)
    parts = min(os.cpu_count() or 1, size // PARALLEL_INDEX_BYTES) or 1
  scans, sha256 = _scans(path, chunk_messages, parts)
  # Pass 1, merged: the parts' items, numbered in the file.
  sources: Dict[str, None] = {}
  items: List[tuple] = []
  arrivals = Arrivals()
  lines = messages = 0
  for scan in scans:
    if scan.error is not None:
      raise ReplayError(path, lines + scan.error[0], scan.error[1])
    sources.update(dict.fromkeys(scan.sources))
    for number, kind, source, payload in scan.items:
      if kind == 'chunk':
        payload += messages
      items.append((number + lines, kind, source, payload))
    arrivals.extend(scan.arrivals)
    lines += scan.lines
    messages += scan.messages

  # Pass 2: the timeline, now that every source is known.
  timeline = Timeline(tuple(sources))
  chunks: List[ChunkStart] = []
  watermark_steps: List[Tuple[int, Optional[int]]] = []
  processing_time_steps: List[Tuple[int, float]] = []
  for (_, kind, chunk_offset, first), moved in walk_timeline(path, timeline, items):
    if kind == 'chunk':
      if chunks:
        chunks[-1] = chunks[-1]._replace(messages=first - chunks[-1].first_message)
      chunks.append(ChunkStart(chunk_offset, first, 0, copy.deepcopy(timeline)))
    elif moved and kind == 'processing_time':
      processing_time_steps.append((timeline.step, timeline.processing_time))
    elif moved:
      watermark_steps.append((timeline.step, timeline.watermark))
  if chunks:
    chunks[-1] = chunks[-1]._replace(messages=messages - chunks[-1].first_message)
  chunks = [chunk._replace(length=following.offset - chunk.offset)
            for chunk, following in zip(chunks, chunks[1:])] + chunks[-1:]
  timeline.finish()
  watermark_steps.append((timeline.step, None))
  return ReplayIndex(path, tuple(sources), messages, chunks, watermark_steps,
                     processing_time_steps, arrivals, replay_digest(sha256), sha256)


def read_chunk(path: str, chunk: ChunkStart) -> Iterator[Tuple[int, int, Optional[int], float, str, str]]:
  """The chunk's messages as ``(arrival index, step, pipeline watermark at
  arrival, processing time at arrival, source, payload)``. The file must be the
  one indexed (it is not checked again)."""
  timeline = copy.deepcopy(chunk.timeline)
  left = chunk.messages
  seq = chunk.first_message
  with open(path, 'rb') as f:
    f.seek(chunk.offset)
    for raw in f:
      line = classify_line_fast(raw)
      if line is None:
        text = raw.decode('utf-8')
        if not text.strip():
          continue
        line = classify_line(path, 0, text)
      kind, source, payload = line
      if kind != 'data':  # (the file was checked: no error here)
        timeline.apply(kind, source, payload)
        continue
      timeline.arrive()
      yield seq, timeline.step, timeline.watermark, timeline.processing_time, source, payload
      seq += 1
      left -= 1
      if not left:
        return


_LINES = msgspec.json.Decoder(List[ReplayLine])
#: Where msgspec says it stopped: a byte offset, or an element of the array.
_POSITION = re.compile(r'\(byte (\d+)\)|`\$\[(\d+)\]')
_OPEN, _CLOSE = ord('['), ord(']')
_UNSET = msgspec.UNSET
#: The start of an escape msgspec may refuse (a lone surrogate), or of an escaped backslash.
_SURROGATE_ESCAPE = re.compile(rb'\\u[dD]')


class ChunkColumns:
  """A chunk's messages as columns, in arrival order: the ``i``-th message is
  the replay's message number ``first + i`` (from 0), arrived at step
  ``step[i]`` (``ReplayIndex`` knows the watermark and processing time of
  each step) from ``source[i]`` with the payload ``data[i]``."""
  __slots__ = ('first', 'step', 'source', 'data')

  def __init__(self, first: int, step: List[int], source: List[str], data: List[str]):
    self.first = first
    self.step = step
    self.source = source
    self.data = data

  def __len__(self) -> int:
    return len(self.data)


def decode_lines(lines: Sequence[bytes]) -> List[Optional[ReplayLine]]:
  """Each line decoded as a ``ReplayLine``, in as few calls as the lines allow;
  None for a line msgspec refuses. The lines must be checked ones: each one
  JSON value."""
  buffer = bytearray(b'[' + b','.join(lines) + b']')
  view = memoryview(buffer)
  # bounds[i]: the separator before line i; bounds[-1]: the closing bracket
  bounds = [at + i for i, at in enumerate(itertools.accumulate(map(len, lines), initial=0))]

  def decode(first: int, last: int) -> Tuple[Optional[list], Optional[int]]:
    """Lines [first, last) as one array, or None and the line msgspec stopped
    at (None if it does not say)."""
    opening, closing = bounds[first], bounds[last]
    kept = buffer[opening], buffer[closing]
    buffer[opening], buffer[closing] = _OPEN, _CLOSE
    try:
      got = _LINES.decode(view[opening:closing + 1])
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
      match = _POSITION.search(str(e))
      if match is None:
        return None, None
      if match.group(2) is not None:
        return None, first + int(match.group(2))
      return None, bisect.bisect_right(bounds, opening + int(match.group(1))) - 1
    finally:
      buffer[opening], buffer[closing] = kept
    return (got if len(got) == last - first else None), None

  # msgspec refuses a lone surrogate escape, which a garbage payload may hold:
  # a line that may have one is decoded alone, the lines between together
  alone = sorted({bisect.bisect_right(bounds, found.start()) - 1
                  for found in _SURROGATE_ESCAPE.finditer(buffer)})
  decoded: List[Optional[ReplayLine]] = []
  first = 0
  for stop in [*alone, len(lines)]:
    while first < stop:
      got, refused = decode(first, stop)
      if got is not None:
        decoded.extend(got)
        break
      if refused is None or not first <= refused < stop:
        decoded.extend(map(_decode_line, lines[first:stop]))
        break
      before = decode(first, refused)[0] if refused > first else []
      decoded.extend(map(_decode_line, lines[first:refused]) if before is None else before)
      decoded.append(None)
      first = refused + 1
    if stop < len(lines):
      decoded.append(_decode_line(lines[stop]))
    first = stop + 1
  return decoded


def _decode_line(line: bytes) -> Optional[ReplayLine]:
  try:
    return LINE_DECODER.decode(line)
  except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
    return None


def read_chunk_columns(path: str, chunk: ChunkStart) -> ChunkColumns:
  """``replay.read_chunk``'s messages as columns. The file must be the one indexed."""
  with open(path, 'rb') as f:
    f.seek(chunk.offset)
    block = f.read() if chunk.length is None else f.read(chunk.length)
  lines = [line for line in block.split(b'\n') if line.strip()]
  decoded = decode_lines(lines)
  datas: List = [_UNSET if line is None else line.data for line in decoded]
  sources: List = [None if line is None else line.source for line in decoded]
  # lines that are not a message, or not decoded above: few, taken one by one
  others = [i for i, data in enumerate(datas) if data is _UNSET]
  columns = ChunkColumns(chunk.first_message, [], [], [])
  timeline = copy.deepcopy(chunk.timeline)
  start = 0  # the first line not yet in the columns
  for i in others:
    fast = classify_line_fast(lines[i])
    if fast is None:
      text = lines[i].decode('utf-8')
      fast = classify_line('', 0, text) if text.strip() else ('blank', None, None)
    kind, source, payload = fast
    if kind == 'data':
      datas[i], sources[i] = payload, source
      continue
    _add_run(columns, timeline, sources[start:i], datas[start:i])
    if kind != 'blank':  # (the file was checked: no error here)
      timeline.apply(kind, source, payload)
    start = i + 1
  _add_run(columns, timeline, sources[start:], datas[start:])
  for column in (columns.step, columns.source, columns.data):
    del column[chunk.messages:]
  return columns


def _add_run(columns: ChunkColumns, timeline: Timeline, sources: list, datas: list) -> None:
  """A run of messages with no other line between them."""
  if datas:
    timeline.arrive()
    columns.source.extend(sources)
    columns.data.extend(datas)
    columns.step.extend([timeline.step] * len(datas))
