"""``python -m pipeline.launch.worker_pool --port N``: the Python worker pool a Flink
TaskManager asks for SDK workers (Beam's ``EXTERNAL`` environment).

It runs beside each TaskManager (on Kubernetes, as a sidecar container): the
TaskManager's job asks it for a worker, it starts one as a subprocess of this
Python (with Tidemark installed), and the worker connects back. The launcher
can exit; the job keeps its workers. Started as a process-group leader (``setsid``), it ends its workers when
it stops. Beam's own entry point
(``apache_beam.runners.worker.worker_pool_main``) listens on every interface;
this one listens on ``--host`` only (127.0.0.1 unless told).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import List, Optional

import grpc
from apache_beam.portability.api import beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer
from apache_beam.utils import thread_pool_executor


def serve(host: str, port: int) -> grpc.Server:
  """Starts the pool on ``host:port``; workers are subprocesses running the
  ``python`` first on PATH, so PATH must lead to this interpreter."""
  server = grpc.server(thread_pool_executor.shared_unbounded_instance())
  if server.add_insecure_port(f'{host}:{port}') == 0:
    raise OSError(f'cannot listen on {host}:{port}')
  beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(
      BeamFnExternalWorkerPoolServicer(use_process=True), server)
  server.start()
  return server


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m pipeline.launch.worker_pool',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--host', default='127.0.0.1')
  parser.add_argument('--port', type=int, required=True)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  # Workers are started as `python -c ...`: make that this interpreter.
  os.environ['PATH'] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')
  server = serve(args.host, args.port)
  logging.info('worker pool listening on %s:%d', args.host, args.port)
  stopped = threading.Event()
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda *_: stopped.set())
  stopped.wait()
  server.stop(5).wait()
  if os.getpgid(0) == os.getpid():
    os.killpg(os.getpid(), signal.SIGTERM)  # the workers it started (its process group)
  return 0


if __name__ == '__main__':
  sys.exit(main())
