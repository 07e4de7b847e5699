"""Spark pipelines: DataFrame in, DataFrame out. The stages in dlpipe.stages do the I/O."""
