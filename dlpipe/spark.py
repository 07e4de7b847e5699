"""The one place that creates a SparkSession (called by job entry points and tests only).

It also decides the Delta engine of the session (config `lake.engine`):
- `spark`: delta-spark on the JVM. Its jars (deploy/jars/pom.xml, fetched by `make setup` into
  `spark.jars_dir`) go on spark.jars, or come from the cluster / spark-submit --packages.
- `rs`: delta-rs commits from the driver, Spark writes the Parquet files (no JVM jars needed).
- `auto`: `spark` when the delta-spark classes load, else `rs`.
The choice is stored in the session's runtime conf (`dlpipe.lake.engine`) where dlpipe.lake reads it.
"""

from __future__ import annotations

import glob
import os
import sys

from pyspark import SparkConf, SparkContext
from pyspark.sql import SparkSession

from dlpipe import lake, storage
from dlpipe.errors import ConfigError

ENGINES = ("auto", "spark", "rs")
ENGINE_KEY = lake.ENGINE_KEY
DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}
S3_LOG_STORE = "dlpipe.delta.S3ConditionalPutLogStore"  # deploy/jars/src
FETCH_HINT = ("run `make setup` (Maven fetches deploy/jars/pom.xml into .work/jars), or give Spark the jars "
              "with --packages io.delta:delta-spark_4.2_2.13:4.4.0")


class EngineError(ConfigError):
    """lake.engine=spark but the delta-spark classes are not on Spark's classpath."""


def get_session(master: str, app_name: str, conf: dict[str, str] | None = None, *,
                jars_dir: str = "", engine: str = "auto") -> SparkSession:
    """Build (or return the active) SparkSession.

    Under spark-submit the JVM is already running with its --master, --conf and --jars; they
    win, and the config only fills in what they leave unset. Otherwise we start the JVM with
    the config (so settings such as spark.driver.memory and spark.jars take effect).
    """
    if engine not in ENGINES:
        raise ValueError(f"config key 'lake.engine': expected one of {list(ENGINES)}, got {engine!r}")
    given = SparkConf(loadDefaults=False)
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ
    if submitted:
        SparkContext._ensure_initialized()
        given = SparkConf()
    settings = dict(conf or {})
    if engine != "rs":
        # under spark-submit the driver's classpath is fixed already: only its --jars/--packages count
        jars = [] if submitted else delta_jars(jars_dir)
        if jars and not (given.contains("spark.jars") or "spark.jars" in settings):
            settings["spark.jars"] = ",".join(jars)
        if jars or _jvm_has("org.apache.hadoop.fs.s3a.S3AFileSystem"):
            settings.update({k: v for k, v in storage.spark_s3_conf().items() if k not in settings})
        if any(os.path.basename(j).startswith("dlpipe-spark-jars") for j in jars) or _jvm_has(S3_LOG_STORE):
            for scheme in storage.S3_SCHEMES:  # commits with S3's conditional put (docs/storage.md)
                settings.setdefault(f"spark.delta.logStore.{scheme}.impl", S3_LOG_STORE)
        if jars or _jvm_has("io.delta.tables.DeltaTable") or _named_elsewhere(given, settings):
            for key, value in DELTA_CONF.items():
                settings.setdefault(key, value)
        elif engine == "spark":
            raise EngineError(f"lake.engine=spark: no delta-spark jars in spark.jars_dir={jars_dir or '(unset)'} "
                              f"and none given to Spark; {FETCH_HINT}")
    # executors run this interpreter (the venv's) unless told otherwise
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if not given.contains("spark.master"):
        builder = builder.master(master)
    for key, value in settings.items():
        if not given.contains(key):
            builder = builder.config(key, str(value))
    session = builder.getOrCreate()
    session.conf.set(ENGINE_KEY, engine)
    if engine == "spark" and not lake.native_delta_available(session):
        raise EngineError(f"lake.engine=spark: the delta-spark classes do not load in this Spark session; {FETCH_HINT}")
    return session


def delta_jars(jars_dir: str) -> list[str]:
    """The jars of `jars_dir` (absolute paths) when it holds delta-spark, else []."""
    if not jars_dir:
        return []
    jars = sorted(glob.glob(os.path.join(os.path.abspath(jars_dir), "*.jar")))
    return jars if any(os.path.basename(j).startswith("delta-spark_") for j in jars) else []


def _jvm_has(class_name: str) -> bool:
    """Under spark-submit: is the class on the driver's classpath (--jars, --packages, the cluster)?"""
    jvm = SparkContext._jvm
    if jvm is None:
        return False
    try:
        loader = jvm.org.apache.spark.util.Utils.getContextOrSparkClassLoader()
        jvm.java.lang.Class.forName(class_name, False, loader)
        return True
    except Exception:  # py4j wraps ClassNotFoundException
        return False


def _named_elsewhere(given: SparkConf, settings: dict[str, str]) -> bool:
    """delta-spark asked for by the user's own spark.jars.packages / spark.jars / extensions."""
    text = " ".join(str(v) for k, v in [*given.getAll(), *settings.items()]
                    if k in ("spark.jars.packages", "spark.jars", "spark.sql.extensions"))
    return "delta" in text.lower()
