"""A run folder on a local disk: the protocol that makes a run's outputs
appear all at once or not at all (the files' writers: transforms/connectors/writers.py).

A run never writes into OUTPUT_DIR directly. Everything goes into a staging
folder inside it, ``OUTPUT_DIR/.tidemark-run-<id>/`` (the same layout: the
contract files, ``rollup-SIZEs/``, ...), whose ``run.json`` says ``running``.
A run that ends well is committed:

1. ``OUTPUT_DIR/run.json`` becomes ``committing`` (naming the staging
   folder): from here on the folder is not a finished run until step 4;
2. every run output in OUTPUT_DIR that the new run did not write is removed
   (an earlier run's ``rollup-*`` folders, ``duplicates.jsonl``, ...);
3. each entry of the staging folder is renamed into OUTPUT_DIR (a file with
   ``os.replace``; a folder after moving the old one aside);
4. the staging ``run.json`` (``complete`` or ``stopped``) is renamed onto
   ``OUTPUT_DIR/run.json``: the commit point;
5. the staging folder and whatever was moved aside are removed.

Renames within one filesystem are atomic, and files and folders are fsynced
first. A launcher that dies during steps 1-4 leaves ``committing``; the next
run into the folder finishes that commit (steps 2-5 may be repeated). A run
that does not end well (interrupted, killed, failed, not reconciled) is never
committed: OUTPUT_DIR keeps the earlier run untouched and the staging folder
stays aside, its run.json saying why, until the next run removes it. Where
OUTPUT_DIR holds no committed run, its run.json is a placeholder that says
``running`` (then ``incomplete`` or ``failed``) and names the staging folder,
so that even a run killed with SIGKILL leaves a folder that says so.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import Callable, Dict, Optional, Pattern, Sequence, overload

from pipeline.runfolder import names
from transforms.connectors.writers import make_parent

MANIFEST = names.MANIFEST
STAGING_PREFIX = '.tidemark-run-'
TRASH_PREFIX = '.tidemark-trash-'
#: The output folders' locks this process holds: lock file → its open descriptor.
_HELD: Dict[str, int] = {}


def lock_path(output_dir: str) -> str:
  """The lock file of an output folder: in the machine's temporary directory,
  named by the folder's real path, so the folder itself gets no extra file and
  the run's own writers (which lock the folder to replace the accounting) never
  wait for it."""
  key = hashlib.sha256(os.path.realpath(output_dir).encode('utf-8', 'surrogateescape'))
  return os.path.join(tempfile.gettempdir(), 'tidemark-locks', key.hexdigest()[:32] + '.lock')


class FolderBusy(OSError):
  """Another launcher holds the output folder's lock; the message names its run."""


def lock_folder(output_dir: str, busy: Callable[[], str]) -> str:
  """Takes the lock of ``output_dir`` (``lock_path``) until the process ends or
  releases it; returns the lock file. Raises FolderBusy with ``busy()`` when
  another process holds it."""
  path = lock_path(output_dir)
  if path in _HELD:
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise FolderBusy(busy()) from None
  _HELD[path] = fd
  return path

#: Manifest statuses.
RUNNING = 'running'
COMMITTING = 'committing'
COMPLETE = 'complete'  # the input ended, the job finished, the outputs reconciled
STOPPED = 'stopped'  # an unbounded run stopped; what its windows emitted by then
INCOMPLETE = 'incomplete'  # interrupted or cancelled before its input ended
FAILED = 'failed'  # the job failed or its outputs did not reconcile
#: Statuses of a run whose files are in OUTPUT_DIR.
COMMITTED = (COMPLETE, STOPPED)

