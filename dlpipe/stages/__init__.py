"""The pipeline stages, one module each. Every stage is `run(spark, <the config sections it
uses>, <its input references>) -> summary`: a JSON-able dict naming the tables and versions it
read and wrote, the run, the model version. dlpipe.cli.COMMANDS maps each command name to its
stage and the sections it takes; jobs/*.py and the tests run that same table. retrain and demo
run other stages, so they take the whole config."""
