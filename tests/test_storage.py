"""RunStore: confinement to the run prefix, create-once, retries, no leaked secrets."""
import errno
import os
import pickle
import stat
import threading

import fsspec
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from cogview_ray.storage import RetryPolicy, RunStore, StorageError, check_relative, is_transient
from tests.conftest import PLANTED_SECRET

pytestmark = [pytest.mark.timeout(60)]

FAST = RetryPolicy(attempts=4, base_delay_s=0.001, max_delay_s=0.005)


class FlakyFS:
    """Wraps an fsspec filesystem: the next `fail[method]` calls of a method raise.

    `land=True` performs the call before raising (the request landed, the reply was lost).
    """

    def __init__(self, fs, error=lambda: TimeoutError("read timed out"), land=False):
        self._fs, self._error, self._land = fs, error, land
        self.fail: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        target = getattr(self._fs, name)
        if not callable(target):
            return target

        def call(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.fail.get(name, 0) > 0:
                self.fail[name] -= 1
                if self._land:
                    target(*args, **kwargs)
                raise self._error()
            return target(*args, **kwargs)

        return call


class CreateIgnoringFS(DirFileSystem):
    """A store double that, like some S3-compatible services, ignores create-only writes."""

    protocol = "ignores-create"

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        return super().pipe_file(path, value, **kwargs)  # `mode` dropped: a plain PUT

    def put_file(self, lpath, rpath, mode="overwrite", **kwargs):
        return super().put_file(lpath, rpath, **kwargs)


class LostReplyFS(DirFileSystem):
    """A store double whose first create-only write lands, then reports 'already exists'
    (s3fs retried a PUT whose reply was lost and got 412 for its own first write)."""

    protocol = "lost-reply"
    lost = 1

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        result = super().pipe_file(path, value, mode=mode, **kwargs)
        if mode == "create" and LostReplyFS.lost > 0:
            LostReplyFS.lost -= 1
            raise FileExistsError(path)
        return result


# Registered here, not in the product: only tests may name these doubles.
fsspec.register_implementation(CreateIgnoringFS.protocol, CreateIgnoringFS, clobber=True)
fsspec.register_implementation(LostReplyFS.protocol, LostReplyFS, clobber=True)


def double_store(cls, tmp_path, **kwargs):
    (tmp_path / "backing").mkdir(exist_ok=True)
    options = {"path": str(tmp_path / "backing"), "fs": LocalFileSystem(auto_mkdir=True)}
    return RunStore(f"{cls.protocol}://out", "run1", options, **kwargs)


def make_store(kind, request, tmp_path, **kwargs):
    if kind == "local":
        return RunStore(str(tmp_path / "out"), "run1", **kwargs)
    bucket = request.getfixturevalue("s3_bucket")
    options = request.getfixturevalue("s3_storage_options")
    return RunStore(f"s3://{bucket}/out", "run1", options, **kwargs)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request, tmp_path):
    return make_store(request.param, request, tmp_path, retry=FAST)


def test_write_read_list_delete(store):
    store.write("images/00000/a.png", b"one")
    store.write("images/00000/b.png", b"two")
    store.write("images/00000/a.png", b"ONE")  # overwrite
    assert store.read("images/00000/a.png") == b"ONE"
    assert store.exists("images/00000/b.png")
    assert not store.exists("images/00000/c.png")
    assert store.list("images/00000") == ["a.png", "b.png"]
    assert store.list("") == ["images"]  # the local temp folder is not listed
    assert store.list("nothing/here") == []
    store.delete("images/00000/a.png")
    store.delete("images/00000/a.png")  # missing is fine
    store.invalidate()
    assert store.list("images/00000") == ["b.png"]
    with pytest.raises(FileNotFoundError, match="a.png"):
        store.read("images/00000/a.png")


def test_create_once(store):
    assert store.create_once("commits/00001.json", b"first") is True
    assert store.create_once("commits/00001.json", b"second") is False
    assert store.read("commits/00001.json") == b"first"


