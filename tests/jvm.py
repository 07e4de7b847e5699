"""Faster start-up for the JVMs of the `dlpipe` processes the tests run (each starts its own Spark).

Two JVM options, given to every JVM pyspark starts through PYSPARK_SUBMIT_ARGS:
- `-XX:TieredStopAtLevel=1` (C1 only): these JVMs live seconds to minutes, where C2's compile
  threads cost more than they win on 2 cores;
- a class-data-sharing archive (JDK 17's dynamic CDS) of the classes a short Spark + Delta job
  loads, dumped once into .work/jvm/ and reused while Java and the jars stay the same: the JVM maps
  the classes instead of loading and verifying them again.
Measured on 2 cores: a process that starts Spark and appends to and reads a small Delta table 6
times took 40 s with C2 and 28.5 s with C1; one that does it twice took 29 s with C1 alone and
18-21 s with C1 and the archive (docs/testing.md). The tests' own Spark (the
`spark` fixture) lives the whole run and starts without them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
C1 = "-XX:TieredStopAtLevel=1"
QUIET = "-Xlog:cds=off,cds+dynamic=off"  # an archive that no longer fits is skipped without a word

DUMP = """
import shutil, sys, tempfile
from dlpipe.config import load_config
from dlpipe.spark import get_session
cfg = load_config()
spark = get_session("local[1]", "cds", {**cfg.spark.conf, "spark.ui.enabled": "false"}, jars_dir=cfg.spark.jars_dir,
                    engine="spark")
where = tempfile.mkdtemp()
df = spark.range(50).selectExpr("id", "cast(id as string) as key", "array(cast(id as float)) as v")
for mode in ("overwrite", "append"):
    df.write.format("delta").mode(mode).save(where + "/t")
rows = spark.read.format("delta").load(where + "/t").mapInPandas(lambda b: b, df.schema).count()
spark.stop()
shutil.rmtree(where)
sys.exit(0 if rows == 100 else 1)
"""


def archive_path() -> Path:
    """.work/jvm/spark-<digest>.jsa, the digest over Java's version and every jar Spark loads."""
    from dlpipe.config import load_config
    import pyspark

    version = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
    jars = sorted(Path(pyspark.__file__).parent.joinpath("jars").glob("*.jar"))
    jars += sorted((ROOT / load_config().spark.jars_dir).glob("*.jar"))
    digest = hashlib.sha256("\n".join([version, *(f"{j}:{j.stat().st_size}" for j in jars)]).encode()).hexdigest()
    return ROOT / ".work" / "jvm" / f"spark-{digest[:16]}.jsa"


def submit_args() -> str:
    """PYSPARK_SUBMIT_ARGS for short-lived JVMs: C1, and the class archive (dumped here when missing;
    without it when the dump fails)."""
    archive = archive_path()
    if not archive.is_file():
        archive.parent.mkdir(parents=True, exist_ok=True)
        partial = archive.with_suffix(f".partial-{os.getpid()}")
        env = {**os.environ, "PYTHONPATH": str(ROOT),
               "PYSPARK_SUBMIT_ARGS": f"--driver-java-options '{C1} {QUIET} -XX:ArchiveClassesAtExit={partial}' pyspark-shell"}
        done = subprocess.run([sys.executable, "-c", DUMP], env=env, capture_output=True, text=True, timeout=600)
        if done.returncode == 0 and partial.is_file():
            partial.rename(archive)
        else:
            partial.unlink(missing_ok=True)
            sys.stderr.write(f"tests/jvm.py: no class archive (exit {done.returncode}); the JVMs start without it\n")
    shared = f" -XX:SharedArchiveFile={archive}" if archive.is_file() else ""
    return f"--driver-java-options '{C1} {QUIET}{shared}' pyspark-shell"
