"""Benchmarks of dlpipe against plain baselines. Not installed with the dlpipe package: they run
from a checkout (`dlpipe bench <name>` puts the checkout on sys.path) and their baselines
(scikit-learn, the plain PyTorch loop) are dependencies of the benchmarks only.

Each benchmark is a module with `run(spark, cfg, **options) -> summary`; NAMES maps the
`dlpipe bench <name>` argument to it."""

NAMES = {"training": "benchmarks.training", "prepare": "benchmarks.prepare", "score": "benchmarks.score",
         "models": "benchmarks.models"}