def test_create_once_race_has_one_winner(store):
    n = 6
    barrier = threading.Barrier(n)
    results = [None] * n

    def race(i):
        barrier.wait()
        results[i] = store.create_once("_LOCK", f"owner-{i}".encode())

    threads = [threading.Thread(target=race, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    winner = results.index(True)
    assert store.read("_LOCK") == f"owner-{winner}".encode()


@pytest.mark.parametrize("rel", [
    "../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "./a", "a/", "", "..",
    "s3://other/x", "a\\..\\b", "a\x00b",
])
def test_escaping_paths_refused(rel, tmp_path):
    store = RunStore(str(tmp_path), "run1")
    for op in (lambda: store.write(rel, b"x"), lambda: store.create_once(rel, b"x"),
               lambda: store.read(rel), lambda: store.exists(rel), lambda: store.delete(rel)):
        with pytest.raises(ValueError, match="escape"):
            op()
    if rel:  # "" lists the run root itself
        with pytest.raises(ValueError):
            store.list(rel)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("run_id", ["..", "a/b", "", "."])
def test_bad_run_id_refused(run_id, tmp_path):
    with pytest.raises(ValueError):
        RunStore(str(tmp_path), run_id)


def test_check_relative_accepts_plain_paths():
    assert check_relative("images/00001/a-b_c.png") == "images/00001/a-b_c.png"
    assert check_relative("shards/0001.tar") == "shards/0001.tar"


@pytest.mark.parametrize("land", [False, True])
def test_transient_errors_are_retried(store, land):
    flaky = FlakyFS(store.fs, land=land)
    store.fs = flaky
    flaky.fail = {"pipe_file": 2, "cat_file": 2, "ls": 1}
    store.write("manifest/00000.parquet", b"data")
    flaky.fail = {"pipe_file": 2}
    # Even when the first conditional PUT landed, the call that made it reports True.
    assert store.create_once("commits/00000.json", b"marker") is True
    flaky.fail = {"cat_file": 3}
    assert store.read("manifest/00000.parquet") == b"data"
    flaky.fail = {"ls": 3}
    assert store.list("commits") == ["00000.json"]
    assert store.create_once("commits/00000.json", b"other") is False


@pytest.mark.parametrize("error", [
    lambda: OSError(errno.EBUSY, "SlowDown: please reduce your request rate"),
    lambda: ConnectionResetError("connection reset by peer"),
    lambda: OSError(errno.EIO, "Internal error (500)"),
])
def test_error_kinds_that_are_transient(error):
    assert is_transient(error())


@pytest.mark.parametrize("error", [
    FileNotFoundError, FileExistsError, PermissionError, lambda: OSError(errno.EINVAL, "bad"),
    lambda: ValueError("bug"),
])
def test_error_kinds_that_are_not_transient(error):
    assert not is_transient(error())


def test_persistent_failure_names_path_and_hides_secret(tmp_path):
    # A leaky error message (as some client libraries produce) must still be scrubbed.
    options = {"key": "testing-key", "secret": PLANTED_SECRET}
    store = RunStore(str(tmp_path), "run1", options, retry=FAST)
    assert PLANTED_SECRET not in repr(store)
    flaky = FlakyFS(store.fs, error=lambda: OSError(errno.EIO, f"denied for {options}"))
    store.fs = flaky
    flaky.fail = {"pipe_file": 100}
    with pytest.raises(StorageError) as info:
        store.write("images/00000/a.png", b"x")
    message = str(info.value)
    assert "images/00000/a.png" in message and "write" in message
    assert "after 4 attempts" in message
    assert PLANTED_SECRET not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert flaky.calls["pipe_file"] == FAST.attempts


@pytest.mark.s3
def test_persistent_s3_failure_hides_secret(s3_bucket, s3_storage_options):
    options = dict(s3_storage_options)
    store = RunStore(f"s3://{s3_bucket}", "run1", options, retry=FAST)
    assert PLANTED_SECRET not in repr(store) and PLANTED_SECRET not in store.url("a")
    assert PLANTED_SECRET not in repr(pickle.loads(pickle.dumps(store)))
    flaky = FlakyFS(store.fs, error=lambda: OSError(errno.EIO, f"bad secret {PLANTED_SECRET}"))
    store.fs = flaky
    flaky.fail = {"pipe_file": 100}
    with pytest.raises(StorageError) as info:
        store.create_once("commits/00003.json", b"x")
    assert f"s3://{s3_bucket}/run1/commits/00003.json" in str(info.value)
    assert PLANTED_SECRET not in str(info.value)


def test_permanent_error_is_not_retried(tmp_path):
    store = RunStore(str(tmp_path), "run1", retry=FAST)
    flaky = FlakyFS(store.fs, error=lambda: PermissionError("access denied"))
    store.fs = flaky
    flaky.fail = {"cat_file": 100}
    store.write("a.txt", b"x")
    with pytest.raises(StorageError, match="not retryable"):
        store.read("a.txt")
    assert flaky.calls["cat_file"] == 1


def test_missing_object_is_not_retried(tmp_path):
    store = RunStore(str(tmp_path), "run1", retry=FAST)
    flaky = FlakyFS(store.fs)
    store.fs = flaky
    with pytest.raises(FileNotFoundError):
        store.read("nope.txt")
    assert flaky.calls["cat_file"] == 1


def test_backoff_grows_and_is_capped():
    policy = RetryPolicy(attempts=8, base_delay_s=0.1, max_delay_s=1.0)
    for i in range(8):
        d = policy.delay_s(i)
        assert 0.5 * min(1.0, 0.1 * 2**i) <= d <= min(1.0, 0.1 * 2**i)


def test_from_run_uri_and_pickle(tmp_path):
    store = RunStore.from_run_uri(str(tmp_path / "out" / "run7") + "/")
    assert store.run_id == "run7"
    store.write("x/y.txt", b"hi")
    assert (tmp_path / "out" / "run7" / "x" / "y.txt").read_bytes() == b"hi"
    clone = pickle.loads(pickle.dumps(store))
    assert clone.read("x/y.txt") == b"hi"
    with pytest.raises(ValueError):
        RunStore.from_run_uri("s3://bucket-only")


# ---------------------------------------------------------------- create-once proven


def test_prove_create_once_passes_on_honest_stores(store):
    store.prove_create_once()
    assert store.list("") == []  # the probe is gone, folder included
    assert store.create_once("_LOCK", b"mine") is True  # the store still works afterwards


def test_prove_create_once_refuses_a_store_that_overwrites(tmp_path):
    store = double_store(CreateIgnoringFS, tmp_path, retry=FAST)
    assert store.create_once("a.json", b"one") is True
    assert store.create_once("a.json", b"two") is True  # the silent overwrite the probe exists for
    assert store.read("a.json") == b"two"
    with pytest.raises(StorageError) as info:
        store.prove_create_once()
    message = str(info.value)
    assert "ignores-create://out/run1" in message and "If-None-Match" in message
    assert "exactly-once cannot be guaranteed" in message and "\n" not in message
    # the probe object was removed (this local-backed double may keep its empty folder)
    assert [p.name for p in (tmp_path / "backing" / "out" / "run1").rglob("*") if p.is_file()] == ["a.json"]


def test_create_once_recognises_its_own_write_on_the_first_try(tmp_path):
    LostReplyFS.lost = 1
    store = double_store(LostReplyFS, tmp_path, retry=FAST)
    assert store.create_once("_LOCK", b"lock 6f1c") is True  # landed, reply said 412
    assert LostReplyFS.lost == 0
    LostReplyFS.lost = 1
    assert store.create_once("_LOCK", b"lock 9a2e") is False  # someone else's bytes
    assert store.read("_LOCK") == b"lock 6f1c"


@pytest.mark.s3
def test_create_once_lost_reply_on_s3(s3_bucket, s3_storage_options):
    store = RunStore(f"s3://{s3_bucket}/out", "run1", s3_storage_options, retry=FAST)
    flaky = FlakyFS(store.fs, error=lambda: FileExistsError("412 Precondition Failed"), land=True)
    store.fs = flaky
    flaky.fail = {"pipe_file": 1}
    assert store.create_once("commits/00007.json", b"marker 7 attempt 1") is True
    assert flaky.calls["pipe_file"] == 1  # decided on the first try, no blind retry
    flaky.fail = {"pipe_file": 1}
    assert store.create_once("commits/00007.json", b"marker 7 attempt 2") is False
    assert store.read("commits/00007.json") == b"marker 7 attempt 1"


# ---------------------------------------------------------------- durability


def _record_fsyncs(monkeypatch, watch):
    """Replace os.fsync; log (path, is_dir, `watch` existed at that moment) per call."""
    calls = []
    real = os.fsync

    def fake(fd):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), stat.S_ISDIR(os.fstat(fd).st_mode),
                      os.path.exists(watch)))
        real(fd)

    monkeypatch.setattr(os, "fsync", fake)
    return calls


@pytest.mark.parametrize("how", ["create_once", "write", "upload"])
def test_local_writes_are_fsynced_before_they_count(tmp_path, monkeypatch, how):
    store = RunStore(str(tmp_path / "out"), "run1", retry=FAST)
    dest = tmp_path / "out" / "run1" / "commits" / "00001.json"
    source = tmp_path / "source.bin"
    source.write_bytes(b"marker")
    calls = _record_fsyncs(monkeypatch, str(dest))
    if how == "create_once":
        assert store.create_once("commits/00001.json", b"marker") is True
    elif how == "write":
        store.write("commits/00001.json", b"marker")
    else:
        store.upload("commits/00001.json", str(source))
    assert dest.read_bytes() == b"marker"
    files = [c for c in calls if not c[1]]
    folders = [c for c in calls if c[1]]
    # the temp file's bytes were flushed while the object did not exist yet ...
    assert len(files) == 1 and "/.tmp/" in files[0][0] and files[0][2] is False
    # ... and the folder holding the new name after the rename or link
    assert (str(dest.parent), True, True) in folders
    # the new folders `commits/` and `.tmp/` were made durable in their parents
    assert any(path == str(dest.parent.parent) for path, _, _ in folders)
