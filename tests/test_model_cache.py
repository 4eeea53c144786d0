"""The node-local model cache against a moto S3 server: one download per node however many
workers ask, verification, and recovery from killed downloads and damaged entries."""
import hashlib
import logging
import multiprocessing as mp
import os
import signal
from pathlib import Path

import fsspec
import pytest

from cogview_ray import model_cache
from cogview_ray.model_cache import (
    MARKER_NAME,
    ModelCacheError,
    ModelNotFoundError,
    cache_entry_name,
    ensure_local_model,
)
from tests.conftest import PLANTED_SECRET

pytestmark = pytest.mark.timeout(120)

# A checkpoint in the official layout, small enough to upload per test. Weights are random
# bytes: the cache never parses them, it only moves and verifies them.
FAKE_CHECKPOINT = {
    "model_index.json": b'{"_class_name": "CogView3PlusPipeline"}',
    "scheduler/scheduler_config.json": b'{"num_train_timesteps": 1000}',
    "transformer/config.json": b'{"num_layers": 2}',
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors": os.urandom(150_000),
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors": os.urandom(90_000),
    "transformer/diffusion_pytorch_model.safetensors.index.json": (
        b'{"metadata": {"total_size": 240000}, "weight_map": {'
        b'"a.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",'
        b'"b.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}'
    ),
    "vae/config.json": b'{"latent_channels": 16}',
    "vae/diffusion_pytorch_model.safetensors": os.urandom(40_000),
    "text_encoder/config.json": b'{"d_model": 32}',
    "text_encoder/model.safetensors": os.urandom(30_000),
    "tokenizer/spiece.model": os.urandom(5_000),
    "tokenizer/tokenizer_config.json": b'{"tokenizer_class": "T5Tokenizer"}',
    "tokenizer/special_tokens_map.json": b'{"eos_token": "</s>"}',
}
SKIPPED = {
    "vae/diffusion_pytorch_model.bin": b"pickle weights must never be fetched",
    ".gitattributes": b"*.safetensors filter=lfs",
    ".cache/huggingface/download/model_index.json.metadata": b"hub bookkeeping",
}


def _sha256sums(files):
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {rel}\n" for rel, data in sorted(files.items()))


@pytest.fixture
def remote_model(s3_bucket, s3_storage_options):
    """URL of the fake checkpoint in a fresh bucket, with a SHA256SUMS covering every file."""
    fs = fsspec.filesystem("s3", **s3_storage_options)
    base = f"{s3_bucket}/models/CogView3-Plus-3B"
    for rel, data in {**FAKE_CHECKPOINT, **SKIPPED}.items():
        fs.pipe_file(f"{base}/{rel}", data)
    fs.pipe_file(f"{base}/SHA256SUMS", _sha256sums({**FAKE_CHECKPOINT, **SKIPPED}).encode())
    return f"s3://{base}"


def _wanted_files(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER_NAME
    }


def _expected_files() -> dict:
    return {**FAKE_CHECKPOINT, "SHA256SUMS": _sha256sums({**FAKE_CHECKPOINT, **SKIPPED}).encode()}


