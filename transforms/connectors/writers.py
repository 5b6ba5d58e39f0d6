"""The writers of a run's output files: JSON lines appended a bundle at a time,
and JSON objects replaced whole. On a local disk they append to and replace
files; on any other Beam filesystem (``gs://``...) each bundle's lines are a
new part object, joined by the launcher (pipeline/runfolder/objects.py)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
import msgspec
from apache_beam.coders import coders
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

_LOG = logging.getLogger(__name__)
_FILE_LOCK = threading.Lock()


_ENCODE = msgspec.json.Encoder().encode


def json_line(record) -> str:
  """A record as one line of a JSON-lines output file."""
  obj = record.to_json_dict() if hasattr(record, 'to_json_dict') else record
  # ASCII lines; a payload that is not UTF-8 is valid text plus its exact
  # bytes in base64 (model.DeadLetter), so every JSON reader accepts the line.
  if isinstance(obj, dict) and all(type(v) is str for v in obj.values()):
    # a record of strings (a dead letter): msgspec writes what the standard
    # library does, ~6x faster, unless it holds non-ASCII or DEL, which only
    # the standard library escapes (or a lone surrogate, which msgspec refuses)
    try:
      line = _ENCODE(obj)
    except UnicodeEncodeError:
      line = b'\x80'
    if line.isascii() and b'\x7f' not in line:
      return line.decode('ascii') + '\n'
  return json.dumps(obj, separators=(',', ':'), allow_nan=False) + '\n'


def is_local(path: str) -> bool:
  """Whether ``path`` is on a local disk (no Beam filesystem scheme such as
  ``gs://``)."""
  return FileSystems.get_scheme(path) in (None, 'file')


#: Where the part objects of a JSON-lines file on an object store are: the
#: launcher joins them into the file (pipeline/runfolder/objects.py).
PARTS_SUFFIX = '.parts'


def write_object_json(path: str, record: dict) -> None:
  """``record`` as the whole object at ``path``, on any Beam filesystem (an
  object appears whole)."""
  with FileSystems.create(path, mime_type='application/json') as f:
    f.write((json.dumps(record, indent=2) + '\n').encode('utf-8'))


def make_parent(path: str) -> None:
  """The folder of a local output file, made where the writer runs (a worker
  may not share the launcher's disk)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]


#: Characters of JSON lines a writer holds before it writes them (a bundle of a
#: bulk replay can carry hundreds of megabytes of dead letters).
WRITE_EVERY_CHARS = 16 * 1024 * 1024


class _BundleLinesFn(beam.DoFn):
  """Collects a bundle's records as JSON lines; ``_write`` stores them at its
  end, or whole lines at a time once they reach ``_WRITE_EVERY`` characters."""
  _WRITE_EVERY: Optional[int] = WRITE_EVERY_CHARS

  def __init__(self, path: str):
    self._path = path

  def start_bundle(self):
    self._lines: List[str] = []
    self._chars = 0

  def process(self, record) -> Iterable:
    line = json_line(record)
    self._lines.append(line)
    self._chars += len(line)
    if self._WRITE_EVERY is not None and self._chars >= self._WRITE_EVERY:
      self._flush()
    return ()

  def finish_bundle(self):
    self._flush()

  def _flush(self) -> None:
    if self._lines:
      self._write(''.join(self._lines).encode('utf-8'))
      self._lines = []
      self._chars = 0

  def _write(self, data: bytes) -> None:
    raise NotImplementedError


class _AppendLinesFn(_BundleLinesFn):
  """A bundle's lines as one atomic append to a local file."""

  def setup(self):
    make_parent(self._path)

  def _write(self, data: bytes) -> None:
    with _FILE_LOCK:
      fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      try:
        _write_all(fd, data)
      finally:
        os.close(fd)


class _WritePartFn(_BundleLinesFn):
  """A bundle's lines as one new object under ``PATH.parts/`` (object stores
  do not append); the launcher joins the parts after the job."""

  def _write(self, data: bytes) -> None:
    part = FileSystems.join(self._path + PARTS_SUFFIX, f'{uuid.uuid4().hex}.jsonl')
    with FileSystems.create(part, mime_type='application/x-ndjson') as f:
      f.write(data)


class _ReplaceObjectFn(beam.DoFn):
  """Each record as the whole object at ``path`` (an object appears whole),
  unless the object holds a record that ``order`` ranks above it (object
  stores offer no lock: two writers at the same instant may still race)."""

  def __init__(self, path: str, order: Optional[Callable[[Dict], Any]] = None):
    self._path = path
    self._order = order

  def process(self, record: Dict) -> Iterable:
    if self._order is None or not _behind(record, _read_json(self._path), self._order):
      write_object_json(self._path, record)
    return ()


class _FileSink(beam.PTransform):
  """A writer of one output file: ``_WRITER`` on a local disk,
  ``_OBJECT_WRITER`` on any other Beam filesystem; ``_STEP`` is its label."""
  _WRITER: type
  _OBJECT_WRITER: type
  _STEP: str

  def __init__(self, path: str):
    super().__init__()
    if not path:
      raise ValueError('path must be set')
    self._path = path

  def expand(self, pcoll):
    writer = self._WRITER if is_local(self._path) else self._OBJECT_WRITER
    return pcoll | self._STEP >> beam.ParDo(writer(self._path))


class _CollectLinesFn(_BundleLinesFn):
  """A bundle's lines as one ``(path, bytes)`` element, for the keyed writer."""
  _WRITE_EVERY = None

  def finish_bundle(self) -> Iterable:
    if self._lines:
      data = ''.join(self._lines).encode('utf-8')
      self._lines = []
      yield WindowedValue((self._path, data), MIN_TIMESTAMP, (GlobalWindow(),))


def _file_size(path: str) -> int:
  try:
    return os.path.getsize(path)
  except FileNotFoundError:
    return 0


class _AppendFromCheckpointFn(beam.DoFn):
  """The one writer of a file (keyed by its path): appends each batch and
  keeps the file's length in state, so that after a restore, whose state is
  the checkpoint's, it first cuts off what was written since that checkpoint:
  the input replayed from the checkpoint writes it again, once. A seed
  (``(path, None)``) records the length a file has when the job starts."""
  LENGTH = ReadModifyWriteStateSpec('length', coders.VarIntCoder())

  def __init__(self):
    self.cut = Metrics.counter('tidemark', 'output_bytes_rewritten_after_restore')

  def process(self, element: Tuple[str, Optional[bytes]],
              length=beam.DoFn.StateParam(LENGTH)) -> Iterable:
    path, data = element
    known = length.read()
    if data is None:  # the seed
      if known is None:
        make_parent(path)
        length.write(_file_size(path))
      return ()
    size = _file_size(path)
    if known is None:
      known = size
    elif size > known:
      _LOG.warning('%s: cutting %d bytes written after the checkpoint the job was restored '
                   'from (the replayed input writes them again)', path, size - known)
      self.cut.inc(size - known)
      os.truncate(path, known)
    elif size < known:
      _LOG.warning('%s is shorter (%d bytes) than this job wrote (%d): appending', path,
                   size, known)
      known = size
    make_parent(path)
    with _FILE_LOCK:
      fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      try:
        _write_all(fd, data)
      finally:
        os.close(fd)
    length.write(known + len(data))
    return ()


class WriteJsonLines(_FileSink):
  """Appends each element as one JSON line to a file, one write per bundle
  (or per ``WRITE_EVERY_CHARS`` of it, whole lines):
  an atomic append to a local file (parallel workers on one machine do not
  interleave), one part object per bundle on an object store.

  ``exactly_once`` (a local file on a checkpointing runner, after
  ``AwaitCheckpoint``): one keyed writer per file, which after a restore cuts
  the file back to its length at the checkpoint before the replayed input
  writes again, so every line is in the file once however often the job
  restarts.
  """
  _WRITER, _OBJECT_WRITER, _STEP = _AppendLinesFn, _WritePartFn, 'Append'

  def __init__(self, path: str, exactly_once: bool = False):
    super().__init__(path)
    if exactly_once and not is_local(path):
      raise ValueError(f'exactly_once appends to a local file; {path} is not one')
    self._exactly_once = exactly_once

  def expand(self, pcoll):
    if not self._exactly_once:
      return super().expand(pcoll)
    batches = (
        pcoll
        | 'Unwindowed' >> beam.WindowInto(GlobalWindows())
        | 'Collect' >> beam.ParDo(_CollectLinesFn(self._path)).with_output_types(
            Tuple[str, Optional[bytes]]))
    seed = pcoll.pipeline | 'Seed' >> beam.Create([(self._path, None)]).with_output_types(
        Tuple[str, Optional[bytes]])
    return ((batches, seed)
            | 'WithSeed' >> beam.Flatten()
            | self._STEP >> beam.ParDo(_AppendFromCheckpointFn()))


class _ReplaceFileFn(beam.DoFn):
  """Each record as the whole file, atomically, unless the file holds a
  record that ``order`` ranks above it. Writers in several processes take
  turns on a lock of the file's folder."""

  def __init__(self, path: str, order: Optional[Callable[[Dict], Any]] = None):
    self._path = path
    self._order = order

  def setup(self):
    make_parent(self._path)

  def process(self, record: Dict) -> Iterable:
    folder = os.open(os.path.dirname(os.path.abspath(self._path)), os.O_RDONLY)
    try:
      with _FILE_LOCK:
        fcntl.flock(folder, fcntl.LOCK_EX)
        if self._order is None or not _behind(record, _read_json(self._path), self._order):
          tmp = f'{self._path}.tmp.{os.getpid()}.{threading.get_ident()}'
          with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(record, f, indent=2)
            f.write('\n')
          os.replace(tmp, self._path)
    finally:
      os.close(folder)  # releases the lock
    return ()


def _read_json(path: str) -> Optional[Dict]:
  """The JSON object at ``path`` on any Beam filesystem, or None when there is
  none (or it is not JSON)."""
  try:
    with FileSystems.open(path, compression_type='uncompressed') as f:
      return json.loads(f.read())
  except Exception:  # noqa: BLE001 (missing, unreadable or not JSON: nothing to keep)
    return None


def _behind(record: Dict, stored: Optional[Dict], order: Callable[[Dict], Any]) -> bool:
  """Whether ``record`` ranks below the ``stored`` one."""
  if stored is None:
    return False
  try:
    return order(record) < order(stored)
  except (KeyError, TypeError):
    return False  # a stored record of another shape: replace it


class WriteLatestJson(_FileSink):
  """Writes each element as the whole content of a JSON file, atomically.

  With ``order`` (a key function) the file only moves forward: a record that
  ranks below the one the file holds is not written, so records that reach
  the writer out of order (parallel workers, several per checkpoint) never
  take the file back. Without it the last element written wins.
  """
  _WRITER, _OBJECT_WRITER, _STEP = _ReplaceFileFn, _ReplaceObjectFn, 'Replace'

  def __init__(self, path: str, order: Optional[Callable[[Dict], Any]] = None):
    super().__init__(path)
    self._order = order

  def expand(self, pcoll):
    writer = self._WRITER if is_local(self._path) else self._OBJECT_WRITER
    return pcoll | self._STEP >> beam.ParDo(writer(self._path, self._order))
