"""Shared fixtures: a moto S3 server on loopback (one per test session)."""
import os
import socket
import uuid

import pytest

# A distinctive secret: tests grep logs and outputs for it to prove it never leaks.
PLANTED_SECRET = "planted-SECRET-7f3a9c"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a ThreadedMotoServer on 127.0.0.1, as s3fs's own tests run it."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_storage_options(s3_endpoint):
    """fsspec storage_options for the moto server."""
    return {
        "key": "testing-key",
        "secret": PLANTED_SECRET,
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }


@pytest.fixture
def s3_bucket(s3_endpoint, s3_storage_options):
    """A fresh, empty bucket name; s3fs instance caches are cleared around it."""
    import boto3
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing-key",
        aws_secret_access_key=PLANTED_SECRET,
    )
    client.create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield name
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def ray_cluster():
    """One small local Ray cluster per test module (CPU workers only)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The `tiny` random-weight checkpoint, written once per test session."""
    from cogview_ray.model.checkpoint import make_checkpoint

    return str(make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request, tmp_path):
    """A RunStore for run `run1`, once on a local folder and once on moto S3."""
    from cogview_ray.storage import RunStore

    if request.param == "local":
        return RunStore(str(tmp_path / "out"), "run1")
    bucket = request.getfixturevalue("s3_bucket")
    return RunStore(f"s3://{bucket}/out", "run1", request.getfixturevalue("s3_storage_options"))
