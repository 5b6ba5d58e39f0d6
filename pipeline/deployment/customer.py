"""Per-customer deployment files (``templates/customers/NAME.yaml|json``).

A customer is found by name in the customers folder only (a file elsewhere is
read by its path, explicitly: ``load_file``). A file is checked in three steps,
and a bad one is refused naming the field as a JSON pointer (``/sink/table``),
never quoting the file:

1. every value but the description is one line of visible text (no control
   characters: values end up in a launch command), the rule of
   ``pipeline.settings.checks.check_text``;
2. its shape, against ``pipeline/deployment/customer.schema.json`` (JSON Schema 2020-12),
   whose customer id rule and numeric limits are the run's own (SCHEMA_RULES);
3. ownership: a customer's file may only name that customer's resources. Every
   Pub/Sub subscription id, Kafka topic and PostgreSQL table, and the dataset of
   every BigQuery table, must start with the customer id or its *token* (the id
   lower-cased, every character outside ``a-z0-9`` made ``_``, as SQL and
   BigQuery names need), followed by the end of the name or by ``-``, ``_`` or
   ``.``. For ``dataflow-inc``: ``dataflow-inc.iot-readings`` and
   ``dataflow_inc_rollups`` pass; ``dataflowinc_x``, ``acme_dataflow-inc``
   and ``finserve_trading`` do not.

At run time the sink is also scoped to the customer (``--customer-id``), so
even a misrouted event of another customer is never written to its tables.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from pipeline.settings.checks import (
    MAX_CHECKPOINT_INTERVAL_S, MAX_SECONDS, MAX_SHARDS, ConfigError, RollupError, check_rollups,
    check_text)
from transforms.rules.model import CUSTOMER_ID_PATTERN, is_customer_id

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), 'customer.schema.json')
_WINDOW = '/properties/window/properties'
_ROLLUP = _WINDOW + '/rollups/items/properties'
#: The schema's rules that are defined in Python, by JSON pointer into
#: customer.schema.json: the customer id's rule (transforms.rules.model) and
#: the limits of the settings a run checks (pipeline.settings.checks): every
#: duration at most MAX_SECONDS, the shards at most MAX_SHARDS. ``schema()``
#: fills them in, ``python -m tools.template_metadata`` writes them into the
#: file, and a test fails while the file differs. (The deploy section's limits
#: are the runners' own, and are written in the file alone.)
SCHEMA_RULES: Dict[str, Any] = {
    '/properties/customer_id/pattern': '^' + CUSTOMER_ID_PATTERN + '$',
    _WINDOW + '/size_s/maximum': MAX_SECONDS,
    _WINDOW + '/allowed_lateness_s/maximum': MAX_SECONDS,
    _WINDOW + '/early_firing_s/maximum': MAX_SECONDS,
    _ROLLUP + '/size_s/maximum': MAX_SECONDS,
    _ROLLUP + '/allowed_lateness_s/maximum': MAX_SECONDS,
    '/properties/shards/maximum': MAX_SHARDS,
    '/properties/deploy/properties/flink/properties/checkpoint_interval_s/maximum':
        MAX_CHECKPOINT_INTERVAL_S,
}
#: Where customer files are looked for, relative to the working directory (the
#: deploy repository's layout); TIDEMARK_CUSTOMERS_DIR or --customers-dir say
#: otherwise.
CUSTOMERS_DIR = os.path.join('templates', 'customers')
CUSTOMERS_DIR_ENV = 'TIDEMARK_CUSTOMERS_DIR'


def customers_dir() -> str:
  """The default folder of customer files: $TIDEMARK_CUSTOMERS_DIR, else
  ``templates/customers`` under the working directory."""
  return os.environ.get(CUSTOMERS_DIR_ENV) or CUSTOMERS_DIR
EXTENSIONS = ('.yaml', '.yml', '.json')


class CustomerFileError(ValueError):
  """A customer file is wrong; ``pointer`` is the JSON pointer of the field
  (None when no file was found to read)."""

  def __init__(self, path: str, pointer: Optional[str], reason: str):
    where = '' if pointer is None else f' {pointer or "/"}:'
    super().__init__(f'{path}:{where} {reason}')
    self.path = path
    self.pointer = pointer
    self.reason = reason


class Customer(NamedTuple):
  path: str
  spec: Dict[str, Any]

  @property
  def customer_id(self) -> str:
    return self.spec['customer_id']


def _pointer(parts) -> str:
  return ''.join('/' + str(p).replace('~', '~0').replace('/', '~1') for p in parts)


def token(customer_id: str) -> str:
  """The customer id as a SQL/BigQuery-safe name prefix."""
  return re.sub(r'[^a-z0-9]', '_', customer_id.lower())


def owns(customer_id: str, name: str) -> bool:
  """Whether ``name`` is one of ``customer_id``'s (the rule in the docstring)."""
  for prefix in {customer_id, token(customer_id)}:
    if name == prefix or (name.startswith(prefix) and name[len(prefix)] in '-_.'):
      return True
  return False


