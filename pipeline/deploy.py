"""``python -m pipeline deploy``: launch one customer's pipeline.

  python -m pipeline deploy (--customer NAME | --customer-file PATH)
      --target dataflow|flink [--dry-run]

The customer file (templates/customers/NAME.yaml|json, or by its path with
--customer-file) is checked first (pipeline/customer.py). ``--target
dataflow`` launches the Flex Template (templates/) with ``gcloud dataflow
flex-template run``; ``--target flink`` runs ``python -m pipeline run`` on the
PortableRunner against the Flink job server. ``--dry-run`` prints the exact
command, one line, shell-quoted, and contacts nothing; otherwise the command
runs and its exit code is returned.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import shutil
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

from pipeline import customer as customers

TARGETS = ('dataflow', 'flink')
#: Dataflow workers have no use for the local outputs; keep them off the way.
DATAFLOW_LOCAL_OUTPUTS = (('output_dir', '/tmp/tidemark-output'), ('sqlite', 'none'))


#: Delimiters tried, in order, for a gcloud dict flag whose values hold commas.
_DELIMITERS = ',~;|#@!:+%&*'


def _delimiters():
  """Candidate delimiters: single characters, then runs of each (gcloud takes
  any sequence of characters that appears in no value)."""
  for length in itertools.count(1):
    for char in _DELIMITERS:
      yield char * length


def _gcloud_dict(params: Sequence[Tuple[str, str]]) -> str:
  """A gcloud dict flag value; values holding commas (a list of
  subscriptions, a DSN's query) need gcloud's alternate delimiter syntax
  (`gcloud topic escaping`): the first delimiter that splits the value back
  into exactly these items."""
  items = [f'{k}={v}' for k, v in params]
  for delimiter in _delimiters():
    body = delimiter.join(items)
    if body.split(delimiter) == items:
      return body if delimiter == ',' else f'^{delimiter}^{body}'
  raise AssertionError('unreachable: a long enough run of one character always splits')


def dataflow_command(customer: customers.Customer) -> List[str]:
  target = customer.spec['deploy']['dataflow']
  params = customers.run_parameters(customer) + list(DATAFLOW_LOCAL_OUTPUTS)
  command = [
      'gcloud', 'dataflow', 'flex-template', 'run', target['job_name'],
      f'--project={target["project"]}',
      f'--region={target["region"]}',
      f'--template-file-gcs-location={target["template_file"]}',
      f'--temp-location={target["temp_location"]}',
  ]
  if 'service_account' in target:
    command.append(f'--service-account-email={target["service_account"]}')
  if 'max_workers' in target:
    command.append(f'--max-workers={target["max_workers"]}')
  if 'worker_machine_type' in target:
    command.append(f'--worker-machine-type={target["worker_machine_type"]}')
  command += [
      f'--additional-user-labels=tidemark-customer={customers.token(customer.customer_id)}',
      f'--parameters={_gcloud_dict(params)}',
  ]
  return command


def flink_command(customer: customers.Customer, python: str = sys.executable) -> List[str]:
  target = customer.spec['deploy']['flink']
  command = [python, '-m', 'pipeline', 'run']
  for dest, value in customers.run_parameters(customer):
    command += ['--' + dest.replace('_', '-'), value]
  command += ['--runner', 'PortableRunner', '--job_endpoint', target['job_endpoint']]
  if 'artifact_endpoint' in target:
    command += ['--artifact_endpoint', target['artifact_endpoint']]
  command += ['--environment_type', target.get('environment_type', 'LOOPBACK'), '--streaming']
  if 'parallelism' in target:
    command += ['--parallelism', str(target['parallelism'])]
  if 'job_name' in target:
    command += ['--job_name', target['job_name']]
  return command


def launch_command(customer: customers.Customer, target: str) -> List[str]:
  if target not in customer.spec['deploy']:
    raise customers.CustomerFileError(
        customer.path, f'/deploy/{target}',
        f'is required to deploy to {target} (configured: {", ".join(customer.spec["deploy"])})')
  return dataflow_command(customer) if target == 'dataflow' else flink_command(customer)


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m pipeline deploy', description=__doc__.split('\n\n')[0])
  customer = parser.add_mutually_exclusive_group(required=True)
  customer.add_argument('--customer', metavar='NAME',
                        help='customer name: its file NAME.yaml|.yml|.json in --customers-dir')
  customer.add_argument('--customer-file', metavar='PATH',
                        help='a customer file elsewhere, by its path')
  parser.add_argument('--target', required=True, choices=TARGETS)
  parser.add_argument('--dry-run', action='store_true',
                      help='print the launch command and exit, contacting nothing')
  parser.add_argument('--customers-dir', default=customers.CUSTOMERS_DIR,
                      help='where customer files live (default: templates/customers)')
  args = parser.parse_args(argv)
  try:
    customer = (customers.load_file(args.customer_file) if args.customer_file is not None
                else customers.load(args.customer, args.customers_dir))
    command = launch_command(customer, args.target)
  except customers.CustomerFileError as e:
    print(f'tidemark: error: {e}', file=sys.stderr)
    return 2
  if args.dry_run:
    print(shlex.join(command))
    return 0
  if shutil.which(command[0]) is None:
    print(f'tidemark: error: {command[0]} not found on PATH', file=sys.stderr)
    return 127
  print(f'tidemark: launching: {shlex.join(command)}', file=sys.stderr)
  return subprocess.run(command, check=False).returncode