# ---------------------------------------------------------------------------
# The run folder: staging, manifest, commit.


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='milliseconds')


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_json_atomically(path: str, record) -> None:
  """``record`` as the content of ``path``, all or nothing, synced to disk."""
  tmp = f'{path}.tmp.{os.getpid()}.{threading.get_ident()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2)
    f.write('\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync(os.path.dirname(os.path.abspath(path)))


def read_json(path: str) -> Optional[dict]:
  """The JSON object in ``path``; None if there is none (missing, unreadable)."""
  try:
    with open(path, encoding='utf-8') as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def file_identity(path: str, chunk_bytes: int = 1 << 20) -> Dict[str, object]:
  """``{'path', 'size_bytes', 'sha256'}`` of a local file."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(chunk_bytes), b''):
      digest.update(chunk)
  return {'path': os.path.abspath(path), 'size_bytes': os.path.getsize(path),
          'sha256': digest.hexdigest()}


def create_empty(path: str) -> None:
  """Makes ``path`` an existing file (empty if new), so a run that wrote
  nothing there still leaves it."""
  make_parent(path)
  os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def _alive(manifest: dict) -> bool:
  """Whether the launcher a manifest names may still run (always, if it ran
  on another machine)."""
  if manifest.get('host') != socket.gethostname():
    return True
  try:
    os.kill(int(manifest['pid']), 0)
  except (KeyError, TypeError, ValueError, ProcessLookupError):
    return False
  except PermissionError:
    pass
  return True


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


class RunFolder:
  """The staging folder of one run into ``output_dir``, and its manifest.

  ``owned_names`` and ``owned_folders`` say which entries of OUTPUT_DIR are
  run outputs: a commit replaces them, leaving anything else in the folder
  alone. With ``staged=False`` (workers that do not share the launcher's
  disk write the files on their own machines) the run writes into OUTPUT_DIR
  itself, as before, and the manifest says ``"staged": false``; such a run
  clears the earlier run's outputs first, unless it ``resumes`` them (a job
  restored from a checkpoint or savepoint continues the files it wrote).
  """

  def __init__(self, output_dir: str, owned_names: Sequence[str], owned_folders: Pattern,
               staged: bool = True, manifest: Optional[dict] = None, resumes: bool = False):
    self.output_dir = output_dir
    self.resumes = resumes and not staged
    self.run_id = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime()) + '-' + uuid.uuid4().hex[:6]
    self.staged = staged
    self.staging = (os.path.join(output_dir, STAGING_PREFIX + self.run_id) if staged
                    else output_dir)
    self._owned_names = frozenset(owned_names)
    self._owned_folders = owned_folders
    self._moves: Dict[str, str] = {}  # staged path -> final path, outside OUTPUT_DIR
    self.manifest: dict = {
        'status': RUNNING, 'run_id': self.run_id, 'staged': staged,
        'staging': os.path.basename(self.staging) if staged else None,
        'pid': os.getpid(), 'host': socket.gethostname(), 'started_at': utc_now(),
        **(manifest or {})}
    self._placeholder = False
    self._started = time.monotonic()
    self._identity: Dict[str, object] = {}
    self._hashing: Optional[threading.Thread] = None
    self._lock_key: Optional[str] = None

  def identify_input(self, path: str, sha256: Optional[str] = None) -> None:
    """Adds the size and sha256 of the input file to the manifest's ``input``
    at the end of the run (hashed meanwhile, in the background, unless the
    caller knows it)."""
    if sha256:
      self._identity.update({'path': os.path.abspath(path), 'size_bytes': os.path.getsize(path),
                             'sha256': sha256})
      return
    self._hashing = threading.Thread(
        target=lambda: self._identity.update(file_identity(path)), daemon=True)
    self._hashing.start()

  def _ended(self, fields: dict) -> dict:
    if self._hashing is not None:
      self._hashing.join(30)
    return {'ended_at': utc_now(), 'seconds': round(time.monotonic() - self._started, 3),
            'input': {**self.manifest.get('input', {}), **self._identity}, **fields}

  @property
  def readable_dir(self) -> str:
    """Where the launcher reads the committed run (OUTPUT_DIR itself)."""
    return self.output_dir

  def local_path(self, staged_path: str) -> str:
    """Where the launcher reads a staged file (where the workers wrote it)."""
    return staged_path

  def gather(self) -> None:
    """Nothing to gather: the workers wrote into the staging folder itself."""

  def publish(self) -> None:
    """Nothing to publish: the commit renamed the files into place."""

  def owns(self, name: str) -> bool:
    return name in self._owned_names or bool(self._owned_folders.fullmatch(name))

  @overload
  def path(self, final_path: str) -> str: ...

  @overload
  def path(self, final_path: None) -> None: ...

  def path(self, final_path: Optional[str]) -> Optional[str]:
    """Where the run writes what ends up at ``final_path``."""
    if not final_path or not self.staged:
      return final_path
    inside = os.path.relpath(os.path.abspath(final_path), os.path.abspath(self.output_dir))
    if inside != os.pardir and not inside.startswith(os.pardir + os.sep):
      return os.path.normpath(os.path.join(self.staging, inside))
    staged = os.path.join(os.path.dirname(final_path),
                          f'.{os.path.basename(final_path)}.{STAGING_PREFIX[1:]}{self.run_id}')
    self._moves[staged] = final_path
    return staged

  def _lock(self) -> None:
    """Takes the lock of OUTPUT_DIR (``lock_path``) for as long as the run is
    open; the kernel drops it when the process ends, killed or not. Raises
    FolderBusy, naming the run that holds it, when another launcher does. A
    launcher that already holds it (one process opening the folder again)
    shares it."""
    self._lock_key = lock_folder(
        self.output_dir, lambda: f'{self.output_dir} is being written by {self._holder()}: '
        'wait until it ends, or give another --output-dir')

  def _holder(self) -> str:
    """The run that holds the folder, as its manifest describes it."""
    manifests = [os.path.join(self.output_dir, MANIFEST)] + [
        os.path.join(self.output_dir, name, MANIFEST) for name in os.listdir(self.output_dir)
        if name.startswith(STAGING_PREFIX)]
    for path in manifests:
      manifest = read_json(path) or {}
      if manifest.get('status') == RUNNING and _alive(manifest):
        return (f'run {manifest.get("run_id")} (pid {manifest.get("pid")} on '
                f'{manifest.get("host")}, started {manifest.get("started_at")})')
    return 'another run'

  def open(self) -> 'RunFolder':
    """Takes the folder's lock, finishes an interrupted commit, removes what
    earlier runs left aside, makes the staging folder and writes the
    ``running`` manifest."""
    os.makedirs(self.output_dir, exist_ok=True)
    self._lock()
    committed = read_json(os.path.join(self.output_dir, MANIFEST))
    if committed and committed.get('status') == COMMITTING:
      staging = os.path.join(self.output_dir, str(committed.get('staging')))
      if (read_json(os.path.join(staging, MANIFEST)) or {}).get('status') in COMMITTED:
        self._finish_commit(staging)
        committed = read_json(os.path.join(self.output_dir, MANIFEST))
    self._remove_stale()
    if not self.staged and not self.resumes:
      for name in os.listdir(self.output_dir):
        if self.owns(name):
          _remove(os.path.join(self.output_dir, name))
    os.makedirs(self.staging, exist_ok=True)
    self._placeholder = self.staged and not (
        committed and committed.get('status') in COMMITTED)
    self.update(RUNNING)
    return self

  def _remove_stale(self) -> None:
    for name in os.listdir(self.output_dir):
      path = os.path.join(self.output_dir, name)
      if name.startswith(TRASH_PREFIX):
        _remove(path)
      elif name.startswith(STAGING_PREFIX):
        manifest = read_json(os.path.join(path, MANIFEST)) or {}
        if manifest.get('status') == RUNNING and _alive(manifest):
          continue  # another launcher is writing there now
        for staged in manifest.get('moves', {}):
          _remove(staged)
        _remove(path)

  def update(self, status: str, **fields) -> None:
    """Rewrites the run's manifest (and the placeholder in OUTPUT_DIR)."""
    self.manifest.update(fields, status=status, moves=dict(self._moves))
    write_json_atomically(os.path.join(self.staging, MANIFEST), self.manifest)
    if self._placeholder:
      write_json_atomically(os.path.join(self.output_dir, MANIFEST), self.manifest)

  def abandon(self, status: str, **fields) -> None:
    """Marks the run as not committed (``incomplete`` or ``failed``): OUTPUT_DIR
    keeps what it had; the staging folder stays aside."""
    self.update(status, **self._ended(fields))
    self.release()

  def release(self) -> None:
    """Lets another run have OUTPUT_DIR (the run has ended)."""
    key, self._lock_key = self._lock_key, None
    fd = _HELD.pop(key, None) if key is not None else None
    if fd is not None:
      os.close(fd)

  def commit(self, status: str, **fields) -> None:
    """Makes the staged outputs OUTPUT_DIR's, with ``status`` (``complete`` or
    ``stopped``) in OUTPUT_DIR/run.json."""
    if status not in COMMITTED:
      raise ValueError(f'only {COMMITTED} runs are committed, not {status!r}')
    try:
      self._commit(status, fields)
    finally:
      self.release()

  def _commit(self, status: str, fields: dict) -> None:
    if not self.staged:
      self.update(status, **self._ended(fields))
      return
    # A writer's temporary file left by a cancelled job is not an output.
    entries = sorted(n for n in os.listdir(self.staging) if n != MANIFEST and '.tmp.' not in n)
    for root, _, files in os.walk(self.staging):
      for name in files:
        _fsync(os.path.join(root, name))
      _fsync(root)
    for staged in self._moves:
      if os.path.exists(staged):
        _fsync(staged)
    self._placeholder = False
    self.update(status, files=entries, **self._ended(fields))
    write_json_atomically(os.path.join(self.output_dir, MANIFEST), {
        'status': COMMITTING, 'run_id': self.run_id,
        'staging': os.path.basename(self.staging), 'since': utc_now()})
    self._finish_commit(self.staging)

  def _finish_commit(self, staging: str) -> None:
    """Steps 2-5 of the commit of ``staging`` (its manifest says what it holds)."""
    manifest = read_json(os.path.join(staging, MANIFEST)) or {}
    entries = set(manifest.get('files', ()))
    trash = os.path.join(self.output_dir, TRASH_PREFIX + uuid.uuid4().hex[:8])
    os.makedirs(trash, exist_ok=True)

    def set_aside(path: str) -> None:
      os.rename(path, os.path.join(trash, uuid.uuid4().hex[:8] + os.path.basename(path)))

    for name in os.listdir(self.output_dir):
      if self.owns(name) and name not in entries:
        set_aside(os.path.join(self.output_dir, name))
    for name in sorted(entries):
      source, target = os.path.join(staging, name), os.path.join(self.output_dir, name)
      if not os.path.lexists(source):
        continue  # moved by an earlier attempt
      if os.path.lexists(target) and (os.path.isdir(source) or os.path.isdir(target)):
        set_aside(target)
      os.replace(source, target)
    for staged, final in manifest.get('moves', {}).items():
      if os.path.exists(staged):
        os.replace(staged, final)
        _fsync(os.path.dirname(os.path.abspath(final)))
    _fsync(self.output_dir)
    os.replace(os.path.join(staging, MANIFEST), os.path.join(self.output_dir, MANIFEST))
    _fsync(self.output_dir)
    _remove(staging)
    _remove(trash)
