"""Submitting a live job to a Flink session cluster, detached.

A live source on a cluster (``--flink_master HOST:PORT``, the JobManager's
REST address, with the Beam job server in between) runs until it is stopped:
the launcher submits it detached, waits until the cluster reports it RUNNING,
prints its id and exits. The job's Python workers run in the cluster's worker
pool (``--environment_type EXTERNAL``), so nothing of the job is left in the
launcher. Stop or upgrade it with ``python -m pipeline deploy ... --stop`` /
``--upgrade`` (a savepoint), or through Flink's own REST API. Once it runs, the
launcher names it in the job server's folder of its staged artifacts, which go
once it has ended (pipeline/deployment/flink_cluster.py).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable, List, Optional

import apache_beam as beam
import grpc
from apache_beam.options.pipeline_options import (
    FlinkRunnerOptions, GoogleCloudOptions, PipelineOptions, PortableOptions)
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_job_api_pb2, beam_runner_api_pb2
from google.protobuf.message import DecodeError

from pipeline.settings.config import RunConfig
from pipeline.settings.runners import runner_name
from pipeline.settings.checks import ConfigError
from pipeline.deployment.flink_cluster import (
    FlinkCluster, FlinkClusterError, Job, clean_artifacts, staging_folders, write_job_record)

#: Flink masters that are not a cluster: the job server's own mini-cluster.
LOCAL_MASTERS = ('[local]', '[auto]', '[collection]', '')
#: How long a submission may take to show up RUNNING (jars are shipped first).
SUBMIT_TIMEOUT_S = 300


def cluster_master(options: PipelineOptions) -> Optional[str]:
  """The Flink cluster a run is submitted to (``--flink_master``), or None."""
  master = options.view_as(FlinkRunnerOptions).flink_master or ''
  return None if master in LOCAL_MASTERS else master.replace('http://', '').rstrip('/')


def detached_config(config: RunConfig) -> RunConfig:
  """The workers run elsewhere (another directory, on Kubernetes another
  machine): their output paths are absolute."""
  sqlite = config.sqlite_path and os.path.abspath(config.sqlite_path)
  return dataclasses.replace(config, output_dir=os.path.abspath(config.output_dir),
                             sqlite_path=sqlite)


def detach(options: PipelineOptions, customer_id: Optional[str]) -> str:
  """Sets the run up for a detached submission; returns the job's name on the
  cluster (``--job_name``, else one is made): how ``deploy --stop`` finds it."""
  from pipeline.settings.options import FlinkRunnerJavaOptions
  options.view_as(FlinkRunnerJavaOptions).attached_mode = 'false'
  cloud = options.view_as(GoogleCloudOptions)
  if not cloud.job_name:
    cloud.job_name = f'tidemark-{customer_id or "job"}-{time.strftime("%Y%m%d-%H%M%S")}'.lower()
  return cloud.job_name


def submit_detached(options: PipelineOptions, pipeline: beam.Pipeline, master: str,
                    name: str, staging: str,
                    running: Optional[Callable[[dict], None]] = None) -> int:
  """Runs ``pipeline`` detached on the cluster at ``master``; returns the exit
  code (0 once the cluster runs it, 1 if it does not show up). ``running``
  receives ``{'master', 'jid', 'name'}`` once the cluster runs it (the run's
  manifest records it: ``deploy --resume`` finds the job's checkpoints by it)."""
  environment = (options.view_as(PortableOptions).environment_type or '').upper()
  if environment == 'LOOPBACK':
    print('tidemark: error: --environment_type LOOPBACK runs the workers in this launcher, '
          'which exits after a detached submission; use EXTERNAL with the cluster\'s worker '
          'pool (--environment_config 127.0.0.1:18050)', file=sys.stderr)
    return 2
  cluster = FlinkCluster(master)
  since_ms = int(time.time() * 1000) - 1000
  try:
    cluster.overview()  # fail before shipping anything when the cluster is down
    result = pipeline.run()
    job = cluster.wait_for_job(name, SUBMIT_TIMEOUT_S, since_ms)
  except FlinkClusterError as e:
    print(f'tidemark: error: {e}', file=sys.stderr)
    return 1
  if running is not None:
    running({'master': master, 'jid': job.jid, 'name': job.name})
  record_artifacts(result, master, job)
  print(f'tidemark: job {name!r} ({job.jid}) is running on the Flink cluster at {master}, '
        f'detached; it runs until stopped (python -m pipeline deploy ... --stop takes a '
        f'savepoint). Its files are written in {staging}.')
  return 0


def staged_artifact_paths(result: beam.runners.runner.PipelineResult) -> List[str]:
  """The files the job server staged for this submission, as the pipeline it
  runs names them; [] when the job server cannot tell."""
  # Beam's portable PipelineResult: the job service's stub and the job's id there.
  get_pipeline = getattr(getattr(result, '_job_service', None), 'GetPipeline', None)
  job_id = getattr(result, '_job_id', None)
  if get_pipeline is None or not job_id:
    return []
  file_urn = common_urns.artifact_types.FILE.urn
  try:
    pipeline = get_pipeline(beam_job_api_pb2.GetJobPipelineRequest(job_id=job_id),
                            timeout=30).pipeline
    return [beam_runner_api_pb2.ArtifactFilePayload.FromString(artifact.type_payload).path
            for environment in pipeline.components.environments.values()
            for artifact in environment.dependencies if artifact.type_urn == file_urn]
  except (grpc.RpcError, DecodeError):
    return []


def record_artifacts(result: beam.runners.runner.PipelineResult, master: str, job: Job) -> None:
  """Names the cluster job in the artifact folder the job server staged for
  it, when that folder is on this machine, and removes the folders of jobs
  that have ended (pipeline/deployment/flink_cluster.py): the job server keeps a
  detached job's artifacts for good. A failure here leaves the job running."""
  try:
    folders = [f for f in staging_folders(staged_artifact_paths(result)) if os.path.isdir(f)]
    for folder in folders:
      write_job_record(folder, master, job.jid, job.name)
    for root in sorted({os.path.dirname(f) for f in folders}):
      for removed in clean_artifacts(root):
        print(f'tidemark: removed the staged artifacts of an ended job: {removed}',
              file=sys.stderr)
  except (OSError, ValueError) as e:
    print(f'tidemark: warning: the staged artifacts of job {job.jid} are not recorded ({e}); '
          'scripts/flink.sh removes them when the job server restarts', file=sys.stderr)


def check_flink_job_server(options: PipelineOptions) -> None:
  """``--runner FlinkRunner`` starts Beam's job server jar, which Beam would
  download from Maven Central; refuses the run at once, naming the fix, when
  neither a job endpoint, nor a jar, nor Beam's cached copy is there."""
  if runner_name(options) != 'FlinkRunner' or options.view_as(PortableOptions).job_endpoint:
    return
  if options.view_as(FlinkRunnerOptions).flink_job_server_jar:
    return  # Beam checks the path itself
  from apache_beam.runners.portability.flink_runner import FlinkJarJobServer
  from apache_beam.utils.subprocess_server import JavaJarServer
  cached = os.path.join(JavaJarServer.JAR_CACHE,
                        os.path.basename(FlinkJarJobServer(options).path_to_jar()))
  if not os.path.exists(cached):
    raise ConfigError(
        '--runner', f'FlinkRunner needs the Flink job server jar in {cached}; '
        'scripts/stage-java.sh builds it (scripts/setup.sh runs it), or pass '
        '--job_endpoint HOST:PORT of a running job server or --flink_job_server_jar PATH')
