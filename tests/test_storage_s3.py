"""Raw data and Delta tables on S3: a real S3-compatible server (moto) on 127.0.0.1 that checks
credentials (an IAM user with a real access key), reached through the standard AWS variables
and AWS_ENDPOINT_URL; `dlpipe prepare` reads s3:// and writes s3:// in a separate process, as a
scheduler would run it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import deltalake
import pytest
from pyarrow import fs

from dlpipe import lake
from pipelines.sources import list_files
from tests.conftest import mlflow_store, moto_server

REGION = "us-east-1"


@pytest.fixture(scope="module")
def s3_server():
    """moto with authentication on after the 3 IAM calls that create our user and its key:
    (endpoint, access key id, secret access key)."""
    import boto3

    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="3") as endpoint:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="bootstrap",
                           aws_secret_access_key="bootstrap")
        iam.create_user(UserName="dlpipe")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="dlpipe", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="dlpipe")["AccessKey"]
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="module")
def aws_env(s3_server):
    endpoint, key_id, secret = s3_server
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": REGION}


@pytest.fixture
def aws(monkeypatch, aws_env):
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in aws_env.items():
        monkeypatch.setenv(name, value)
    return aws_env


@pytest.fixture(scope="module")
def s3_landing(small_landing, aws_env):
    """5 real PNGs per class, one zero-byte PNG, and a hidden and a _-prefixed file that must be
    skipped, uploaded to s3://landing-zone/fashion: (config, landing URI)."""
    cfg, _ = small_landing
    e = aws_env
    s3 = fs.S3FileSystem(endpoint_override=e["AWS_ENDPOINT_URL"], access_key=e["AWS_ACCESS_KEY_ID"],
                         secret_key=e["AWS_SECRET_ACCESS_KEY"], region=REGION, allow_bucket_creation=True)
    s3.create_dir("landing-zone")
    s3.create_dir("lake-bucket")
    local = Path(cfg.paths.landing)
    for folder in cfg.data.classes:
        for png in sorted((local / folder).glob("*.png"))[:5]:
            with s3.open_output_stream(f"landing-zone/fashion/{folder}/{png.name}") as out:
                out.write(png.read_bytes())
    for name in (f"{cfg.data.classes[0]}/empty.png", f"{cfg.data.classes[0]}/.partial.png", "_SUCCESS"):
        with s3.open_output_stream(f"landing-zone/fashion/{name}"):
            pass
    return cfg, "s3://landing-zone/fashion"


def test_listing_skips_hidden_files_and_keeps_zero_byte_ones(aws, s3_landing):
    cfg, uri = s3_landing
    for given in (uri, uri.replace("s3://", "s3a://") + "/"):
        files = dict(list_files(given))
        scheme = given.split("://")[0]
        assert len(files) == 51 and all(p.startswith(f"{scheme}://landing-zone/fashion/") for p in files)
        assert files[f"{scheme}://landing-zone/fashion/{cfg.data.classes[0]}/empty.png"] == 0
        assert not [p for p in files if "/." in p or "/_" in p]


