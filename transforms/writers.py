"""The writers of a run's output files: JSON lines appended once per bundle,
and JSON objects replaced whole. On a local disk they append to and replace
files; on any other Beam filesystem (``gs://``...) each bundle's lines are a
new part object, joined by the launcher (transforms/objects.py)."""

from __future__ import annotations

import json
import os
import threading
import uuid
from typing import Dict, Iterable, List

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

_FILE_LOCK = threading.Lock()


def _to_json_line(record) -> str:
  obj = record.to_json_dict() if hasattr(record, 'to_json_dict') else record
  # ensure_ascii keeps payloads with lone surrogates representable, exactly.
  return json.dumps(obj, separators=(',', ':'), allow_nan=False) + '\n'


def is_local(path: str) -> bool:
  """Whether ``path`` is on a local disk (no Beam filesystem scheme such as
  ``gs://``)."""
  return FileSystems.get_scheme(path) in (None, 'file')


#: Where the part objects of a JSON-lines file on an object store are: the
#: launcher joins them into the file (transforms/objects.py).
PARTS_SUFFIX = '.parts'


def write_object_json(path: str, record: dict) -> None:
  """``record`` as the whole object at ``path``, on any Beam filesystem (an
  object appears whole)."""
  with FileSystems.create(path, mime_type='application/json') as f:
    f.write((json.dumps(record, indent=2) + '\n').encode('utf-8'))


def _make_parent(path: str) -> None:
  """The folder of a local output file, made where the writer runs (a worker
  may not share the launcher's disk)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]


class _BundleLinesFn(beam.DoFn):
  """Collects a bundle's records as JSON lines; ``_write`` stores them at its end."""

  def __init__(self, path: str):
    self._path = path

  def start_bundle(self):
    self._lines: List[str] = []

  def process(self, record) -> Iterable:
    self._lines.append(_to_json_line(record))
    return ()

  def finish_bundle(self):
    if self._lines:
      self._write(''.join(self._lines).encode('utf-8'))
      self._lines = []

  def _write(self, data: bytes) -> None:
    raise NotImplementedError


class _AppendLinesFn(_BundleLinesFn):
  """A bundle's lines as one atomic append to a local file."""

  def setup(self):
    _make_parent(self._path)

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
  """Each record as the whole object at ``path`` (an object appears whole)."""

  def __init__(self, path: str):
    self._path = path

  def process(self, record: Dict) -> Iterable:
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


class WriteJsonLines(_FileSink):
  """Appends each element as one JSON line to a file, one write per bundle:
  an atomic append to a local file (parallel workers on one machine do not
  interleave), one part object per bundle on an object store."""
  _WRITER, _OBJECT_WRITER, _STEP = _AppendLinesFn, _WritePartFn, 'Append'


class _ReplaceFileFn(beam.DoFn):

  def __init__(self, path: str):
    self._path = path

  def setup(self):
    _make_parent(self._path)

  def process(self, record: Dict) -> Iterable:
    tmp = f'{self._path}.tmp.{os.getpid()}.{threading.get_ident()}'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(record, f, indent=2)
      f.write('\n')
    os.replace(tmp, self._path)
    return ()


class WriteLatestJson(_FileSink):
  """Writes each element as the whole content of a JSON file, atomically; the
  last element written wins (for accumulating records such as the accounting)."""
  _WRITER, _OBJECT_WRITER, _STEP = _ReplaceFileFn, _ReplaceObjectFn, 'Replace'