def _counting_download(count_file):
    """Wrap the real download so each one appends a line to `count_file` (O_APPEND: atomic)."""
    real = model_cache._download

    def wrapped(*args, **kwargs):
        fd = os.open(count_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        return real(*args, **kwargs)

    return wrapped


def _downloads(count_file) -> int:
    return len(Path(count_file).read_text().splitlines()) if Path(count_file).exists() else 0


# --- child processes (spawned: module-level functions) -----------------------------------

def _worker(url, storage_options, cache_dir, count_file, barrier, queue):
    """One Ray worker's view: ask for the model at the same moment as the others."""
    model_cache._download = _counting_download(count_file)
    barrier.wait(timeout=60)
    try:
        path = ensure_local_model(url, storage_options, cache_dir)
        queue.put(("ok", path, os.getpid()))
    except BaseException as err:  # report instead of dying silently
        queue.put(("error", repr(err), os.getpid()))


def _killed_mid_download(url, storage_options, cache_dir):
    """Download, leave one file half-written, then die by SIGKILL (no cleanup code runs)."""

    def cut_then_die(folder, sizes, *args, **kwargs):
        victim = Path(folder) / "transformer/diffusion_pytorch_model-00001-of-00002.safetensors"
        victim.write_bytes(victim.read_bytes()[:1000])
        os.kill(os.getpid(), signal.SIGKILL)

    model_cache._verify = cut_then_die
    ensure_local_model(url, storage_options, cache_dir)


# --- tests ----------------------------------------------------------------------------------

@pytest.mark.s3
def test_concurrent_workers_download_once(remote_model, s3_storage_options, tmp_path):
    ctx = mp.get_context("spawn")
    count_file = str(tmp_path / "downloads.log")
    cache_dir = str(tmp_path / "cache")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(remote_model, s3_storage_options, cache_dir, count_file, barrier, queue))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    assert [r[0] for r in results] == ["ok"] * 3, results
    paths = {r[1] for r in results}
    assert len(paths) == 1, paths
    assert len({r[2] for r in results}) == 3  # three distinct processes asked
    assert _downloads(count_file) == 1

    folder = Path(paths.pop())
    assert folder.parent == Path(cache_dir)
    assert folder.name == cache_entry_name(remote_model, s3_storage_options)
    assert folder.name.startswith("CogView3-Plus-3B-")
    assert _wanted_files(folder) == _expected_files()
    assert not (folder / "vae/diffusion_pytorch_model.bin").exists()
    assert not (folder / ".gitattributes").exists() and not (folder / ".cache").exists()
    assert (folder / MARKER_NAME).is_file()
    # nothing but the entry and its lock file is left in the cache dir
    assert sorted(p.name for p in Path(cache_dir).iterdir()) == sorted([folder.name, f".{folder.name}.lock"])


@pytest.mark.s3
def test_cached_entry_is_reused_without_the_remote(remote_model, s3_storage_options, tmp_path, monkeypatch):
    monkeypatch.setenv("COGVIEW_RAY_CACHE", str(tmp_path / "envcache"))
    count_file = tmp_path / "downloads.log"
    monkeypatch.setattr(model_cache, "_download", _counting_download(count_file))
    first = ensure_local_model(remote_model, s3_storage_options)
    assert Path(first).parent == tmp_path / "envcache" / "models"

    fsspec.filesystem("s3", **s3_storage_options).rm(remote_model.removeprefix("s3://"), recursive=True)
    assert ensure_local_model(remote_model + "/", s3_storage_options) == first
    assert _downloads(count_file) == 1
    assert _wanted_files(Path(first)) == _expected_files()


