"""Spark pipelines: DataFrame in, DataFrame out. Jobs in dlpipe.steps do the I/O."""
