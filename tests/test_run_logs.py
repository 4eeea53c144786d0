"""run_logs: the driver's log and workers' errors land in the run's `_logs/`, redacted; verify and
report point to them and never count them as outputs. No Ray: the wiring is called directly."""
import io
import re
import time
from types import SimpleNamespace

import pytest

from cogview_ray import layout
from cogview_ray.run_logs import DriverLog, describe_logs, redact_log, worker_error
from cogview_ray.storage import RunStore
from tests.test_verify import fabricate

pytestmark = [pytest.mark.timeout(60)]

SECRET = "hunter2-very-secret"
OPTIONS = {"key": "AKIAEXAMPLE", "secret": SECRET}


@pytest.fixture
def store(tmp_path):
    return RunStore(str(tmp_path / "out"), "run1")


def _driver_logs(store):
    return [rel for rel in store.find(layout.LOGS_DIR) if rel.startswith(f"{layout.LOGS_DIR}/driver-")]


def test_driver_log_is_flushed_periodically_and_redacted(store):
    log = DriverLog(flush_s=0.05, err=io.StringIO())
    log.add("[cogview-ray] planned 2 shards of s3://alice:pw@bucket/in.parquet?X-Amz-Signature=abc")
    log.add(f"[cogview-ray] said before attach: {SECRET}")  # the store's secrets are not known yet
    assert store.find(layout.LOGS_DIR) == []  # nothing is written before the run is this driver's
    url = log.attach(store, OPTIONS)
    (rel,) = _driver_logs(store)
    assert url == store.url(rel)
    assert re.fullmatch(rf"_logs/driver-\d{{8}}T\d{{6}}Z-{log.pid}\.log", rel)
    first = store.read(rel).decode()
    assert "planned 2 shards of s3://***@bucket/in.parquet?***" in first
    log.add(f"[cogview-ray] shard 00001 attempt 1 failed (storage error: token {SECRET})")
    deadline = time.monotonic() + 10
    while "attempt 1 failed" not in store.read(rel).decode():  # the periodic writer, not close()
        assert time.monotonic() < deadline, "the driver log was not rewritten"
        time.sleep(0.02)
    log.add("[cogview-ray] last words")
    log.close()
    text = store.read(rel).decode()
    assert SECRET not in text and "alice" not in text and "abc" not in text
    assert "token ***" in text
    assert text.splitlines()[-1].endswith("[cogview-ray] last words")
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \[cogview-ray\]", text)


def test_driver_log_write_failure_never_fails_the_run(store, monkeypatch):
    err = io.StringIO()
    log = DriverLog(flush_s=60, err=err)
    monkeypatch.setattr(store, "write", lambda rel, data: (_ for _ in ()).throw(ConnectionError("store down")))
    log.attach(store)
    log.add("x")
    assert log.flush() is False
    log.close()
    assert err.getvalue().count("could not write the driver log") == 1  # said once, not per flush
    monkeypatch.undo()
    log.add("y")
    assert log.flush() is True  # the store is back: the whole log lands
    assert store.read(log.rel).decode().count("\n") == 3  # header, x and y: nothing lost


def test_driver_log_memory_is_bounded(monkeypatch):
    from cogview_ray import run_logs

    monkeypatch.setattr(run_logs, "HEAD_LINES", 3)
    monkeypatch.setattr(run_logs, "TAIL_LINES", 4)
    log = DriverLog()
    for i in range(20):
        log.add(f"line {i}")
    lines = log.text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "line 0", "line 1", "line 2", "13 line(s) left out ...", "line 16", "line 17", "line 18", "line 19"]


def test_redact_log_hides_secret_environment_values(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-0123456789")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # short values are not hunted
    assert redact_log("auth tok-0123456789 failed, parallelism false") == "auth *** failed, parallelism false"


def test_worker_error_log_written_when_a_shard_attempt_raises(store):
    from cogview_ray.worker import RenderWorker

    class Raising:  # RenderWorker's own render_shard, around a shard body that raises
        worker_id = "w01.2"
        cfg = SimpleNamespace(output=SimpleNamespace(storage_options=OPTIONS))

        def __init__(self):
            self.store = store

        def _render_shard(self, shard, attempt, submitted_at):
            raise RuntimeError(f"device lost while writing s3://bob:pw@bucket/x with {SECRET}")

    with pytest.raises(RuntimeError, match="device lost"):
        RenderWorker.render_shard(Raising(), SimpleNamespace(shard_id="f00000-000012"), 3, 0.0)
    text = store.read("_logs/workers/w01.2/f00000-000012-a3.log").decode()
    assert text.startswith("worker w01.2 pid ")
    assert "shard f00000-000012 attempt 3 failed" in text
    assert "Traceback (most recent call last)" in text and "RuntimeError: device lost" in text
    assert SECRET not in text and "bob" not in text


def test_worker_error_log_never_raises_and_is_capped(store, monkeypatch):
    from cogview_ray import run_logs

    monkeypatch.setattr(run_logs, "MAX_ERROR_CHARS", 100)
    url = worker_error(store, "w00.0", "00001", 1, "A" * 60 + "B" * 500 + "C" * 60)
    text = store.read("_logs/workers/w00.0/00001-a1.log").decode()
    assert url == store.url("_logs/workers/w00.0/00001-a1.log")
    assert "A" * 50 in text and "C" * 50 in text and "B" * 60 not in text and "520 characters left out" in text
    monkeypatch.setattr(store, "write", lambda rel, data: (_ for _ in ()).throw(ConnectionError("down")))
    assert worker_error(store, "w00.0", "00002", 1, "boom") is None
    assert worker_error(store, "w00.0", "../escape", 1, "boom") is None  # not a key: nothing written


def test_worker_load_failure_is_logged(tmp_path, monkeypatch):
    from cogview_ray.config import load_config
    from cogview_ray.worker import RenderWorker

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the test process keeps its own

    cfg = load_config(None, [f"model.path={tmp_path}/no-such-checkpoint", f"dataset.uri={tmp_path}/p.parquet",
                             f"output.uri={tmp_path}/out", "output.run_id=r"])
    with pytest.raises(Exception):
        RenderWorker(cfg, "r", "w00.0")
    text = RunStore(f"{tmp_path}/out", "r").read("_logs/workers/w00.0/load.log").decode()
    assert "start-up failed" in text and "no-such-checkpoint" in text and "Traceback" in text


def test_verify_ignores_logs_and_points_to_them(store):
    from cogview_ray.verify import verify_run

    fabricate(store)
    assert "logs:" not in verify_run(store.url()).summary()
    store.write("_logs/driver-20261203T010203Z-42.log", b"driver\n")
    store.write("_logs/workers/w00.0/00001-a1.log", b"Traceback\n")
    store.write("_logs/workers/w00.1/load.log", b"Traceback\n")
    assert not layout.is_output("_logs/driver-20261203T010203Z-42.log")
    report = verify_run(store.url())
    assert report.verified, report.problems
    assert report.totals["objects_checked"] == 4  # the two shards' images only
    assert report.logs == f"{store.url('_logs')} (1 driver log, 2 worker error logs)"
    assert f"  logs: {store.url('_logs')} (1 driver log, 2 worker error logs)" in report.summary().splitlines()
    assert describe_logs(RunStore(store.uri, "other-run")) is None