@pytest.mark.s3
def test_killed_download_is_detected_and_redone(remote_model, s3_storage_options, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    victim = ctx.Process(target=_killed_mid_download, args=(remote_model, s3_storage_options, str(cache_dir)))
    victim.start()
    victim.join(timeout=60)
    assert victim.exitcode == -signal.SIGKILL
    name = cache_entry_name(remote_model, s3_storage_options)
    leftovers = [p for p in cache_dir.iterdir() if p.name.startswith(f".{name}.tmp-")]
    assert len(leftovers) == 1
    assert (leftovers[0] / "transformer/diffusion_pytorch_model-00001-of-00002.safetensors").stat().st_size == 1000
    assert not (cache_dir / name).exists()

    count_file = tmp_path / "downloads.log"
    monkeypatch.setattr(model_cache, "_download", _counting_download(count_file))
    folder = Path(ensure_local_model(remote_model, s3_storage_options, cache_dir))  # the lock died with its owner
    assert _downloads(count_file) == 1
    assert _wanted_files(folder) == _expected_files()
    assert not any(p.name.startswith(f".{name}.tmp-") for p in cache_dir.iterdir())


@pytest.mark.s3
def test_entry_without_marker_is_redone(remote_model, s3_storage_options, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    entry = cache_dir / cache_entry_name(remote_model, s3_storage_options)
    (entry / "transformer").mkdir(parents=True)
    (entry / "model_index.json").write_bytes(FAKE_CHECKPOINT["model_index.json"])
    (entry / "transformer/diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"half")
    count_file = tmp_path / "downloads.log"
    monkeypatch.setattr(model_cache, "_download", _counting_download(count_file))

    assert ensure_local_model(remote_model, s3_storage_options, cache_dir) == str(entry)
    assert _downloads(count_file) == 1
    assert _wanted_files(entry) == _expected_files()
    assert not any(".trash-" in p.name for p in cache_dir.iterdir())


@pytest.mark.s3
@pytest.mark.parametrize("damage", ["truncate", "grow", "delete"])
def test_damaged_cached_file_is_redone(remote_model, s3_storage_options, tmp_path, monkeypatch, damage):
    cache_dir = tmp_path / "cache"
    count_file = tmp_path / "downloads.log"
    monkeypatch.setattr(model_cache, "_download", _counting_download(count_file))
    folder = Path(ensure_local_model(remote_model, s3_storage_options, cache_dir))
    victim = folder / "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-1])
    elif damage == "grow":
        victim.write_bytes(victim.read_bytes() + b"\0")
    else:
        victim.unlink()

    assert ensure_local_model(remote_model, s3_storage_options, cache_dir) == str(folder)
    assert _downloads(count_file) == 2
    assert _wanted_files(folder) == _expected_files()


@pytest.mark.s3
def test_sha256_mismatch_is_refused(remote_model, s3_storage_options, tmp_path):
    fs = fsspec.filesystem("s3", **s3_storage_options)
    base = remote_model.removeprefix("s3://")
    fs.pipe_file(f"{base}/vae/diffusion_pytorch_model.safetensors", os.urandom(40_000))  # same size, new bytes
    cache_dir = tmp_path / "cache"
    with pytest.raises(ModelCacheError, match=r"vae/diffusion_pytorch_model\.safetensors has sha256"):
        ensure_local_model(remote_model, s3_storage_options, cache_dir)
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")) == []


@pytest.mark.s3
def test_index_naming_a_missing_shard_is_refused(remote_model, s3_storage_options, tmp_path):
    fs = fsspec.filesystem("s3", **s3_storage_options)
    base = remote_model.removeprefix("s3://")
    fs.rm(f"{base}/transformer/diffusion_pytorch_model-00002-of-00002.safetensors")
    fs.rm(f"{base}/SHA256SUMS")
    with pytest.raises(ModelCacheError, match="00002-of-00002.safetensors"):
        ensure_local_model(remote_model, s3_storage_options, tmp_path / "cache")


@pytest.mark.s3
def test_missing_remote_url_gives_a_clear_error_without_the_secret(
    s3_bucket, s3_storage_options, tmp_path, caplog
):
    caplog.set_level(logging.DEBUG, logger="cogview_ray")
    for url in (f"s3://{s3_bucket}/models/nothing-here", "s3://no-such-bucket-cogview/models/x"):
        with pytest.raises(ModelNotFoundError) as info:
            ensure_local_model(url, s3_storage_options, tmp_path / "cache")
        message = str(info.value)
        assert url in message
        assert PLANTED_SECRET not in message and PLANTED_SECRET not in repr(info.value)
        assert info.value.__cause__ is None
        assert info.value.__context__ is None or info.value.__suppress_context__  # no chained boto error
    assert PLANTED_SECRET not in caplog.text


@pytest.mark.s3
def test_pickle_only_checkpoint_is_refused(s3_bucket, s3_storage_options, tmp_path):
    fs = fsspec.filesystem("s3", **s3_storage_options)
    fs.pipe_file(f"{s3_bucket}/old/model_index.json", b"{}")
    fs.pipe_file(f"{s3_bucket}/old/unet/diffusion_pytorch_model.bin", b"pickle")
    with pytest.raises(ModelCacheError, match="no .safetensors weights"):
        ensure_local_model(f"s3://{s3_bucket}/old", s3_storage_options, tmp_path / "cache")


def test_secrets_are_scrubbed_from_backend_errors():
    options = {"key": "AKIAEXAMPLE", "secret": PLANTED_SECRET, "client_kwargs": {"region_name": "us-east-1"}}
    secrets = set(model_cache.secret_values(options)) | model_cache._url_secrets("s3://u:pw-1234@b/x?sig=abcdef")
    text = model_cache._describe(PermissionError(f"denied for {PLANTED_SECRET} and pw-1234"), secrets)
    assert PLANTED_SECRET not in text and "pw-1234" not in text and "denied" in text
    assert "us-east-1" not in secrets
    assert model_cache.redact_url("https://user:pw@host/m?X-Amz-Signature=abc") == "https://host/m"


def test_local_path_is_returned_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("COGVIEW_RAY_CACHE", str(tmp_path / "never-created"))
    assert ensure_local_model(str(tmp_path)) == str(tmp_path)
    assert ensure_local_model("checkpoints/tiny") == "checkpoints/tiny"
    assert ensure_local_model(tmp_path) == str(tmp_path)
    assert ensure_local_model(f"file://{tmp_path}") == str(tmp_path)
    assert not (tmp_path / "never-created").exists()


def test_cache_entry_name_is_readable_and_distinct():
    a = cache_entry_name("s3://bucket/models/CogView3-Plus-3B")
    assert a == cache_entry_name("s3://bucket/models/CogView3-Plus-3B/")
    assert a.startswith("CogView3-Plus-3B-") and len(a) == len("CogView3-Plus-3B-") + 16
    assert a != cache_entry_name("s3://other/models/CogView3-Plus-3B")
    assert a != cache_entry_name(
        "s3://bucket/models/CogView3-Plus-3B", {"client_kwargs": {"endpoint_url": "http://minio:9000"}}
    )
    assert "/" not in cache_entry_name("gs://b/weird name?/") and cache_entry_name("s3://b").startswith("b-")


@pytest.mark.parametrize(
    "rel, wanted",
    [
        ("transformer/diffusion_pytorch_model.safetensors", True),
        ("transformer/diffusion_pytorch_model.safetensors.index.json", True),
        ("tokenizer/spiece.model", True),
        ("tokenizer/merges.txt", True),
        ("SHA256SUMS", True),
        ("checksums.sha256", True),
        ("vae/diffusion_pytorch_model.bin", False),
        ("model.ckpt", False),
        ("weights.pt", False),
        (".gitattributes", False),
        (".cache/huggingface/x.json", False),
        ("README.md", False),
    ],
)
def test_only_safe_file_kinds_are_fetched(rel, wanted):
    assert model_cache.is_wanted(rel) is wanted


def _escape_keys(base_key: str, outside: Path) -> list[str]:
    """Remote keys that would name files outside the cache entry if taken as local paths.
    `outside` is absolute, so `{base_key}/{outside}/…` holds an empty segment and its tail is
    an absolute path into this test's own folder (observable, and harmless)."""
    return [
        f"{base_key}/{outside}/abs.safetensors",
        f"{base_key}//root-escape.json",
        f"{base_key}/../escape.json",
        f"{base_key}/a/../../escape2.safetensors",
        f"{base_key}/sub//deep.json",
        f"{base_key}/./dot.json",
        f"{base_key}/a\\..\\b.json",
    ]


def _files_under(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.s3
def test_hostile_remote_keys_never_write_outside_the_entry(
    remote_model, s3_endpoint, s3_bucket, tmp_path, s3_storage_options, caplog
):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing-key", aws_secret_access_key=PLANTED_SECRET)
    base_key = remote_model.removeprefix(f"s3://{s3_bucket}/")
    outside = tmp_path / "outside"
    for key in _escape_keys(base_key, outside):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"escaped")
    caplog.set_level(logging.WARNING, logger="cogview_ray")

    folder = Path(ensure_local_model(remote_model, s3_storage_options, tmp_path / "cache"))
    assert _wanted_files(folder) == _expected_files()  # the hostile keys were skipped
    entry = folder.relative_to(tmp_path).as_posix()
    assert _files_under(tmp_path) == {f"{entry}/{rel}" for rel in _files_under(folder)} | {
        f"cache/.{folder.name}.lock"}
    assert not outside.exists()
    assert caplog.text.count("not a plain relative path") == 7


@pytest.mark.s3
def test_second_line_of_defence_refuses_an_escaping_key(
    remote_model, s3_endpoint, s3_bucket, tmp_path, s3_storage_options, monkeypatch
):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing-key", aws_secret_access_key=PLANTED_SECRET)
    outside = tmp_path / "outside"
    client.put_object(Bucket=s3_bucket, Key=f"{remote_model.removeprefix(f's3://{s3_bucket}/')}/{outside}/abs.json",
                      Body=b"escaped")
    monkeypatch.setattr(model_cache, "_is_confined", lambda rel: True)  # as if the key check missed it
    with pytest.raises(ModelCacheError, match="outside the cache entry"):
        ensure_local_model(remote_model, s3_storage_options, tmp_path / "cache")
    assert not outside.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_a_preset_is_written_once_per_node_and_reused(tmp_path, monkeypatch):
    from cogview_ray.model_cache import resolve_model_path

    monkeypatch.setenv("COGVIEW_RAY_CACHE", str(tmp_path))
    first = resolve_model_path("preset:tiny")
    marker = tmp_path / "checkpoints" / "tiny-seed0" / ".complete"
    assert first == str(marker.parent) and marker.read_bytes() == b"ok\n"
    stamp = (marker.parent / "model_index.json").stat().st_mtime_ns
    assert resolve_model_path("preset:tiny") == first
    assert (marker.parent / "model_index.json").stat().st_mtime_ns == stamp  # not rewritten
    assert not (tmp_path / "checkpoints" / "tiny-seed0.partial").exists()
