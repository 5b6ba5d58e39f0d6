"""``python -m pipeline deploy``: launch one customer's pipeline.

  python -m pipeline deploy --customer NAME --target dataflow|flink [--dry-run]

The customer file (templates/customers/NAME.yaml|json, or a path) is checked
first (pipeline/customer.py). ``--target dataflow`` launches the Flex Template
(templates/) with ``gcloud dataflow flex-template run``; ``--target flink``
runs ``python -m pipeline run`` on the PortableRunner against the Flink job
server. ``--dry-run`` prints the exact command, one line, shell-quoted, and
contacts nothing; otherwise the command runs and its exit code is returned.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

from pipeline import customer as customers

TARGETS = ('dataflow', 'flink')
#: Dataflow workers have no use for the local outputs; keep them off the way.
DATAFLOW_LOCAL_OUTPUTS = (('output_dir', '/tmp/tidemark-output'), ('sqlite', 'none'))


def _gcloud_dict(params: Sequence[Tuple[str, str]]) -> str:
  """A gcloud dict flag value; values holding commas (a list of
  subscriptions) need gcloud's alternate delimiter syntax (`gcloud topic
  escaping`)."""
  values = [v for _, v in params]
  delimiter = ','
  if any(',' in v for v in values):
    delimiter = next(d for d in '~;|#@!' if not any(d in v for v in values))
  body = delimiter.join(f'{k}={v}' for k, v in params)
  return body if delimiter == ',' else f'^{delimiter}^{body}'


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
  parser.add_argument('--customer', required=True,
                      help='customer name (templates/customers/NAME.yaml|json) or file path')
  parser.add_argument('--target', required=True, choices=TARGETS)
  parser.add_argument('--dry-run', action='store_true',
                      help='print the launch command and exit, contacting nothing')
  parser.add_argument('--customers-dir', default=customers.CUSTOMERS_DIR,
                      help='where customer files live (default: templates/customers)')
  args = parser.parse_args(argv)
  try:
    command = launch_command(customers.load(args.customer, args.customers_dir), args.target)
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
