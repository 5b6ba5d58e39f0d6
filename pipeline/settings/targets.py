"""What a run reads from and writes to, parsed and checked: sources, the
aggregates topic, the database sink, and the local files and folders.

Every check raises ConfigError naming the option; pipeline/settings/config.py applies
them (and re-exports the public names).
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
import urllib.parse
from typing import Any, Dict, Tuple

from pipeline.settings.checks import ConfigError
from pipeline.settings.options import TidemarkOptions

SOURCE_KINDS = ('replay', 'pubsub', 'kafka')
TOPIC_KINDS = ('kafka', 'pubsub')
SINKS = ('files', 'postgres', 'bigquery')
_SINK_OPTIONS = {
    'postgres': ('postgres_dsn', 'postgres_table', 'postgres_dead_letter_table'),
    'bigquery': ('bigquery_table', 'bigquery_dead_letter_table', 'bigquery_expansion_service'),
}
_HOST_PORT = re.compile(r'[A-Za-z0-9.\-]+:([0-9]{1,5})\Z')
_TOPIC = re.compile(r'[A-Za-z0-9._\-]{1,249}\Z')
_SOURCE_NAME = re.compile(r'[A-Za-z0-9._\-]{1,64}\Z')
#: The first bytes of every SQLite 3 database file.
_SQLITE_HEADER = b'SQLite format 3\x00'


def check_host_port(field: str, value: str) -> str:
  """``HOST:PORT`` with a port in 1..65535."""
  match = _HOST_PORT.fullmatch(value)
  if not match or not 0 < int(match.group(1)) < 65536:
    raise ConfigError(field, f'{value!r} is not HOST:PORT')
  return value


def parse_kafka_target(target: str, field: str = '--source') -> Tuple[str, Dict[str, str]]:
  """``BOOTSTRAP/TOPIC[,TOPIC...]`` to ``(bootstrap servers, {source: topic})``.

  BOOTSTRAP is ``host:port[,host:port...]``; a TOPIC may be written
  ``NAME=TOPIC`` to name its source, else the source is named as the topic.
  """
  bootstrap, sep, topics = target.partition('/')
  if not sep or not bootstrap or not topics:
    raise ConfigError(field, f'kafka:{target!r} is not of the form kafka:BOOTSTRAP/TOPIC[,TOPIC...]')
  for server in bootstrap.split(','):
    try:
      check_host_port(field, server)
    except ConfigError:
      raise ConfigError(field, f'Kafka bootstrap server {server!r} is not HOST:PORT') from None
  sources: Dict[str, str] = {}
  for item in topics.split(','):
    name, eq, topic = item.rpartition('=')
    if not eq:
      name = topic
    if not _TOPIC.fullmatch(topic):
      raise ConfigError(
          field, f'Kafka topic {topic!r} is not 1-249 characters of A-Z a-z 0-9 . _ -')
    if not _SOURCE_NAME.fullmatch(name):
      raise ConfigError(field, f'source name {name!r} is not 1-64 characters of A-Z a-z 0-9 . _ -')
    if name in sources:
      raise ConfigError(field, f'source name {name!r} is given twice')
    sources[name] = topic
  return bootstrap, sources


def parse_pubsub_target(target: str) -> Tuple[Tuple[str, str], ...]:
  """``[NAME=]projects/P/subscriptions/S[,...]`` to ``((name, path), ...)``.

  The source name defaults to the subscription id S. Raises ValueError.
  """
  # Imported here: the Pub/Sub client libraries are only needed for pubsub.
  from transforms.connectors.pubsub import check_subscription_path
  pairs = []
  for item in target.split(','):
    item = item.strip()
    name, sep, path = item.partition('=')
    if not sep:
      name, path = item.rsplit('/', 1)[-1], item
    if not name or not path:
      raise ValueError(
          f'{item!r}: expected [NAME=]projects/PROJECT/subscriptions/NAME')
    check_subscription_path(path)
    pairs.append((name, path))
  names = [n for n, _ in pairs]
  paths = [p for _, p in pairs]
  if len(set(names)) != len(names):
    raise ValueError(f'source names repeat: {names}')
  if len(set(paths)) != len(paths):
    raise ValueError(f'a subscription is named twice: {paths}')
  return tuple(pairs)


def parse_aggregates_topic(spec: str, field: str = '--aggregates-topic') -> Tuple[str, str, str]:
  """``kafka:BOOTSTRAP/TOPIC`` or ``pubsub:projects/P/topics/T`` to
  ``(kind, bootstrap or '', topic)``; ConfigError naming ``field`` otherwise."""
  from transforms.connectors.topics import check_kafka_topic, check_pubsub_topic
  kind, sep, target = spec.partition(':')
  if not sep or not target or kind not in TOPIC_KINDS:
    raise ConfigError(
        field, f'{spec!r} is not kafka:BOOTSTRAP/TOPIC or pubsub:projects/P/topics/T')
  try:
    if kind == 'pubsub':
      return kind, '', check_pubsub_topic(target)
    bootstrap, topics = parse_kafka_target(target, field)
    if len(topics) != 1 or '=' in target:
      raise ConfigError(field, f'kafka:{target!r} must name exactly one topic')
    return kind, bootstrap, check_kafka_topic(next(iter(topics.values())))
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(field, str(e)) from None


def _flag(dest: str) -> str:
  return '--' + dest.replace('_', '-')


def sink_settings(opts: TidemarkOptions) -> Dict[str, Any]:
  """The sink fields of RunConfig from the options, checked."""
  from transforms.connectors import bigquery, sinks  # the sinks' own checks, one rule in one place
  sink = opts.sink or 'files'
  if sink not in SINKS:
    raise ConfigError('--sink', f'unknown sink {sink!r}; known: {", ".join(SINKS)}')
  settings: Dict[str, Any] = {'sink': sink}
  for kind, dests in _SINK_OPTIONS.items():
    for dest in dests:
      value = getattr(opts, dest)
      if value is not None and kind != sink:
        raise ConfigError(_flag(dest), f'only applies to --sink {kind}')
      if value is not None:
        settings[dest] = value
  if opts.customer_id is not None:
    if sink == 'files':
      raise ConfigError('--customer-id', 'scopes a database sink: needs --sink postgres or bigquery')
    try:
      settings['customer_id'] = sinks.check_customer_id(opts.customer_id)
    except ValueError as e:
      raise ConfigError('--customer-id', str(e)) from None
  checks = {
      'postgres_table': sinks.check_identifier,
      'postgres_dead_letter_table': sinks.check_identifier,
      'bigquery_table': bigquery.check_bigquery_table,
      'bigquery_dead_letter_table': bigquery.check_bigquery_table,
  }
  for dest, check in checks.items():
    if dest in settings:
      try:
        check(settings[dest])
      except ValueError as e:
        raise ConfigError(_flag(dest), str(e)) from None
  if sink == 'postgres' and not settings.get('postgres_dsn'):
    raise ConfigError('--postgres-dsn', 'is required with --sink postgres')
  if sink == 'postgres' and settings.get(
      'postgres_table', 'aggregates') == settings.get('postgres_dead_letter_table',
                                                      'dead_letters'):
    raise ConfigError('--postgres-dead-letter-table', 'must differ from --postgres-table')
  if sink == 'bigquery':
    for dest in ('bigquery_table', 'bigquery_dead_letter_table'):
      if not settings.get(dest):
        raise ConfigError(_flag(dest), 'is required with --sink bigquery')
    if settings['bigquery_table'] == settings['bigquery_dead_letter_table']:
      raise ConfigError('--bigquery-dead-letter-table', 'must differ from --bigquery-table')
  return settings


# ---------------------------------------------------------------------------
# Local files and folders: checked before anything is written.

def check_replay_file(path: str, field: str = '--source') -> None:
  """That ``path`` is a replay file this process can read."""
  if os.path.isdir(path):
    raise ConfigError(field, f'replay {path!r} is a directory, not a replay file')
  if not os.path.lexists(path):
    raise ConfigError(field, f'replay file {path!r} does not exist')
  if not os.path.exists(path):
    raise ConfigError(field, f'replay file {path!r} is a broken symbolic link')
  if not os.path.isfile(path):
    raise ConfigError(field, f'replay {path!r} is not a regular file')
  try:
    with open(path, 'rb'):
      pass
  except OSError as e:
    raise ConfigError(field, f'replay file {path!r} cannot be read: {e.strerror}') from None


def check_folder(field: str, folder: str) -> None:
  """That ``folder`` is a folder this process can write in, or can be created
  as one. Nothing is left behind (the probe is an anonymous temporary file)."""
  wanted = os.path.abspath(folder)
  existing = wanted
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = 'a file' if os.path.exists(existing) else 'a broken symbolic link'
    if existing == wanted:
      raise ConfigError(field, f'{folder!r} exists and is not a folder (it is {what})')
    raise ConfigError(
        field, f'{folder!r} cannot be created: {existing!r} is {what}, not a folder')
  try:
    tempfile.TemporaryFile(dir=existing).close()
  except OSError as e:
    if existing == wanted:
      raise ConfigError(field, f'folder {folder!r} is not writable: {e.strerror}') from None
    raise ConfigError(
        field, f'{folder!r} cannot be created in {existing!r}: {e.strerror}') from None


def check_output_file(field: str, path: str) -> None:
  """That a run may (re)write the file ``path``: it is not a folder."""
  if os.path.isdir(path):
    raise ConfigError(
        field, f'{path!r} is a folder where the run writes a file; remove it or '
        'choose another folder')


def is_tidemark_database(path: str) -> bool:
  """Whether ``path`` is a SQLite database of Tidemark's aggregates (its one
  table ``aggregates``, with Tidemark's columns) and nothing else. OSError if
  it cannot be read."""
  from transforms.connectors.sinks import AGGREGATE_COLUMNS
  with open(path, 'rb') as f:
    if f.read(len(_SQLITE_HEADER)) != _SQLITE_HEADER:
      return False
  uri = f'file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro'
  try:
    conn = sqlite3.connect(uri, uri=True, timeout=10)
    try:
      tables = {name for (name,) in conn.execute(
          "SELECT name FROM sqlite_master WHERE type = 'table'")
                if not name.startswith('sqlite_')}
      columns = {row[1] for row in conn.execute('PRAGMA table_info(aggregates)')}
    finally:
      conn.close()
  except sqlite3.Error:
    return False
  return tables == {'aggregates'} and set(AGGREGATE_COLUMNS) <= columns


def check_sqlite_file(field: str, path: str) -> None:
  """That the run may write its SQLite database at ``path``: a file in a
  writable folder, and if it exists already, a Tidemark database (a run
  replaces it; any other file is left alone and the run refused)."""
  if os.path.isdir(path):
    raise ConfigError(field, f'{path!r} is a folder; name the SQLite file (or "none")')
  check_folder(field, os.path.dirname(path) or os.curdir)
  if not os.path.lexists(path):
    return
  try:
    ours = is_tidemark_database(path)
  except OSError as e:
    raise ConfigError(field, f'{path!r} exists and cannot be read: {e.strerror}') from None
  if not ours:
    raise ConfigError(
        field, f'{path!r} exists and is not a Tidemark SQLite database; the run would '
        'replace it, so it is refused: remove the file or name another')
