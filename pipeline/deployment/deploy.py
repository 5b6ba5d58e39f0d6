"""``python -m pipeline deploy``: launch one customer's pipeline.

  python -m pipeline deploy (--customer NAME | --customer-file PATH)
      --target dataflow|flink [--stop | --upgrade | --from-savepoint PATH] [--dry-run]

The customer file (templates/customers/NAME.yaml|json, or by its path with
--customer-file) is checked first (pipeline/deployment/customer.py). ``--target
dataflow`` launches the Flex Template (templates/) with ``gcloud dataflow
flex-template run``; ``--target flink`` runs ``python -m pipeline run`` on the
PortableRunner against the Flink job server, which submits it to the
customer's Flink cluster (``flink_master``: detached, checkpointed) or runs it
in its own mini-cluster. On a cluster ``--stop`` stops the job with a
savepoint, ``--upgrade`` stops it so and submits this version restored from
the savepoint, ``--from-savepoint`` submits it restored from one. A stop (and
each detached submission) removes the local job server's staged artifacts of
the jobs that have ended.
``--dry-run`` prints the exact command (and the cluster request), one line
each, shell-quoted, and contacts nothing; otherwise it runs and its exit code
is returned.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

from pipeline.deployment import customer as customers
from pipeline.settings.config import DEFAULT_OUTPUT_DIR
from pipeline.deployment.flink_cluster import (
    FlinkCluster, FlinkClusterError, artifacts_dir, clean_artifacts, savepoint_request)
from pipeline.runfolder.files import MANIFEST, read_json

TARGETS = ('dataflow', 'flink')

def dataflow_outputs(target: dict) -> List[Tuple[str, str]]:
  """The output parameters of a Dataflow job: its bucket (``output_dir``,
  written through Beam's filesystems); no SQLite file."""
  return [('output_dir', target['output_dir']), ('sqlite', 'none')]


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
  params = customers.run_parameters(customer) + dataflow_outputs(target)
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


def flink_command(customer: customers.Customer, python: str = sys.executable,
                  savepoint: Optional[str] = None) -> List[str]:
  """``python -m pipeline run`` for the customer's Flink target: through the
  job server, to its ``flink_master`` cluster (detached, checkpointed, the
  workers in the cluster's pool) or to the job server's own mini-cluster;
  ``savepoint`` restores the job's state from a savepoint."""
  target = customer.spec['deploy']['flink']
  command = [python, '-m', 'pipeline', 'run']
  for dest, value in customers.run_parameters(customer):
    command += ['--' + dest.replace('_', '-'), value]
  command += ['--runner', 'PortableRunner', '--job_endpoint', target['job_endpoint']]
  if 'artifact_endpoint' in target:
    command += ['--artifact_endpoint', target['artifact_endpoint']]
  if 'flink_master' in target:
    command += ['--flink_master', target['flink_master']]
  environment = target.get('environment_type', 'EXTERNAL' if 'worker_pool' in target else 'LOOPBACK')
  command += ['--environment_type', environment]
  if 'worker_pool' in target:
    command += ['--environment_config', target['worker_pool']]
  command.append('--streaming')
  if 'checkpoint_interval_s' in target:
    command += ['--checkpointing_interval', str(target['checkpoint_interval_s'] * 1000)]
  if 'parallelism' in target:
    command += ['--parallelism', str(target['parallelism'])]
    if environment == 'EXTERNAL':  # one SDK worker process (one GIL) per slot of the job
      command += ['--sdk_worker_parallelism', str(target['parallelism'])]
  if 'job_name' in target:
    command += ['--job_name', target['job_name']]
  if savepoint is not None:
    command += ['--savepoint_path', savepoint]
  return command


def _cluster_target(customer: customers.Customer) -> dict:
  target = customer.spec['deploy'].get('flink')
  if target is None or 'flink_master' not in target:
    raise customers.CustomerFileError(
        customer.path, '/deploy/flink/flink_master',
        'is required to stop or upgrade a job (savepoints need a Flink cluster)')
  if 'job_name' not in target:
    raise customers.CustomerFileError(
        customer.path, '/deploy/flink/job_name', 'is required: it is how the job is found')
  return target


def stop_request(customer: customers.Customer) -> str:
  """What ``--stop`` asks the cluster, as one line (the dry run prints it)."""
  target = _cluster_target(customer)
  body = json.dumps(savepoint_request(target.get('savepoint_dir')))
  return (f'POST http://{target["flink_master"]}/jobs/<the running job named '
          f'{target["job_name"]}>/savepoints {body}')


def stop_with_savepoint(customer: customers.Customer) -> str:
  """Stops the customer's running job with a savepoint; returns its path."""
  target = _cluster_target(customer)
  cluster = FlinkCluster(target['flink_master'])
  job = cluster.running_job(target['job_name'])
  if job is None:
    raise FlinkClusterError(
        f'no running job named {target["job_name"]!r} on {target["flink_master"]}')
  print(f'tidemark: stopping job {job.name!r} ({job.jid}) with a savepoint', file=sys.stderr)
  return cluster.stop_with_savepoint(job.jid, target.get('savepoint_dir'))


def resume_checkpoint(customer: customers.Customer) -> str:
  """The checkpoint to restore the customer's job from after its cluster lost
  it (a JobManager restarted without high availability forgets its jobs; their
  checkpoints stay): the newest complete one of the job its output folder's
  ``run.json`` names. Raises FlinkClusterError saying what is missing."""
  target = _cluster_target(customer)
  cluster = FlinkCluster(target['flink_master'])
  running = cluster.running_job(target['job_name'])
  if running is not None:
    raise FlinkClusterError(
        f'job {running.name!r} ({running.jid}) is running on {target["flink_master"]}: '
        'nothing to resume (--upgrade replaces it)')
  output_dir = dict(customers.run_parameters(customer)).get('output_dir', DEFAULT_OUTPUT_DIR)
  manifest = read_json(os.path.join(output_dir, MANIFEST)) or {}
  job = manifest.get('flink_job') or {}
  if job.get('name') != target['job_name'] or not job.get('jid'):
    raise FlinkClusterError(
        f'{os.path.join(output_dir, MANIFEST)} names no earlier job {target["job_name"]!r}: '
        'deploy it afresh (without --resume)')
  checkpoint = cluster.latest_retained_checkpoint(job['jid'])
  if checkpoint is None:
    raise FlinkClusterError(
        f'job {job["jid"]} left no complete checkpoint in the cluster\'s '
        'state.checkpoints.dir that this machine can read: give its latest chk-N folder '
        'with --from-savepoint, or deploy afresh')
  print(f'tidemark: resuming job {job["name"]!r} ({job["jid"]}) from {checkpoint}',
        file=sys.stderr)
  return checkpoint


def remove_ended_artifacts() -> None:
  """Removes the local job server's staged artifacts of jobs that have ended
  (the one just stopped among them); the job server keeps a detached job's."""
  try:
    removed = clean_artifacts(artifacts_dir())
  except OSError as e:
    print(f'tidemark: warning: staged artifacts not cleaned: {e}', file=sys.stderr)
    return
  for folder in removed:
    print(f'tidemark: removed the staged artifacts of an ended job: {folder}', file=sys.stderr)


def launch_command(customer: customers.Customer, target: str) -> List[str]:
  if target not in customer.spec['deploy']:
    raise customers.CustomerFileError(
        customer.path, f'/deploy/{target}',
        f'is required to deploy to {target} (configured: {", ".join(customer.spec["deploy"])})')
  return dataflow_command(customer) if target == 'dataflow' else flink_command(customer)


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m pipeline deploy', description=__doc__.split('\n\n')[0])
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument('--customer', metavar='NAME',
                        help='customer name: its file NAME.yaml|.yml|.json in --customers-dir')
  which.add_argument('--customer-file', metavar='PATH',
                        help='a customer file elsewhere, by its path')
  parser.add_argument('--target', required=True, choices=TARGETS)
  action = parser.add_mutually_exclusive_group()
  action.add_argument('--stop', action='store_true',
                      help='flink cluster: stop the running job with a savepoint')
  action.add_argument('--upgrade', action='store_true',
                      help='flink cluster: stop the running job with a savepoint, then submit '
                      'this version restored from it')
  action.add_argument('--from-savepoint', metavar='PATH',
                      help='flink: submit the job restored from this savepoint (or checkpoint)')
  action.add_argument('--resume', action='store_true',
                      help='flink cluster: submit the job restored from the latest checkpoint '
                      'its last run left, once the cluster no longer runs it (a JobManager '
                      'restarted without high availability forgets its jobs)')
  parser.add_argument('--dry-run', action='store_true',
                      help='print what would be done and exit, contacting nothing')
  parser.add_argument('--customers-dir', default=None,
                      help='where customer files live (default: $TIDEMARK_CUSTOMERS_DIR, else '
                      'templates/customers under the working directory)')
  args = parser.parse_args(argv)
  if (args.stop or args.upgrade or args.from_savepoint or args.resume) and args.target != 'flink':
    parser.error('--stop, --upgrade, --from-savepoint and --resume are for --target flink')
  try:
    customer = (customers.load_file(args.customer_file) if args.customer_file is not None
                else customers.load(args.customer, args.customers_dir))
    command = launch_command(customer, args.target)
    if args.stop or args.upgrade or args.resume:
      request = stop_request(customer) if not args.resume else ''
    if args.from_savepoint:
      command = flink_command(customer, savepoint=args.from_savepoint)
  except customers.CustomerFileError as e:
    print(f'tidemark: error: {e}', file=sys.stderr)
    return 2
  if args.dry_run:
    if args.stop or args.upgrade:
      print(request)
    if args.upgrade:
      command = flink_command(customer, savepoint='<the savepoint the stop wrote>')
    if args.resume:
      command = flink_command(customer, savepoint='<the latest checkpoint of the last job>')
    if not args.stop:
      print(shlex.join(command))
    return 0
  if args.stop or args.upgrade:
    try:
      savepoint = stop_with_savepoint(customer)
    except FlinkClusterError as e:
      print(f'tidemark: error: {e}', file=sys.stderr)
      return 1
    print(f'tidemark: savepoint {savepoint}')
    remove_ended_artifacts()
    if args.stop:
      return 0
    command = flink_command(customer, savepoint=savepoint)
  if args.resume:
    try:
      command = flink_command(customer, savepoint=resume_checkpoint(customer))
    except FlinkClusterError as e:
      print(f'tidemark: error: {e}', file=sys.stderr)
      return 1
  if shutil.which(command[0]) is None:
    print(f'tidemark: error: {command[0]} not found on PATH', file=sys.stderr)
    return 127
  print(f'tidemark: launching: {shlex.join(command)}', file=sys.stderr)
  return subprocess.run(command, check=False).returncode
