"""RunStore: confinement to the run prefix, create-once, retries, no leaked secrets."""
import errno
import pickle
import threading

import pytest

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
