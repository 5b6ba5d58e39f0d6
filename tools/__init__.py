"""Development tools around Tidemark: the traffic generator and simulator, the
plain-Python reference reading of the contract (the tests' oracle) and the
benchmarks. They run from a checkout and do not ship with the pipeline."""
