"""The operator's path, for real, on one local head with token authentication: every command
line the cluster sections of README.md and infra/README.md give (`ray get-auth-token`, the
`export`s, `ray job submit` with and without `--working-dir`, `ray job status`/`logs`,
`cogview-ray verify`) runs as written, with only placeholders replaced (the address, `s3://`
URIs) and CPU settings appended to the render. Also checks which token setups the Jobs CLI
accepts, that `ray start --head` never makes a token, and what the working-dir upload shipped.

The head runs in the repository root, as the image's head runs in its working directory (which
holds jobs/ and configs/), with a HOME of its own whose ~/.ray/auth_token `ray get-auth-token
--generate` made, as on the launcher's nodes. It is stopped by killing exactly its processes:
`ray stop` would kill every Ray on the machine, including other tests' clusters.
"""
import os
import re
import shlex
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
README_SECTION = "## Running on a cluster"
# What a documented line may start with: run here, or needing a real cloud (never run here;
# the lines that set up the token they would produce are replaced by the fixture's token).
RUNNABLE = ("export RAY_AUTH_MODE=", "ray get-auth-token", "ray job ", "cogview-ray verify ")
NEEDS_A_CLOUD = ("docker ", "kubectl ", "ray up ", "ray dashboard ", "ray down ", "aws ",
                 "export RAY_AUTH_TOKEN=$(kubectl ")
# The GPU render made small enough for 2 CPUs: appended to every documented render, so the
# documented settings before them are still parsed and validated.
CPU_RENDER = ("model.device=cpu model.dtype=float32 model.compile=none render.height=128 render.width=128 "
              "render.num_inference_steps=4 render.batch_size=2 workers.num_workers=auto workers.cpus_per_worker=1 "
              "dataset.shard_size=6")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    address: str
    env: dict  # a client on the head's machine: RAY_AUTH_MODE=token, the token in ~/.ray/auth_token
    temp_dir: Path
    home: Path
    token: str

    def ray(self, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=env or self.env, capture_output=True,
                              text=True, timeout=timeout)

    def shell(self, command: str, env: dict, timeout=240) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)


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


def _clean_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "COGVIEW_RAY_FAULTS"))}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", HOME=str(home), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def ray_head():
    # short path: Ray's unix sockets live under it (107-byte limit)
    temp_dir = Path(tempfile.mkdtemp(prefix="cvr-head-", dir="/tmp"))
    home = temp_dir / "home"
    home.mkdir()
    # The launcher path: the token comes from `ray get-auth-token --generate` (README), and the
    # nodes run with RAY_AUTH_MODE=token (infra/aws/cluster.yaml).
    made = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=_clean_env(home),
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    token = (home / ".ray" / "auth_token").read_text()
    assert made.stdout == token and len(token) >= 32
    env = dict(_clean_env(home), RAY_AUTH_MODE="token")
    dash = _free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={_free_port()}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
           "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    log = open(temp_dir / "head.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dash}", env, temp_dir, home, token)
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


# --- the documented command lines ---------------------------------------------------------------

def doc_section(text: str, heading: str) -> str:
    """From `heading` to the next heading of the same or a higher level (outside code blocks)."""
    lines = text.splitlines(keepends=True)
    start = lines.index(heading + "\n")
    level = len(heading.split()[0])
    fenced = False
    for end in range(start + 1, len(lines)):
        fenced ^= lines[end].startswith("```")
        if not fenced and re.match(rf"#{{1,{level}}} ", lines[end]):
            return "".join(lines[start:end])
    return "".join(lines[start:])