def find(name: str, directory: Optional[str] = None) -> str:
  """The file of customer ``name`` in ``directory`` (NAME.yaml, .yml or .json).

  A name is never a path: nothing outside ``directory`` is read (load_file
  reads a file by its path).
  """
  # A customer's name is its customer id (contract section 1), also its file's name.
  if not is_customer_id(name) or name in ('.', '..'):
    raise CustomerFileError(
        repr(name), None, 'is not a customer name (1-64 characters of A-Z a-z 0-9 _ . -); '
        'a file elsewhere is read by its path with --customer-file PATH')
  directory = directory or customers_dir()
  found = [os.path.join(directory, name + ext) for ext in EXTENSIONS
           if os.path.isfile(os.path.join(directory, name + ext))]
  if not found:
    known = sorted(os.path.splitext(f)[0] for f in os.listdir(directory)
                   if f.endswith(EXTENSIONS)) if os.path.isdir(directory) else []
    hint = ''
    if name.endswith(EXTENSIONS):
      hint = f'; give the name without its extension ({os.path.splitext(name)[0]})'
    raise CustomerFileError(name, None, f'no customer file {name}.yaml|.json in {directory}; '
                            f'known: {", ".join(known) or "none"}{hint}')
  if len(found) > 1:
    raise CustomerFileError(name, None, f'more than one file for {name}: {found}')
  root = os.path.realpath(directory)
  if os.path.commonpath([root, os.path.realpath(found[0])]) != root:
    raise CustomerFileError(found[0], None, f'resolves to a file outside {directory}')
  return found[0]


def _rule(rule: str, value: Any) -> str:
  """What a schema rule asks of a field, in words of the schema alone (never
  quoting the file: jsonschema's own messages repeat the value)."""
  if rule == 'type':
    return 'must be of type ' + (value if isinstance(value, str) else ' or '.join(value))
  if rule == 'enum':
    return 'must be one of ' + ', '.join(json.dumps(v) for v in value)
  if rule == 'const':
    return f'must be {json.dumps(value)}'
  words = {
      'pattern': 'must match {}',
      'minimum': 'must be at least {}',
      'maximum': 'must be at most {}',
      'minLength': 'must be at least {} characters long',
      'maxLength': 'must be at most {} characters long',
      'minItems': 'must list at least {} item(s)',
      'maxItems': 'must list at most {} item(s)',
      'uniqueItems': 'must not list an item twice',
      'minProperties': 'must have at least {} field(s)',
  }
  return words[rule].format(value) if rule in words else f'breaks the schema rule {rule!r}'


def schema_field(document: Dict[str, Any], pointer: str) -> Tuple[Any, str]:
  """The object holding the field ``pointer`` names in a schema, and its key
  (KeyError if the object is not there)."""
  *parents, key = pointer.strip('/').split('/')
  node: Any = document
  for part in parents:
    node = node[int(part)] if isinstance(node, list) else node[part]
  return node, key


