"""The pipeline stages, one module each. Every stage is `run(spark, <the config sections it
uses>, <its input references>) -> summary`: a JSON-able dict naming the tables and versions it
read and wrote, the run, the model version. dlpipe.cli maps command names to them (jobs/*.py call
the CLI); `call(name, spark, cfg)` runs one with a whole config, as the CLI does."""
