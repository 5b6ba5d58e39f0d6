"""Per-customer deployment files (``templates/customers/NAME.yaml|json``).

A file is checked in two steps, and a bad one is refused naming the field as a
JSON pointer (``/sink/table``):

1. its shape, against ``pipeline/customer.schema.json`` (JSON Schema 2020-12);
2. ownership: a customer's file may only name that customer's resources. Every
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

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), 'customer.schema.json')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUSTOMERS_DIR = os.path.join(REPO, 'templates', 'customers')
EXTENSIONS = ('.yaml', '.yml', '.json')


class CustomerFileError(ValueError):
  """A customer file is wrong; ``pointer`` is the JSON pointer of the field."""

  def __init__(self, path: str, pointer: str, reason: str):
    super().__init__(f'{path}: {pointer or "/"}: {reason}')
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


def find(name: str, directory: str = CUSTOMERS_DIR) -> str:
  """The file of customer ``name``, or ``name`` itself if it is a path."""
  if os.sep in name or name.endswith(EXTENSIONS):
    return name
  found = [os.path.join(directory, name + ext) for ext in EXTENSIONS
           if os.path.isfile(os.path.join(directory, name + ext))]
  if not found:
    known = sorted(os.path.splitext(f)[0] for f in os.listdir(directory)
                   if f.endswith(EXTENSIONS)) if os.path.isdir(directory) else []
    raise CustomerFileError(name, '', f'no customer file {name}.yaml|.json in {directory}; '
                            f'known: {", ".join(known) or "none"}')
  if len(found) > 1:
    raise CustomerFileError(name, '', f'more than one file for {name}: {found}')
  return found[0]


def _schema_errors(spec: Any) -> List[Tuple[str, str]]:
  import jsonschema
  with open(SCHEMA_PATH, encoding='utf-8') as f:
    schema = json.load(f)
  validator = jsonschema.Draft202012Validator(
      schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
  found = []
  # Root causes first: a property failing its own rule is also "unevaluated"
  # for its parent, which would otherwise hide the field at fault.
  errors = sorted(validator.iter_errors(spec), key=lambda e: (
      e.validator == 'unevaluatedProperties', list(map(str, e.absolute_path))))
  for error in errors:
    for leaf in (error.context or [error]) if error.validator in ('anyOf', 'oneOf') else [error]:
      parts = list(leaf.absolute_path)
      reason = leaf.message
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
  for field in ('table', 'dead_letter_table'):
    value = sink[field]
    if sink['kind'] == 'bigquery':
      value = re.split(r'[:.]', value)[-2]  # the dataset
    names.append((f'/sink/{field}', value))
  return names


def load(name: str, directory: str = CUSTOMERS_DIR) -> Customer:
  """Reads and checks a customer file; CustomerFileError names the field."""
  path = find(name, directory)
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except OSError as e:
    raise CustomerFileError(path, '', f'cannot read: {e}') from None
  import yaml
  kind = 'JSON' if path.endswith('.json') else 'YAML'
  try:
    spec = json.loads(text) if kind == 'JSON' else yaml.safe_load(text)
  except (ValueError, yaml.YAMLError) as e:
    raise CustomerFileError(path, '', f'not valid {kind}: {e}') from None
  errors = _schema_errors(spec)
  if errors:
    pointer, reason = errors[0]
    raise CustomerFileError(path, pointer, reason)
  stem = os.path.splitext(os.path.basename(path))[0]
  if spec['customer_id'] != stem:
    raise CustomerFileError(
        path, '/customer_id', f'{spec["customer_id"]!r} differs from the file name {stem!r}')
  for pointer, resource in _names(spec):
    if not owns(spec['customer_id'], resource):
      raise CustomerFileError(
          path, pointer, f'{resource!r} is not a resource of customer '
          f'{spec["customer_id"]!r}: it must start with {spec["customer_id"]!r} or '
          f'{token(spec["customer_id"])!r} followed by "-", "_", "." or nothing')
  from pipeline.config import RollupError, check_rollups  # Beam's options: slow to import
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
  run`` (pipeline/options.py); the same names are the Flex Template's
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
  params += [('customer_id', customer.customer_id), ('sink', sink['kind'])]
  if sink['kind'] == 'postgres':
    params += [('postgres_dsn', sink['dsn']), ('postgres_table', sink['table']),
               ('postgres_dead_letter_table', sink['dead_letter_table'])]
  else:
    params += [('bigquery_table', sink['table']),
               ('bigquery_dead_letter_table', sink['dead_letter_table'])]
  return params