def schema() -> Dict[str, Any]:
  """customer.schema.json with SCHEMA_RULES filled in, as files are checked
  against it."""
  with open(SCHEMA_PATH, encoding='utf-8') as f:
    document = json.load(f)
  for pointer, value in SCHEMA_RULES.items():
    node, key = schema_field(document, pointer)
    node[key] = value
  return document


def _schema_errors(spec: Any) -> List[Tuple[str, str]]:
  import jsonschema
  validator = jsonschema.Draft202012Validator(
      schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
  found = []
  # Root causes first: a property failing its own rule is also "unevaluated"
  # for its parent, which would otherwise hide the field at fault.
  errors = sorted(validator.iter_errors(spec), key=lambda e: (
      e.validator == 'unevaluatedProperties', list(map(str, e.absolute_path))))
  for error in errors:
    for leaf in (error.context or [error]) if error.validator in ('anyOf', 'oneOf') else [error]:
      parts = list(leaf.absolute_path)
      reason = _rule(leaf.validator, leaf.validator_value)
      if leaf.validator == 'required':
        missing = [r for r in leaf.validator_value if r not in leaf.instance]
        parts, reason = parts + missing[:1], 'is required'
      elif leaf.validator in ('additionalProperties', 'unevaluatedProperties'):
        allowed = set(leaf.schema.get('properties', {}))
        for branch in leaf.schema.get('allOf', []):
          if jsonschema.Draft202012Validator(branch.get('if', {})).is_valid(leaf.instance):
            allowed |= set(branch.get('then', {}).get('properties', {}))
        extra = sorted(k for k in leaf.instance if k not in allowed)
        parts, reason = parts + extra[:1], 'is not a known field here'
      found.append((_pointer(parts), reason))
  return found


def _names(spec: Dict[str, Any]) -> List[Tuple[str, str]]:
  """``(pointer, name)`` of every resource the file names."""
  names = []
  source, sink = spec['source'], spec['sink']
  if source['kind'] == 'pubsub':
    names += [(f'/source/subscriptions/{i}', s.rsplit('/', 1)[-1])
              for i, s in enumerate(source['subscriptions'])]
  else:
    names += [(f'/source/topics/{i}', t) for i, t in enumerate(source['topics'])]
    if 'consumer_group' in source:
      names.append(('/source/consumer_group', source['consumer_group']))
  for field in ('table', 'dead_letter_table'):
    value = sink[field]
    if sink['kind'] == 'bigquery':
      value = re.split(r'[:.]', value)[-2]  # the dataset
    names.append((f'/sink/{field}', value))
  return names


def _texts(node: Any, parts: Tuple = ()):
  """``(path parts, text)`` of every string value in a parsed file."""
  if isinstance(node, str):
    yield parts, node
  elif isinstance(node, dict):
    for key, value in node.items():
      yield from _texts(value, parts + (key,))
  elif isinstance(node, list):
    for index, value in enumerate(node):
      yield from _texts(value, parts + (index,))


def _syntax_error(kind: str, error: Exception) -> str:
  """Where a file stops being JSON or YAML, never quoting it."""
  if isinstance(error, json.JSONDecodeError):
    return f'not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})'
  mark = getattr(error, 'problem_mark', None)
  problem = re.sub(r"'[^']*'|\"[^\"]*\"", '...', getattr(error, 'problem', None) or '')
  where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark else ''
  position = getattr(error, 'position', None)
  if mark is None and isinstance(position, int):
    where = f' (character {position + 1})'
  return f'not valid {kind}' + (f': {problem}' if problem else '') + where


def load(name: str, directory: Optional[str] = None) -> Customer:
  """Reads and checks the file of customer ``name`` in ``directory``
  (CustomerFileError names the field)."""
  return load_file(find(name, directory))


def load_file(path: str) -> Customer:
  """Reads and checks a customer file by its path; CustomerFileError names
  the field, never quoting the file."""
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except OSError as e:
    raise CustomerFileError(path, '', f'cannot read: {e.strerror}') from None
  except UnicodeDecodeError as e:
    raise CustomerFileError(path, '', f'not UTF-8 text (byte {e.start + 1})') from None
  import yaml
  kind = 'JSON' if path.endswith('.json') else 'YAML'
  try:
    spec = json.loads(text) if kind == 'JSON' else yaml.safe_load(text)
  except (ValueError, yaml.YAMLError) as e:
    raise CustomerFileError(path, '', _syntax_error(kind, e)) from None
  for parts, value in _texts(spec):
    if parts[:1] == ('description',):
      continue  # free text for people; never part of a launch
    try:
      check_text(_pointer(parts), value)
    except ConfigError as e:
      raise CustomerFileError(path, e.field, e.reason) from None
  errors = _schema_errors(spec)
  if errors:
    pointer, reason = errors[0]
    raise CustomerFileError(path, pointer, reason)
  stem = os.path.splitext(os.path.basename(path))[0]
  if spec['customer_id'] != stem:
    raise CustomerFileError(path, '/customer_id', f'must equal the file name {stem!r}')
  customer_id = spec['customer_id']
  for pointer, resource in _names(spec):
    if not owns(customer_id, resource):
      raise CustomerFileError(
          path, pointer, f'is not a resource of customer {customer_id!r}: it must start '
          f'with {customer_id!r} or {token(customer_id)!r} followed by "-", "_", "." or nothing')
  window = spec['window']
  try:
    check_rollups(window['size_s'], [
        (r['size_s'], r['allowed_lateness_s']) for r in window.get('rollups', ())])
  except RollupError as e:
    raise CustomerFileError(path, f'/window/rollups/{e.index}/{e.field}', e.reason) from None
  sink = spec['sink']
  if sink['table'] == sink['dead_letter_table']:
    raise CustomerFileError(path, '/sink/dead_letter_table', 'must differ from /sink/table')
  return Customer(path, spec)


def run_parameters(customer: Customer) -> List[Tuple[str, str]]:
  """The customer as ``(option dest, value)`` pairs of ``python -m pipeline
  run`` (pipeline/settings/options.py); the same names are the Flex Template's
  parameters (templates/metadata.json)."""
  spec = customer.spec
  source, sink, window = spec['source'], spec['sink'], spec['window']
  if source['kind'] == 'pubsub':
    source_arg = 'pubsub:' + ','.join(source['subscriptions'])
  else:
    source_arg = f'kafka:{source["bootstrap_servers"]}/{",".join(source["topics"])}'
  params = [
      ('source', source_arg),
      ('window_size', str(window['size_s'])),
      ('allowed_lateness', str(window['allowed_lateness_s'])),
  ]
  if 'early_firing_s' in window:
    params.append(('early_firing', str(window['early_firing_s'])))
  if 'rollups' in window:
    params.append(('rollup', ','.join(
        f'{r["size_s"]}:{r["allowed_lateness_s"]}' for r in window['rollups'])))
  if 'shards' in spec:
    params.append(('shards', str(spec['shards'])))
  if source['kind'] == 'kafka':  # offsets committed on every checkpoint
    params.append(('kafka_consumer_group',
                   source.get('consumer_group', f'{customer.customer_id}.tidemark')))
  params += [('customer_id', customer.customer_id), ('sink', sink['kind'])]
  if sink['kind'] == 'postgres':
    params += [('postgres_dsn', sink['dsn']), ('postgres_table', sink['table']),
               ('postgres_dead_letter_table', sink['dead_letter_table'])]
  else:
    params += [('bigquery_table', sink['table']),
               ('bigquery_dead_letter_table', sink['dead_letter_table'])]
  return params
