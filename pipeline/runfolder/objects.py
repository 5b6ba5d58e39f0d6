"""A run folder on an object store (``gs://``, ``s3://``: any Beam filesystem
that is not a local disk), with the same promise as a local one
(pipeline/runfolder/files.py): OUTPUT_DIR's ``run.json`` says ``complete`` or
``stopped`` only once every output of that run is there.

Object stores have no append and no atomic rename, so:

- workers write into ``OUTPUT_DIR/.tidemark-run-<id>/``: each bundle of a
  JSON-lines file is a new object under ``FILE.parts/`` and the accounting is
  replaced whole (``transforms.connectors.writers.WriteJsonLines``, ``WriteLatestJson``);
- after the job the launcher joins the parts into a local copy of the staging
  folder (``gather``), and the run is reconciled, committed and reported
  there, with the local protocol;
- ``publish`` then uploads the committed files: OUTPUT_DIR's ``run.json``
  says ``committing`` first, the files follow, the new ``run.json`` comes
  last (the commit point); outputs of the earlier run that this one did not
  write are removed, then the staging objects.

A run that does not end well leaves OUTPUT_DIR's files as they were; where
OUTPUT_DIR held no committed run, its ``run.json`` says why (``running``,
``incomplete``, ``failed``), as on a local disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Dict, Optional, Pattern, Sequence, overload

from apache_beam.io.filesystems import FileSystems

from pipeline.runfolder.files import (
    COMMITTED, COMMITTING, MANIFEST, STAGING_PREFIX, RunFolder, utc_now)
from transforms.connectors.writers import PARTS_SUFFIX, write_object_json

_LOG = logging.getLogger(__name__)


def read_object_json(path: str) -> Optional[dict]:
  """The JSON object at ``path``; None if there is none."""
  try:
    with FileSystems.open(path, mime_type='application/json') as f:
      record = json.loads(f.read().decode('utf-8'))
  except Exception:  # pylint: disable=broad-except  # missing: each filesystem says so its own way
    return None
  return record if isinstance(record, dict) else None


def _objects_under(prefix: str) -> Dict[str, str]:
  """Relative name → full path of every object under ``prefix``/."""
  found = FileSystems.match([FileSystems.join(prefix, '**')])[0].metadata_list
  base = prefix.rstrip('/') + '/'
  return {m.path[len(base):]: m.path for m in found if m.path.startswith(base)}


class ObjectRunFolder:
  """The run's staging folder under ``output_dir`` on an object store, and the
  local copy the launcher reads and commits (``readable_dir``). The interface
  of ``pipeline.runfolder.files.RunFolder``, plus ``gather`` and ``publish``."""

  staged = True
  #: an object-store run never continues an earlier run's files
  resumes = False

  def __init__(self, output_dir: str, owned_names: Sequence[str], owned_folders: Pattern,
               manifest: Optional[dict] = None):
    self.output_dir = output_dir.rstrip('/')
    self.readable_dir = tempfile.mkdtemp(prefix='tidemark-run-')
    self._local = RunFolder(self.readable_dir, owned_names, owned_folders, True, {
        'output_dir': self.output_dir, **(manifest or {})})
    self.run_id = self._local.run_id
    self.staging = FileSystems.join(self.output_dir, STAGING_PREFIX + self.run_id)
    self._placeholder = False
    self._previous: Optional[dict] = None

  @property
  def manifest(self) -> dict:
    return self._local.manifest

  def identify_input(self, path: str, sha256: Optional[str] = None) -> None:
    self._local.identify_input(path, sha256)

  @overload
  def path(self, final_path: str) -> str: ...

  @overload
  def path(self, final_path: None) -> None: ...

  def path(self, final_path: Optional[str]) -> Optional[str]:
    """Where the workers write what ends up at ``final_path`` (inside OUTPUT_DIR)."""
    if not final_path:
      return final_path
    inside = final_path[len(self.output_dir):].lstrip('/')
    if not final_path.startswith(self.output_dir + '/') and final_path != self.output_dir:
      raise ValueError(f'{final_path!r} is not inside {self.output_dir!r}')
    return FileSystems.join(self.staging, inside) if inside else self.staging

  def local_path(self, staged_path: str) -> str:
    """The local copy of a staged object (see ``gather``)."""
    inside = staged_path[len(self.staging):].lstrip('/')
    return os.path.join(self._local.staging, inside) if inside else self._local.staging

  def open(self) -> 'ObjectRunFolder':
    """Opens the local copy and writes the ``running`` manifests; if the
    store refuses them, the local copy goes and the error is raised."""
    try:
      self._local.open()
      self._previous = read_object_json(FileSystems.join(self.output_dir, MANIFEST))
      self._placeholder = not (self._previous and self._previous.get('status') in COMMITTED)
      self._mirror()
    except BaseException:
      shutil.rmtree(self.readable_dir, ignore_errors=True)
      raise
    return self

  def _mirror(self) -> None:
    write_object_json(FileSystems.join(self.staging, MANIFEST), self.manifest)
    if self._placeholder:
      write_object_json(FileSystems.join(self.output_dir, MANIFEST), self.manifest)

  def update(self, status: str, **fields) -> None:
    self._local.update(status, **fields)
    self._mirror()

  def abandon(self, status: str, **fields) -> None:
    """Not committed: OUTPUT_DIR keeps its files; the staging objects stay
    (the local copy goes)."""
    self._local.abandon(status, **fields)
    self._mirror()
    shutil.rmtree(self.readable_dir, ignore_errors=True)

  def gather(self) -> None:
    """The staging objects into the local staging folder: each ``FILE.parts/``
    joined into FILE (parts in name order), other objects copied."""
    joined: Dict[str, list] = {}
    for name, path in sorted(_objects_under(self.staging).items()):
      parent, _, leaf = name.rpartition('/')
      if parent.endswith(PARTS_SUFFIX):
        joined.setdefault(parent[:-len(PARTS_SUFFIX)], []).append(path)
      elif leaf != MANIFEST:
        self._download([path], os.path.join(self._local.staging, name))
    for name, parts in joined.items():
      self._download(parts, os.path.join(self._local.staging, name))

  @staticmethod
  def _download(paths, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, 'wb') as out:
      for path in paths:
        with FileSystems.open(path, mime_type='application/octet-stream') as f:
          shutil.copyfileobj(f, out, 1 << 20)

  def commit(self, status: str, **fields) -> None:
    """Commits the local copy (``readable_dir`` then holds the run); ``publish``
    makes it OUTPUT_DIR's."""
    self._local.commit(status, **fields)

  def publish(self) -> None:
    """Uploads the committed run, ``run.json`` last, then removes the earlier
    run's other outputs and the staging objects."""
    write_object_json(FileSystems.join(self.output_dir, MANIFEST), {
        'status': COMMITTING, 'run_id': self.run_id,
        'staging': os.path.basename(self.staging), 'since': utc_now()})
    uploaded = set()
    for root, _, files in os.walk(self.readable_dir):
      for name in sorted(files):
        local = os.path.join(root, name)
        inside = os.path.relpath(local, self.readable_dir).replace(os.sep, '/')
        if inside == MANIFEST:
          continue
        with open(local, 'rb') as src, FileSystems.create(
            FileSystems.join(self.output_dir, inside),
            mime_type='application/octet-stream') as dst:
          shutil.copyfileobj(src, dst, 1 << 20)
        uploaded.add(inside)
    # the committed manifest (the local commit wrote it from this one)
    write_object_json(FileSystems.join(self.output_dir, MANIFEST),
                      {**self.manifest, 'published': sorted(uploaded)})
    stale = [FileSystems.join(self.output_dir, name)
             for name in (self._previous or {}).get('published', ())
             if name not in uploaded]
    self._remove(stale + [self.staging + '/'])
    shutil.rmtree(self.readable_dir, ignore_errors=True)

  def _remove(self, paths) -> None:
    try:
      FileSystems.delete(paths)
    except Exception as e:  # pylint: disable=broad-except
      _LOG.warning('the run is committed, but %d objects it no longer needs are left (%s): %r',
                   len(paths), ', '.join(paths), e)
