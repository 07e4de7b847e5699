"""A real HDFS for the tests: a NameNode and a DataNode on 127.0.0.1, started from Hadoop's
mini-cluster jar (tests/hdfs/HdfsCluster.java, a single-file Java program) in its own JVM.

The jars come from Maven Central through tests/hdfs/pom.xml into .work/hdfs-jars (ignored by git),
fetched once and reused; they are fetched again when the pom changes.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
POM = HERE / "pom.xml"
LAUNCHER = HERE / "HdfsCluster.java"
JARS = ROOT / ".work" / "hdfs-jars"
START_TIMEOUT_S = 180


class HdfsError(RuntimeError):
    """The test HDFS could not be fetched, started or driven (one line)."""


def ensure_jars(jars: Path = JARS) -> Path:
    """The folder of the mini-cluster's jars, resolved by Maven from tests/hdfs/pom.xml when it is
    missing or was made from another pom."""
    stamp = jars / ".pom-sha256"
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == digest and any(jars.glob("hadoop-client-minicluster-*.jar")):
        return jars
    mvn = shutil.which("mvn")
    if mvn is None:
        raise HdfsError(f"the test HDFS needs its jars in {jars} and Maven (mvn) on PATH to fetch them from "
                        f"Maven Central with {POM.relative_to(ROOT)}")
    partial = jars.with_name(jars.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    done = subprocess.run([mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
                           f"-DoutputDirectory={partial}"], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if "ERROR" in line] or ["(no output)"]
        raise HdfsError(f"mvn could not fetch the test HDFS jars of {POM.relative_to(ROOT)}: {lines[0].strip()[:300]}")
    (partial / ".pom-sha256").write_text(digest + "\n")
    shutil.rmtree(jars, ignore_errors=True)
    partial.rename(jars)
    return jars


class HdfsCluster:
    """The running cluster: `uri` (hdfs://127.0.0.1:PORT), `url(path)`, and the DataNode's
    `stop_datanode()` / `start_datanode()`. `stop()` shuts it all down."""

    def __init__(self, base: Path, jars: Path | None = None) -> None:
        java = shutil.which("java")
        if java is None:
            raise HdfsError("the test HDFS needs Java 17 (java) on PATH")
        jars = ensure_jars() if jars is None else jars
        base.mkdir(parents=True, exist_ok=True)
        self.log_path = base / "hdfs.log"
        self._log = open(self.log_path, "w")
        self._proc = subprocess.Popen(
            [java, "-Xmx768m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
             "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", "-cp", f"{jars}/*", str(LAUNCHER), str(base / "dfs")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1, cwd=base,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._lock = threading.Lock()
        line = self._next_line(START_TIMEOUT_S, "start")
        if not line.startswith("HDFS_URI "):
            self._fail(f"the test HDFS printed {line!r} instead of its URI")
        self.uri = line.split(" ", 1)[1].strip()
        self.datanode_running = True

    def url(self, path: str) -> str:
        return f"{self.uri}/{path.lstrip('/')}"

    def stop_datanode(self) -> None:
        """Stop the DataNode; its blocks stay on its disk and the NameNode still lists it (as
        after a crash, until its heartbeats are missed): writes fail, reads of its blocks fail."""
        self._command("stop-datanode")
        self.datanode_running = False

    def start_datanode(self) -> None:
        """Start the DataNode again on its ports; returns once the NameNode has its blocks."""
        self._command("start-datanode")
        self.datanode_running = True

    def stop(self) -> None:
        if self._proc.poll() is None:
            try:
                self._command("quit", timeout=60)
            except HdfsError:
                pass
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=30)
        self._log.close()

    def _command(self, command: str, timeout: float = 120) -> None:
        with self._lock:
            if self._proc.poll() is not None:
                self._fail(f"the test HDFS exited (code {self._proc.returncode}) before {command!r}")
            self._proc.stdin.write(command + "\n")
            self._proc.stdin.flush()
            answer = self._next_line(timeout, command)
            if answer != f"OK {command}":
                raise HdfsError(f"test HDFS: {answer}")

    def _pump(self) -> None:
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _next_line(self, timeout: float, doing: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self._fail(f"the test HDFS did not answer {doing!r} within {timeout:.0f} s")
            if line is None:
                self._proc.wait(timeout=30)
                self._fail(f"the test HDFS exited (code {self._proc.returncode}) during {doing!r}")
            if line.startswith(("HDFS_URI ", "OK ", "ERROR ")):
                return line

    def _fail(self, message: str) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=30)
        self._log.flush()
        errors = [line for line in self.log_path.read_text(errors="replace").splitlines()
                  if line.startswith(("Exception", "Caused by", "error:")) or " ERROR " in line or "Error:" in line]
        why = f": {errors[-1].strip()[:300]}" if errors else ""
        raise HdfsError(f"{message}{why} (log: {self.log_path})")


@pytest.fixture(scope="session")
def hdfs(tmp_path_factory):
    """A real HDFS (NameNode + DataNode on 127.0.0.1) for the whole test run: an HdfsCluster,
    whose `uri` is hdfs://127.0.0.1:PORT. One line when Java, Maven or the jars are missing."""
    try:
        cluster = HdfsCluster(tmp_path_factory.mktemp("hdfs"))
    except HdfsError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
