"""The one place that creates a SparkSession (called by job entry points and tests only)."""

from __future__ import annotations

import os
import sys

from pyspark import SparkConf, SparkContext
from pyspark.sql import SparkSession


def get_session(master: str, app_name: str, conf: dict[str, str] | None = None) -> SparkSession:
    """Build (or return the active) SparkSession.

    Under spark-submit the JVM is already running with its --master and --conf settings; they
    win, and the config only fills in what they leave unset. Otherwise we start the JVM with
    the config (so settings such as spark.driver.memory take effect).
    """
    given = SparkConf(loadDefaults=False)
    if "PYSPARK_GATEWAY_PORT" in os.environ:  # launched by spark-submit
        SparkContext._ensure_initialized()
        given = SparkConf()
    # executors run this interpreter (the venv's) unless told otherwise
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if not given.contains("spark.master"):
        builder = builder.master(master)
    for key, value in (conf or {}).items():
        if not given.contains(key):
            builder = builder.config(key, str(value))
    return builder.getOrCreate()