def doc_commands(text: str) -> list[str]:
    """Every command line of the ```bash blocks, continuations joined."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_doc_command_extraction_can_fail():
    text = "# a\n## Running on a cluster\n```bash\nray job submit --address X \\\n    -- python jobs/render.py c.yaml\n" \
           "# a comment\n```\n### sub\n```sh\nkubectl get pods\n```\n## Next\n```bash\nray up x\n```\n"
    section = doc_section(text, README_SECTION)
    assert doc_commands(section) == ["ray job submit --address X -- python jobs/render.py c.yaml", "kubectl get pods"]
    assert "ray up" not in section


def _substitute(command: str, head: Head, checkpoint: str, out: Path) -> str:
    for placeholder, value in (("http://localhost:8265", head.address), ("http://HEAD:8265", head.address),
                               ("s3://my-bucket/models/CogView3-Plus-3B", checkpoint),
                               ("s3://my-bucket/prompts/", str(REPO / "configs" / "demo_prompts.parquet")),
                               ("s3://my-bucket/renders", str(out))):
        command = command.replace(placeholder, value)
    if "ray job submit" in command and " jobs/render.py " in command:
        command = re.sub(r"\s+#.*$", "", command) + " " + CPU_RENDER
    return command


def _exported(command: str, env: dict) -> dict:
    """The environment after a documented `export` line."""
    done = subprocess.run(["bash", "-c", f"{command}\nenv -0"], env=env, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)


def _shipped_files(head: Head) -> dict[str, int]:
    """The working dir as the cluster unpacked it: relative path -> size."""
    pkgs = [p for p in head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert len(pkgs) == 1, pkgs
    return {str(p.relative_to(pkgs[0])): p.stat().st_size for p in pkgs[0].rglob("*") if p.is_file()}


def test_token_setups_the_docs_give_are_accepted_and_others_refused(ray_head, tmp_path):
    head = ray_head
    # on the head, `ray get-auth-token` prints the cluster's token
    printed = head.ray("get-auth-token")
    assert printed.returncode == 0 and printed.stdout == head.token

    empty_home = tmp_path / "home"
    empty_home.mkdir()
    client = _clean_env(empty_home)  # a laptop with no ~/.ray/auth_token
    token_file = tmp_path / "token"
    token_file.write_text(head.token)
    accepted = {
        "~/.ray/auth_token (launcher)": dict(client, RAY_AUTH_MODE="token", HOME=str(head.home)),
        "RAY_AUTH_TOKEN (KubeRay Secret)": dict(client, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token),
        "RAY_AUTH_TOKEN_PATH": dict(client, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file)),
    }
    for label, env in accepted.items():
        listed = head.ray("job", "list", "--address", head.address, env=env)
        assert listed.returncode == 0, (label, listed.stderr[-2000:])
    refused = {
        # the CLI sends no token unless RAY_AUTH_MODE=token
        "RAY_AUTH_TOKEN alone": (dict(client, RAY_AUTH_TOKEN=head.token),
                                 "Authentication required: Unauthorized: Missing authentication token"),
        "a wrong token": (dict(client, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32), "Authentication failed"),
    }
    for label, (env, message) in refused.items():
        listed = head.ray("job", "list", "--address", head.address, env=env)
        assert listed.returncode != 0 and message in listed.stdout + listed.stderr, (label, listed.stderr[-2000:])


def test_ray_start_head_never_makes_a_token(tmp_path):
    """With token mode on and no token, `ray start --head` refuses to start; it never writes one."""
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = Path(tempfile.mkdtemp(prefix="cvr-notok-", dir="/tmp"))
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={_free_port()}", "--include-dashboard=false",
           "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=dict(_clean_env(home), RAY_AUTH_MODE="token"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        _stop_head(proc, [str(temp_dir)])
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode != 0, output[-2000:]
    assert "Token authentication is enabled but no authentication token was found" in output, output[-2000:]
    assert not (home / ".ray" / "auth_token").exists()


def test_readme_cluster_path_runs_as_written(ray_head, tiny_checkpoint, tmp_path):
    head = ray_head
    commands = doc_commands(doc_section((REPO / "README.md").read_text(), README_SECTION))
    unknown = [c for c in commands if not c.startswith(RUNNABLE + NEEDS_A_CLOUD)]
    assert unknown == [], "a documented command this test neither runs nor knows to need a cloud"
    runnable = [c for c in commands if c.startswith(RUNNABLE)]

    # a laptop: the token arrives as RAY_AUTH_TOKEN (what the documented kubectl line exports)
    client_home = tmp_path / "laptop"
    client_home.mkdir()
    env = dict(_clean_env(client_home), RAY_AUTH_TOKEN=head.token)
    # .gitignore off: the upload is kept small by .rayignore alone (and Ray's default excludes)
    env["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = "1"
    out = tmp_path / "out"
    # large decoys where render outputs and model caches go (both git-ignored): the upload must
    # leave them behind
    tag = f"decoy-{uuid.uuid4().hex[:8]}"
    decoys = [REPO / "outputs" / tag / "f00000-000000" / "a.png", REPO / ".cache" / tag / "model.safetensors"]
    for decoy in decoys:
        decoy.parent.mkdir(parents=True)
        decoy.write_bytes(os.urandom(3 * 1024 * 1024))
    ran = {}
    try:
        for documented in runnable:
            if documented.startswith("export "):
                env = _exported(documented, env)
                continue
            if documented.startswith("ray get-auth-token"):
                continue  # a token-making step; test_token_setups... checks it, the head used it
            command = _substitute(documented, head, tiny_checkpoint, out)
            done = head.shell(command, env)
            assert done.returncode == 0, (documented, (done.stdout + done.stderr)[-4000:])
            ran[documented.split(" --")[0]] = done.stdout + done.stderr
    finally:
        for top in (REPO / "outputs", REPO / ".cache"):
            shutil.rmtree(top / tag, ignore_errors=True)
            try:
                top.rmdir()  # only if this test created it (it is empty then)
            except OSError:
                pass
    assert env.get("RAY_AUTH_MODE") == "token"
    assert {"ray job submit", "ray job status", "ray job logs"} <= set(ran) and any(
        k.startswith("cogview-ray verify") for k in ran), sorted(ran)

    submitted = ran["ray job submit"]
    run_id = re.search(r"Job '([\w-]+)' submitted successfully", submitted).group(1)
    assert f"Job '{run_id}' succeeded" in submitted
    # the driver's progress, as plain log lines (not a terminal under the job server)
    logs = ran["ray job logs"]
    assert f"[cogview-ray] {DEMO_ROWS}/{DEMO_ROWS} rows (100%) | {DEMO_ROWS} images" in logs
    assert "\r" not in logs and "\x1b[K" not in logs
    assert f"run {out}/{run_id} complete: {DEMO_ROWS} ok, 0 failed, 0 rejected of {DEMO_ROWS} rows" in logs
    assert f"Job '{run_id}' succeeded" in ran["ray job status"]
    verify = next(v for k, v in ran.items() if k.startswith("cogview-ray verify"))
    assert verify.splitlines()[0] == f"{out}/{run_id}: verified"
    assert re.search(rf"rows {DEMO_ROWS}\s+ok {DEMO_ROWS}\s+failed 0\s+rejected 0\s+objects checked {DEMO_ROWS}",
                     verify)

    shipped = _shipped_files(head)
    for needed in ("jobs/render.py", "configs/cogview3plus.yaml", "configs/demo_prompts.parquet", "cogview_ray/cli.py"):
        assert needed in shipped
    leaked = sorted(p for p in shipped if NEVER_SHIPPED & set(Path(p).parts) or p.endswith(".safetensors")
                    or tag in p)
    assert leaked == []
    assert sum(shipped.values()) < MAX_UPLOAD_BYTES, sorted(shipped.items(), key=lambda kv: -kv[1])[:10]


def test_infra_readme_submissions_run_in_the_heads_working_directory(ray_head, tiny_checkpoint, tmp_path):
    """infra/README.md submits without --working-dir: jobs/ and configs/ come from the head's
    working directory (the image's), the token from ~/.ray/auth_token (the launcher's path)."""
    head = ray_head
    submits = sorted({c for c in doc_commands((REPO / "infra" / "README.md").read_text()) if "ray job submit" in c})
    assert submits and all("--working-dir" not in c for c in submits), submits
    # one job per shape (lines that differ only in key=value settings share one); every line's
    # config and settings are still loaded and validated
    from cogview_ray.config import load_config

    shapes = {}
    for documented in submits:
        argv = shlex.split(_substitute(documented, head, tiny_checkpoint, tmp_path / "out"))
        entry = argv.index("jobs/render.py")
        load_config(REPO / argv[entry + 1], argv[entry + 2:])  # raises ConfigError on a bad key or value
        shapes.setdefault(re.sub(r"\s+[a-z_]+(\.[a-z_]+)+=\S+", "", documented), documented)
    for i, documented in enumerate(shapes.values()):
        out = tmp_path / f"out{i}"
        command = _substitute(documented, head, tiny_checkpoint, out) + " dataset.limit=6"
        done = head.shell(command, head.env)
        text = done.stdout + done.stderr
        assert done.returncode == 0 and re.search(r"Job '\w+' succeeded", text), (documented, text[-4000:])
        assert re.search(r"complete: 6 ok, 0 failed, 0 rejected of 6 rows", text), text[-4000:]
