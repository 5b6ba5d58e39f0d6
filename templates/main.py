"""The Flex Template's entry point (FLEX_TEMPLATE_PYTHON_PY_FILE).

The launcher calls it with the template parameters as ``--name=value``; it
checks them exactly as ``python -m pipeline run`` does, builds the same
pipeline and submits it without waiting (a streaming job never finishes).
"""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.launch.build import build_run, is_streaming, read_source
from pipeline.settings.config import RunConfig


def main(argv: Optional[List[str]] = None) -> None:
  logging.getLogger().setLevel(logging.INFO)
  options = PipelineOptions(sys.argv[1:] if argv is None else argv)
  config = RunConfig.from_options(options)  # ConfigError names a bad parameter
  options.view_as(StandardOptions).streaming = is_streaming(config)
  p = beam.Pipeline(options=options)
  build_run(p, config, read_source(config))
  p.run()


if __name__ == '__main__':
  main()
