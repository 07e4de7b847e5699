"""deploy/: what can be checked without a cluster. Manifests parse and their commands are valid
dlpipe commands (parsed by dlpipe's own argparse and config loader); the wrapper scripts pass
`bash -n` and build the documented spark-submit line (a stand-in `spark-submit` on PATH records
it: there is no YARN or Kubernetes here); the Dockerfiles agree with the Makefile; and, slow,
the Airflow DAG imports under a real Airflow 3 in its own virtualenv."""

import ast
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from dlpipe.cli import STEPS, parse_args, upstream_overrides
from dlpipe.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def check_dlpipe_command(args: list[str], image_root: str = "") -> str:
    """Parse like `dlpipe` would; load the config it names. Returns the step."""
    if image_root:
        args = [a.replace(image_root, str(ROOT)) for a in args]
    ns = parse_args(args)
    assert ns.step in STEPS
    conf = ns.conf and (ns.conf if Path(ns.conf).is_absolute() else str(ROOT / ns.conf))
    upstream = upstream_overrides(ns.step, ns.upstream) if ns.upstream else []
    load_config(conf, [*upstream, *ns.overrides])  # raises ConfigError naming a bad key or value
    return ns.step


@pytest.mark.parametrize("script", sorted(p.name for p in DEPLOY.glob("*.sh")))
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(DEPLOY / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cronjob_runs_retrain_then_score_with_valid_commands():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "dlpipe-nightly-cronjob.yaml").read_text()))
    cron = next(d for d in docs if d["kind"] == "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] in {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    steps = []
    for container in pod["initContainers"] + pod["containers"]:
        assert container["command"] == ["deploy/submit-k8s.sh"] and (ROOT / container["command"][0]).is_file()
        steps.append(check_dlpipe_command(container["args"]))
    assert steps == ["retrain", "score"]  # init containers finish (successfully) before containers start


def test_airflow_dag_commands_are_valid_dlpipe_commands():
    tree = ast.parse((DEPLOY / "airflow" / "dlpipe_nightly.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "COMMANDS")
    commands = ast.literal_eval(node.value)
    # what retrain's last stdout line (its --summary-line), pushed to XCom, looks like
    retrain_line = json.dumps({"step": "retrain", "action": "promoted", "champion_after": 7,
                               "model_uri": "models:/fashion_cnn/7",
                               "tables": {s: {"uri": f"/lake/fashion_mnist_{s}", "version": 3} for s in ("train", "val", "test")}})
    for task, args in commands.items():
        rendered = [a.replace("{conf}", "conf/fashion_cnn.yaml").replace("{{ ds }}", "2026-01-02")
                    .replace('{{ ti.xcom_pull(task_ids="retrain") }}', retrain_line) for a in args]
        assert check_dlpipe_command(rendered) == task
        if task == "score":  # the model retrain left as champion, by version
            assert upstream_overrides("score", retrain_line) == ["score.model_uri=models:/fashion_cnn/7"]
    assert "--summary-line" in commands["retrain"]


@pytest.fixture()
def fake_spark_submit(tmp_path):
    """A `spark-submit` that records its arguments, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "args.txt"
    (bin_dir / "spark-submit").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / "spark-submit").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, record


def test_submit_yarn_ships_the_packed_env(fake_spark_submit, tmp_path):
    env, record = fake_spark_submit
    archive = tmp_path / "env.tar.gz"
    archive.write_bytes(b"")
    env = {**env, "DLPIPE_ENV_ARCHIVE": str(archive)}
    conf = ROOT / "conf" / "fashion_cnn.yaml"
    proc = subprocess.run([str(DEPLOY / "submit-yarn.sh"), "retrain", "--conf", str(conf), "--set", "train.epochs=2"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    args = record.read_text().splitlines()
    assert args[args.index("--master") + 1] == "yarn" and args[args.index("--deploy-mode") + 1] == "cluster"
    assert args[args.index("--archives") + 1] == f"{archive}#environment"
    assert "spark.pyspark.python=./environment/bin/python" in args
    assert args[args.index("--files") + 1] == str(conf)
    shipped = args[args.index("--jars") + 1].split(",")  # what make setup fetched: delta-spark, hadoop-aws
    assert any("/delta-spark_4.2_2.13-" in j for j in shipped) and any("/hadoop-aws-" in j for j in shipped)
    job = args.index(str(ROOT / "jobs" / "retrain.py"))
    assert args[job + 1 :] == ["--conf", "fashion_cnn.yaml", "--set", "train.epochs=2"]  # read from the driver's cwd
    assert check_dlpipe_command(["retrain", "--conf", str(conf), "--set", "train.epochs=2"]) == "retrain"

    bad = subprocess.run([str(DEPLOY / "submit-yarn.sh"), "bogus"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_submit_k8s_uses_the_image(fake_spark_submit):
    env, record = fake_spark_submit
    env = {**env, "DLPIPE_IMAGE": "registry.example.com/dlpipe:cpu"}
    proc = subprocess.run([str(DEPLOY / "submit-k8s.sh"), "score", "--conf", "conf/fashion_cnn.yaml"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    args = record.read_text().splitlines()
    assert args[args.index("--master") + 1] == "k8s://https://kubernetes.default.svc"
    assert "spark.kubernetes.container.image=registry.example.com/dlpipe:cpu" in args
    assert "spark.pyspark.python=/opt/venv/bin/python" in args
    assert {"spark.driver.extraClassPath=/opt/dlpipe/.work/jars/*",
            "spark.executor.extraClassPath=/opt/dlpipe/.work/jars/*"} <= set(args)  # the image's jars (Dockerfile)
    job = args.index("local:///opt/dlpipe/jobs/score.py")
    assert check_dlpipe_command(["score", *args[job + 1 :]], image_root="/opt/dlpipe") == "score"
    missing = subprocess.run([str(DEPLOY / "submit-k8s.sh"), "score"], env={**env, "DLPIPE_IMAGE": ""},
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "DLPIPE_IMAGE" in missing.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_match_the_makefile_installs(dockerfile):
    text = (DEPLOY / dockerfile).read_text()
    makefile = (ROOT / "Makefile").read_text()
    wanted = re.search(r"torch==([\w.]+)", makefile).group(1)
    assert re.findall(r"torch==([\w.]+)", text) == [wanted]
    assert "delta-spark==" not in text  # a dependency of dlpipe (pyproject.toml), not a second pin
    assert "-f deploy/jars/pom.xml package dependency:copy-dependencies" in text  # the JVM jars, as make setup
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in shlex.split(line)[1:-1]:
                assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} does not exist"
    assert "openjdk-17" in text and "python3.11" in text.replace("python:3.11", "python3.11")
    if dockerfile.endswith(".gpu"):
        assert "HOROVOD_GPU_OPERATIONS=NCCL" in text and "hvd.nccl_built()" in text and "/whl/cu" in text


AIRFLOW_VENV = Path(os.environ.get("DLPIPE_AIRFLOW_VENV", ROOT / ".airflow-venv"))

IMPORT_DAG = """
import sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
dag = bag.dags["dlpipe_nightly"]  # parsed, no metadata DB needed
print(sorted(dag.task_dict), sorted(dag.get_task("score").upstream_task_ids), dag.get_task("retrain").bash_command)
"""


@pytest.mark.slow
def test_airflow_dag_imports_under_airflow(tmp_path):
    """Builds .airflow-venv with `make airflow-venv` when it is not there yet (never skipped)."""
    if not (AIRFLOW_VENV / "bin" / "python").exists():
        subprocess.run(["make", "airflow-venv", f"AIRFLOW_VENV={AIRFLOW_VENV}"], cwd=ROOT, check=True, timeout=1500)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "AIRFLOW_HOME": str(tmp_path), "DLPIPE_HOME": "/opt/dlpipe", "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    proc = subprocess.run([str(AIRFLOW_VENV / "bin" / "python"), "-c", IMPORT_DAG, str(DEPLOY / "airflow")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip().splitlines()[-1]
    assert out.startswith("['retrain', 'score'] ['retrain'] /opt/dlpipe/deploy/submit-yarn.sh retrain --conf")