@pytest.mark.slow
def test_prepare_reads_s3_and_writes_delta_tables_to_s3(aws, s3_landing, tmp_path):
    """The whole step in its own process (its executors get the credentials the way a cluster's
    do: from their environment), reading the landing zone as s3a:// with hadoop-aws and writing
    the lake on s3:// with delta-spark; every table read back with delta-rs; then retrain (train with
    its shards and checkpoints on S3, evaluate, register, promote) and score; the secret is nowhere."""
    cfg, uri = s3_landing
    uri = uri.replace("s3://", "s3a://")
    lake_uri = "s3://lake-bucket/lake"
    summary_path = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "dlpipe.cli", "prepare", "--summary", str(summary_path),
           "--set", f"paths.landing={uri}", "--set", f"paths.lake={lake_uri}", "--set", "spark.master=local[2]",
           "--set", f"data.classes={json.dumps(cfg.data.classes)}", "--set", "data.max_rejected_fraction=0.05"]
    env = {**os.environ, **aws, "PYTHONPATH": os.getcwd()}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert (summary["input_files"], summary["accepted"], summary["rejected"]) == (51, 50, 1)
    options = {"AWS_ENDPOINT_URL": aws["AWS_ENDPOINT_URL"], "AWS_ALLOW_HTTP": "true", "AWS_REGION": REGION,
               "AWS_ACCESS_KEY_ID": aws["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": aws["AWS_SECRET_ACCESS_KEY"]}
    for name, table in summary["tables"].items():
        assert table["uri"] == f"{lake_uri}/fashion_mnist_{name}"
        arrow = deltalake.DeltaTable(table["uri"], version=table["version"], storage_options=options).to_pyarrow_table()
        assert arrow.num_rows == table["rows"], name
        if name == "rejected":
            assert arrow.column("reason").to_pylist() == ["empty file"]
            assert arrow.column("source").to_pylist() == [f"{uri}/{cfg.data.classes[0]}/empty.png"]
        elif name in ("train", "val", "test"):
            assert {len(p) for p in arrow.column("pixels").to_pylist()} <= {28 * 28}
    assert sum(summary["tables"][s]["rows"] for s in ("train", "val", "test")) == 50
    assert summary["tables"]["sources"]["rows"] == 51  # every file taken in, the rejected one too
    # the secret reached no log line, no summary and no object in the lake (Delta log, metadata, data)
    s3 = fs.S3FileSystem(endpoint_override=aws["AWS_ENDPOINT_URL"], access_key=aws["AWS_ACCESS_KEY_ID"],
                         secret_key=aws["AWS_SECRET_ACCESS_KEY"], region=REGION)
    objects = [i.path for i in s3.get_file_info(fs.FileSelector("lake-bucket", recursive=True)) if i.type == fs.FileType.File]
    assert any("/_delta_log/" in o for o in objects)
    secret = aws["AWS_SECRET_ACCESS_KEY"]
    for path in objects:
        with s3.open_input_stream(path) as f:
            assert secret.encode() not in f.read(), path
    assert secret not in done.stdout + done.stderr + summary_path.read_text()
    assert lake.history(f"{lake_uri}/fashion_mnist_train")[0]["metadata"]["dlpipe.source"] == uri
    assert {h["engine"] for t in summary["tables"].values() for h in lake.history(t["uri"])} == {"spark"}

    # retrain: train 1 epoch reading its shards from S3 (checkpoints on S3), evaluate, register and
    # promote in one process; then score the champion into the S3 lake
    common = ["--set", f"paths.lake={lake_uri}", "--set", "spark.master=local[2]",
              "--set", f"data.classes={json.dumps(cfg.data.classes)}",
              "--set", f"mlflow.tracking_uri={mlflow_store(tmp_path)}", "--set", f"mlflow.artifact_root={tmp_path}/art",
              "--set", "registry.model_name=s3_cnn", "--set", "registry.min_accuracy=0.0"]
    steps = {
        "retrain": ["--set", "train.backend=local", "--set", "train.epochs=1", "--set", "train.batch_size=16",
                  "--set", "model.cnn.blocks=[{channels: 4}]", "--set", "model.cnn.hidden=[16]",
                  "--set", "train.checkpoint_uri=s3://lake-bucket/checkpoints"],
        "score": []}
    results = {}
    for step, extra in steps.items():
        out = tmp_path / f"{step}.json"
        done = subprocess.run([sys.executable, "-m", "dlpipe.cli", step, "--summary", str(out), *common, *extra],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (step, done.stderr[-3000:])
        assert secret not in done.stdout + done.stderr
        results[step] = json.loads(out.read_text())
    assert results["retrain"]["action"] == "promoted" and results["retrain"]["champion_after"] == 1
    checkpoints = s3.get_file_info(fs.FileSelector("lake-bucket/checkpoints", recursive=True))
    assert any(i.type == fs.FileType.File for i in checkpoints)
    predictions = f"{lake_uri}/fashion_mnist_predictions"
    scored = deltalake.DeltaTable(predictions, storage_options=options).to_pyarrow_table()
    assert scored.num_rows == summary["tables"]["test"]["rows"] > 0
    assert set(scored.column("model_name").to_pylist()) == {"s3_cnn"}
    assert lake.history(predictions)[0]["engine"] == "spark"


def _prepare(aws, cfg, landing, lake_uri, **env):
    """`dlpipe prepare` in its own process, as a scheduler runs it (the JVM reads the AWS variables
    of its own environment, as every executor of a cluster does)."""
    cmd = [sys.executable, "-m", "dlpipe.cli", "prepare", "--set", f"paths.landing={landing}",
           "--set", f"paths.lake={lake_uri}", "--set", "spark.master=local[1]",
           "--set", f"data.classes={json.dumps(cfg.data.classes)}", "--set", "data.max_rejected_fraction=0.05"]
    return subprocess.run(cmd, env={**os.environ, **aws, **env, "PYTHONPATH": os.getcwd()}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_wrong_credentials_are_a_clear_error_naming_the_uri(aws, s3_landing, monkeypatch, tmp_path):
    cfg, uri = s3_landing
    landing = uri.replace("s3://", "s3a://")
    done = _prepare(aws, cfg, landing, str(tmp_path / "lake"), AWS_SECRET_ACCESS_KEY="not-the-secret")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"dlpipe: error: cannot access " + re.escape(landing) + r".*access denied.*AWS_SECRET_ACCESS_KEY.*",
                        last), done.stderr[-3000:]
    assert "not-the-secret" not in done.stderr + done.stdout
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")  # delta-rs, in this process
    with pytest.raises(PermissionError, match=re.escape("s3://lake-bucket/lake/t") + ".*access denied"):
        lake.latest_version("s3://lake-bucket/lake/t")


@pytest.mark.slow
def test_missing_bucket_is_a_clear_error_naming_the_uri(aws, s3_landing, tmp_path):
    cfg, uri = s3_landing
    done = _prepare(aws, cfg, "s3a://no-such-bucket/raw", str(tmp_path / "lake"))
    assert done.returncode == 4  # missing input (docs/configuration.md, exit codes)
    assert done.stderr.strip().splitlines()[-1] == (
        f"dlpipe: error: cannot access s3a://no-such-bucket/raw: bucket 'no-such-bucket' does not exist "
        f"(endpoint {aws['AWS_ENDPOINT_URL']})"), done.stderr[-3000:]
    done = _prepare(aws, cfg, uri, "s3a://no-such-bucket/lake")
    assert done.returncode == 4
    assert re.fullmatch(r"dlpipe: error: cannot access s3a://no-such-bucket/lake/\S+: bucket 'no-such-bucket' does "
                        r"not exist.*", done.stderr.strip().splitlines()[-1]), done.stderr[-3000:]


WRITER = """
# writer.py TABLE START [LOGSTORE_TABLE]: 3 appends of START..START+4 to TABLE, after the LogStore check
import json, sys
from dlpipe import lake
from dlpipe.config import load_config
from dlpipe.spark import get_session

cfg = load_config()
spark = get_session("local[1]", "writer", {"spark.ui.enabled": "false"}, jars_dir=cfg.spark.jars_dir, engine="spark")
jvm, conf = spark._jvm, spark._jsc.hadoopConfiguration()
if len(sys.argv) > 3:  # the LogStore alone: the second create of the same version is refused
    store = jvm.dlpipe.delta.S3ConditionalPutLogStore(conf)
    path = jvm.org.apache.hadoop.fs.Path(sys.argv[3] + "/_delta_log/00000000000000000000.json")
    store.write(path, jvm.java.util.ArrayList(["{}"]).iterator(), False, conf)
    try:
        store.write(path, jvm.java.util.ArrayList(["{}"]).iterator(), False, conf)
        print("second write accepted")
    except Exception as exc:
        print("refused:", exc.java_exception.getClass().getName(), exc.java_exception.getMessage())
versions = [lake.write_table(spark.range(int(sys.argv[2]), int(sys.argv[2]) + 5), sys.argv[1], mode="append")
            for _ in range(3)]
print(json.dumps(versions))
"""


@pytest.mark.slow
def test_concurrent_native_writers_on_s3_lose_no_commit(aws, s3_landing, tmp_path):
    """Two drivers append to one S3 table at the same moment, 3 commits each: with S3's conditional
    put (dlpipe's LogStore) every commit lands as its own version; no version file is overwritten."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, **aws, "PYTHONPATH": os.getcwd()}
    uri = "s3a://lake-bucket/concurrent"
    # v0..v2: the table exists before the race; and first, the LogStore alone refuses a second create
    setup = subprocess.run([sys.executable, str(script), uri, "0", "s3a://lake-bucket/logstore"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert setup.returncode == 0, setup.stderr[-3000:]
    assert "refused: " in setup.stdout and "FileAlreadyExistsException" in setup.stdout, setup.stdout
    assert json.loads(setup.stdout.strip().splitlines()[-1]) == [0, 1, 2]
    writers = [subprocess.Popen([sys.executable, str(script), uri, str(start)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for start in (100, 200)]
    outputs = [w.communicate(timeout=600) for w in writers]
    assert [w.returncode for w in writers] == [0, 0], [err[-3000:] for _, err in outputs]
    versions = sorted(v for out, _ in outputs for v in json.loads(out.strip().splitlines()[-1]))
    assert versions == list(range(3, 9))  # six distinct versions, none taken twice
    table = deltalake.DeltaTable(uri.replace("s3a://", "s3://"), storage_options=lake.storage.delta_options(uri))
    assert table.version() == 8
    ids = sorted(table.to_pyarrow_table().column("id").to_pylist())
    assert ids == sorted([*range(5)] * 3 + [*range(100, 105)] * 3 + [*range(200, 205)] * 3)
