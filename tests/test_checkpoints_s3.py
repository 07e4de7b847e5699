"""Checkpoints on S3: a real S3-compatible server (moto) on 127.0.0.1, reached through the
standard AWS variables and AWS_ENDPOINT_URL."""

import pytest
import torch

from dlpipe import checkpoints
from tests.conftest import moto_server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def aws(monkeypatch, s3):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    from pyarrow import fs

    s3fs = fs.S3FileSystem(endpoint_override=s3, access_key="testing", secret_key="testing", region="us-east-1",
                           allow_bucket_creation=True)
    s3fs.create_dir("ckpt-bucket")
    return s3fs


def test_checkpoints_round_trip_and_resume_lookup_on_s3(aws):
    root = "s3://ckpt-bucket/checkpoints"
    directory = checkpoints.run_dir(root, "nightly", "run-1")
    for epoch in (1, 2):
        uri = checkpoints.save(directory, {"epoch": epoch, "model": {"w": torch.full((3,), float(epoch))}})
    assert uri == "s3://ckpt-bucket/checkpoints/nightly/run-1/epoch-0002.pt"
    assert checkpoints.latest(directory) == uri
    state = checkpoints.load(uri)
    assert state["epoch"] == 2 and torch.equal(state["model"]["w"], torch.full((3,), 2.0))
    assert checkpoints.find_resumable(root, "nightly", finished=lambda run_id: False) == ("run-1", uri)
    assert checkpoints.find_resumable(root, "nightly", finished=lambda run_id: True) is None
    assert checkpoints.latest("s3://ckpt-bucket/checkpoints/nightly/no-such-run") is None


def test_missing_bucket_is_a_clear_error(aws):
    with pytest.raises(OSError, match="no-such-bucket"):
        checkpoints.save("s3://no-such-bucket/ckpt/run", {"epoch": 1})
