"""Logs that outlive the cluster: the driver's lines and each failed worker attempt's traceback are
written into the run folder under `_logs/` (never outputs, never commit objects), credentials redacted."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections import deque
from typing import Any, Iterable, Mapping, Optional

from . import layout
from .credentials import REDACTED, is_secret_key, redact_text
from .storage import RunStore, secret_values

FLUSH_S = 30.0  # how often the driver's log object is rewritten while lines arrive
HEAD_LINES = 500  # the driver log keeps its first lines (the run's start) ...
TAIL_LINES = 20_000  # ... and its latest ones: memory stays bounded on a long run with many retries
MAX_ERROR_CHARS = 64_000  # a worker error log keeps the start and the end of a longer traceback
_SECRET_MIN_CHARS = 8  # shorter values of secret-named variables ("1", "true") are not hunted in text


def redact_log(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without credentials: URL user info and query strings, the given secret values and
    those of secret-named environment variables (AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN ...)."""
    hidden = set(secrets) | {v for k, v in os.environ.items()
                             if is_secret_key(k) and len(v) >= _SECRET_MIN_CHARS}
    for value in sorted(hidden, key=len, reverse=True):  # longest first: a secret may contain another
        if value:
            text = text.replace(value, REDACTED)
    return redact_text(text)


def _stamp(t: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class DriverLog:
    """The driver's log lines, kept in memory (bounded) and rewritten to
    `_logs/driver-{started_at}-{pid}.log` every `flush_s` seconds once `attach`ed to the run, and on
    `close` (also when the run fails). Only this driver writes that object. Writing the log never
    fails the run: a store error is said once on `err` and the next flush tries again."""

    def __init__(self, flush_s: float = FLUSH_S, *, clock=time.time, err=None):
        self.flush_s, self.clock = flush_s, clock
        self.err = err if err is not None else sys.stderr
        self.started_at, self.pid = clock(), os.getpid()
        self.store: Optional[RunStore] = None
        self.rel: Optional[str] = None
        self._secrets: list[str] = []
        self._head: list[str] = []
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._dropped = 0
        self._dirty = False
        self._warned = False
        self._lines_lock = threading.Lock()
        self._write_lock = threading.Lock()  # one flush at a time: an older snapshot never lands last
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def add(self, line: str) -> None:
        """One line (redacted again here: a caller's redaction may not know the store's secrets)."""
        line = f"{_iso(self.clock())} {redact_log(line, self._secrets)}"
        with self._lines_lock:
            if len(self._head) < HEAD_LINES:
                self._head.append(line)
            else:
                if len(self._tail) == self._tail.maxlen:
                    self._dropped += 1
                self._tail.append(line)
            self._dirty = True

    def attach(self, store: RunStore, storage_options: Mapping[str, Any] | None = None) -> str:
        """Start writing into `store` (once the run is this driver's: a rerun of a complete run
        writes nothing); lines said before are kept. Returns the log's URL."""
        self._secrets = secret_values(dict(storage_options or {}))
        self.store, self.rel = store, layout.driver_log(_stamp(self.started_at), self.pid)
        self.add(f"[cogview-ray] driver log of pid {self.pid} on {socket.gethostname()}, "
                 f"run {store.url()}")
        self.flush()
        self._thread = threading.Thread(target=self._run, name="cogview-driver-log", daemon=True)
        self._thread.start()
        return store.url(self.rel)

    @property
    def url(self) -> Optional[str]:
        return self.store.url(self.rel) if self.store is not None else None

    def text(self) -> str:
        with self._lines_lock:
            lines = list(self._head)
            if self._dropped:
                lines.append(f"... {self._dropped} line(s) left out ...")
            lines += self._tail
            self._dirty = False
        return "\n".join(lines) + "\n"

    def flush(self) -> bool:
        """Rewrite the log object if lines arrived since the last write; False if the write failed."""
        if self.store is None:
            return True
        with self._write_lock:
            if not self._dirty:
                return True
            # again as a whole: lines said before `attach` did not know the store's secrets yet
            data = redact_log(self.text(), self._secrets).encode("utf-8", "replace")
            try:
                self.store.write(self.rel, data)
            except Exception as e:  # noqa: BLE001 - the log must never be why a run fails
                self._dirty = True
                if not self._warned:
                    self._warned = True
                    print(f"[cogview-ray] could not write the driver log {self.url} "
                          f"({type(e).__name__}: {redact_log(str(e), self._secrets)[:200]}); will retry",
                          file=self.err, flush=True)
                return False
        return True

    def close(self) -> None:
        """Stop the periodic writer and write the log a last time."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.flush_s + 5)
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()


def worker_error(store: RunStore, worker_id: str, shard_id: str, attempt: int, text: str,
                 storage_options: Mapping[str, Any] | None = None) -> Optional[str]:
    """Write a failed shard attempt's traceback to `_logs/workers/{worker_id}/{shard_id}-a{attempt}.log`;
    the log's URL, or None if it could not be written (never raises: the shard's own error counts)."""
    try:
        rel = layout.worker_log(worker_id, f"{shard_id}-a{int(attempt)}")
    except (ValueError, TypeError):
        return None
    return _write_error(store, rel, f"shard {shard_id} attempt {attempt}", worker_id, text, storage_options)


def worker_load_error(uri: str, run_id: str, storage_options: Mapping[str, Any] | None, worker_id: str,
                      text: str) -> Optional[str]:
    """Write why a worker could not start (load, compile, config) to `_logs/workers/{worker_id}/load.log`,
    if the run's store is reachable; the log's URL or None, never raises."""
    try:
        store = RunStore(uri, run_id, storage_options)
        rel = layout.worker_log(worker_id, "load")
    except Exception:  # noqa: BLE001 - no store to write to: the error still reaches the driver
        return None
    return _write_error(store, rel, "start-up", worker_id, text, storage_options)


def _write_error(store: RunStore, rel: str, what: str, worker_id: str, text: str,
                 storage_options: Mapping[str, Any] | None) -> Optional[str]:
    if len(text) > MAX_ERROR_CHARS:  # the start says where, the end says what
        half = MAX_ERROR_CHARS // 2
        text = f"{text[:half]}\n... {len(text) - 2 * half} characters left out ...\n{text[-half:]}"
    head = (f"worker {worker_id} pid {os.getpid()} on {socket.gethostname()}: {what} failed at "
            f"{_iso(time.time())}\n")
    body = redact_log(head + text, secret_values(dict(storage_options or {})))
    try:
        store.write(rel, body.encode("utf-8", "replace"))
        return store.url(rel)
    except Exception:  # noqa: BLE001 - a log write must not replace the error it reports
        return None


def describe_logs(store: RunStore) -> Optional[str]:
    """Where a run's logs are, for `verify` and `report`: '{url}/_logs (1 driver log, 2 worker error
    logs)', or None when the run has none."""
    try:
        found = store.find(layout.LOGS_DIR)
    except Exception:  # noqa: BLE001 - a pointer to logs is a courtesy, never a finding
        return None
    if not found:
        return None
    drivers = sum(1 for rel in found if rel.startswith(f"{layout.LOGS_DIR}/driver-"))
    workers = sum(1 for rel in found if rel.startswith(f"{layout.LOGS_DIR}/workers/"))
    return (f"{store.url(layout.LOGS_DIR)} ({drivers} driver log{'s' * (drivers != 1)}, "
            f"{workers} worker error log{'s' * (workers != 1)})")
