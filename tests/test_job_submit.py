"""The operator's path, for real: `ray start --head` (token authentication), `ray job submit
--working-dir .` of jobs/render.py with the demo config, `ray job status` until it succeeds, then
`cogview-ray verify`. Checks what the working-dir upload shipped (no venv, outputs or weights).

The head gets its own temp dir, ports and process session, and is stopped by killing exactly its
processes: `ray stop` would kill every Ray on the machine, including other tests' clusters.
"""
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO_ROWS = 36  # configs/demo_prompts.parquet
MAX_UPLOAD_BYTES = 2 * 1024 * 1024
NEVER_SHIPPED = {".git", ".venv", "outputs", ".cache", ".hypothesis", ".pytest_cache", "__pycache__",
                 "cogview_ray.egg-info"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    address: str
    env: dict
    temp_dir: Path
    token: str

    def ray(self, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=env or self.env, capture_output=True,
                              text=True, timeout=timeout)


def _session_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[3])  # fields after "(comm)": state ppid pgrp session
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _our_processes(session: int, markers: list[str]) -> list[int]:
    """Processes of the head's session, or whose command line names one of our unique temp paths
    (the job's driver runs in a session of its own)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        if _session_of(pid) == session or any(m in _cmdline(pid) for m in markers):
            found.append(pid)
    return found


def _stop_head(proc: subprocess.Popen, markers: list[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for _ in range(3):
        pids = _our_processes(proc.pid, markers)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)
    if proc.poll() is None:
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    # short path: Ray's unix sockets live under it (107-byte limit)
    temp_dir = Path(tempfile.mkdtemp(prefix="cvr-head-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_path = temp_dir / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "COGVIEW_RAY_FAULTS"))}
    # Token authentication as Ray 2.60 sets it up, with this head's own token file rather than
    # ~/.ray/auth_token; the job's `python` is this venv's (the package is installed in it).
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token_path), OMP_NUM_THREADS="1")
    dash = _free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={_free_port()}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
           "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    log = open(temp_dir / "head.log", "w")
    proc = subprocess.Popen(cmd, cwd=temp_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    head = Head(f"http://127.0.0.1:{dash}", env, temp_dir, token)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{(temp_dir / 'head.log').read_text()[-3000:]}")
            if head.ray("job", "list", "--address", head.address, timeout=60).returncode == 0:
                break
            if time.time() > deadline:
                pytest.fail(f"the job server did not come up:\n{(temp_dir / 'head.log').read_text()[-3000:]}")
            time.sleep(2)
        yield head
    finally:
        _stop_head(proc, [str(temp_dir)])
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job(head: Head, job_id: str, timeout_s: float = 200) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        out = head.ray("job", "status", "--address", head.address, job_id)
        # the CLI words terminal states as "Job 'id' succeeded | failed | was stopped"
        m = re.search(rf"Job '{re.escape(job_id)}' (succeeded|failed|was stopped)", out.stdout + out.stderr)
        if m:
            return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[m.group(1)]
        time.sleep(2)
    head.ray("job", "stop", "--address", head.address, "--no-wait", job_id)
    return "TIMEOUT"


def _shipped_files(head: Head) -> dict[str, int]:
    """The working dir as the cluster unpacked it: relative path -> size."""
    pkgs = [p for p in head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert len(pkgs) == 1, pkgs
    return {str(p.relative_to(pkgs[0])): p.stat().st_size for p in pkgs[0].rglob("*") if p.is_file()}


def test_ray_job_submit_renders_the_demo_and_verifies(ray_head, tiny_checkpoint, tmp_path):
    head = ray_head
    # a wrong token is refused: authentication is really on
    wrong = dict(head.env, RAY_AUTH_TOKEN="0" * 64)
    wrong.pop("RAY_AUTH_TOKEN_PATH")
    assert head.ray("job", "list", "--address", head.address, env=wrong).returncode != 0

    # large decoys where render outputs and model caches go (both git-ignored): the upload must
    # leave them behind
    tag = f"decoy-{uuid.uuid4().hex[:8]}"
    decoys = [REPO / "outputs" / tag / "f00000-000000" / "a.png", REPO / ".cache" / tag / "model.safetensors"]
    for decoy in decoys:
        decoy.parent.mkdir(parents=True)
        decoy.write_bytes(os.urandom(3 * 1024 * 1024))
    out = tmp_path / "out"
    job_id = f"cvr-demo-{uuid.uuid4().hex[:8]}"
    # .gitignore off: the upload is kept small by .rayignore alone (and Ray's default excludes)
    submit_env = dict(head.env, RAY_RUNTIME_ENV_IGNORE_GITIGNORE="1")
    try:
        submitted = head.ray(
            "job", "submit", "--address", head.address, "--working-dir", ".", "--submission-id", job_id,
            "--no-wait", "--", "python", "jobs/render.py", "configs/demo.yaml", f"output.uri={out}",
            f"model.path={tiny_checkpoint}", env=submit_env)
    finally:
        for top in (REPO / "outputs", REPO / ".cache"):
            shutil.rmtree(top / tag, ignore_errors=True)
            try:
                top.rmdir()  # only if this test created it (it is empty then)
            except OSError:
                pass
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    status = _wait_for_job(head, job_id)
    logs = head.ray("job", "logs", "--address", head.address, job_id).stdout
    assert status == "SUCCEEDED", logs[-4000:]

    # the driver's progress, as plain log lines (not a terminal under the job server)
    assert "[cogview-ray] 36/36 rows (100%) | 36 images" in logs
    assert "\r" not in logs and "\x1b[K" not in logs
    assert f"run {out}/demo complete: 36 ok, 0 failed, 0 rejected of 36 rows" in logs

    verify = subprocess.run([str(BIN / "cogview-ray"), "verify", str(out / "demo")], capture_output=True, text=True,
                            timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.splitlines()[0] == f"{out}/demo: verified"
    assert re.search(rf"rows {DEMO_ROWS}\s+ok {DEMO_ROWS}\s+failed 0\s+rejected 0\s+objects checked {DEMO_ROWS}",
                     verify.stdout)

    shipped = _shipped_files(head)
    for needed in ("jobs/render.py", "configs/demo.yaml", "configs/demo_prompts.parquet", "cogview_ray/cli.py"):
        assert needed in shipped
    leaked = sorted(p for p in shipped if NEVER_SHIPPED & set(Path(p).parts) or p.endswith(".safetensors")
                    or tag in p)
    assert leaked == []
    assert sum(shipped.values()) < MAX_UPLOAD_BYTES, sorted(shipped.items(), key=lambda kv: -kv[1])[:10]
