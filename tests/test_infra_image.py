"""The image is what was tested, and the clusters can reach S3 and keep strangers out: checks on
the files (Dockerfile, requirements.lock, Makefile, the KubeRay manifests, the AWS launcher
config), each with a broken copy it must reject."""
import re
import sys
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
LOCK = REPO / "requirements.lock"
LAUNCHER = REPO / "infra" / "aws" / "cluster.yaml"
KUBERAY = REPO / "infra" / "kuberay"
SERVICE_ACCOUNT = "cogview-ray"


# --- the Dockerfile and the lock ---------------------------------------------------------------

def instructions(text: str) -> list:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    kept = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    joined = re.sub(r"\\\n", " ", kept)
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def lock_pins(text: str) -> dict:
    """Canonical name -> pinned version of every `name==version` line."""
    return {canonicalize_name(m.group(1)): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)", text, re.M)}


def constraints_torch() -> str:
    return re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)


def dockerfile_problems(text: str, torch_pin: str) -> list:
    problems = []
    steps = instructions(text)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), [a for i, a in steps if i == "FROM"][0])
    m = re.fullmatch(r"pytorch/pytorch:([\d.]+)-cuda(\d+)\.(\d+)-cudnn\d+-runtime", base)
    if not m:
        return [f"base image {base!r} is not a CUDA pytorch/pytorch runtime tag"]
    if m.group(1) != torch_pin:
        problems.append(f"base image has torch {m.group(1)}, the tests pin {torch_pin}")
    index = args.get("TORCH_INDEX_URL", "")
    if index != f"https://download.pytorch.org/whl/cu{m.group(2)}{m.group(3)}":
        problems.append(f"TORCH_INDEX_URL {index!r} is not the base image's CUDA {m.group(2)}.{m.group(3)}")

    def first(pred) -> int:
        return next((n for n, step in enumerate(steps) if pred(*step)), len(steps))

    lock_copied = first(lambda i, a: i == "COPY" and "requirements.lock" in shlex.split(a)[:-1])
    lock_install = first(lambda i, a: i == "RUN" and re.search(r"pip install .*-[cr] requirements\.lock", a))
    source_copied = first(lambda i, a: i in ("COPY", "ADD") and any(
        s.rstrip("/") == "cogview_ray" for s in shlex.split(a)[:-1]))
    if not lock_copied < lock_install < len(steps):
        problems.append("no RUN pip install -c/-r requirements.lock after COPY requirements.lock")
    if not lock_install < source_copied:
        problems.append("the source is copied before the dependencies are installed (no layer caching)")
    if lock_install < len(steps):
        run = steps[lock_install][1]
        if not re.search(r"(^|\s)boto3(\s|$)", run):
            problems.append("the dependency step does not install boto3")
        if "TORCH_INDEX_URL" not in run:
            problems.append("the dependency step does not use the PyTorch CUDA index")
    return problems


def test_image_is_built_from_the_tested_torch_and_the_lock():
    assert dockerfile_problems(DOCKERFILE.read_text(), constraints_torch()) == []


@pytest.mark.parametrize("old, new, expected", [
    ("pytorch/pytorch:2.13.0-", "pytorch/pytorch:2.9.1-", "the tests pin"),
    ("whl/cu130", "whl/cu128", "TORCH_INDEX_URL"),
    ("pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime", "python:3.11-slim", "not a CUDA"),
    ('"ray[default]==${RAY_VERSION}" boto3', '"ray[default]==${RAY_VERSION}"', "boto3"),
    ("-c requirements.lock", "-c constraints.txt", "requirements.lock"),
])
def test_dockerfile_check_rejects_a_broken_dockerfile(old, new, expected):
    text = DOCKERFILE.read_text()
    assert old in text
    assert any(expected in p for p in dockerfile_problems(text.replace(old, new), constraints_torch()))


def test_dockerfile_check_rejects_source_before_dependencies():
    text = DOCKERFILE.read_text()
    moved = "COPY cogview_ray ./cogview_ray\n"
    assert moved in text
    broken = text.replace(moved, "").replace("WORKDIR /tmp/src\n", "WORKDIR /tmp/src\n" + moved, 1)
    assert any("layer caching" in p for p in dockerfile_problems(broken, constraints_torch()))


def lock_problems(lock_text: str, pyproject: dict, torch_pin: str, ray_version: str) -> list:
    pins = lock_pins(lock_text)
    problems = []
    project = pyproject["project"]
    named = list(project["dependencies"])
    for extra in ("test", "report"):
        named += project.get("optional-dependencies", {}).get(extra, [])
    for spec in named:
        req = Requirement(spec)
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req.name} is not pinned in requirements.lock (run `make lock`)")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"requirements.lock pins {req.name}=={pinned}, outside {spec!r}")
    if pins.get("torch") != torch_pin:
        problems.append(f"requirements.lock pins torch=={pins.get('torch')}, not {torch_pin}")
    if pins.get("ray") != ray_version:
        problems.append(f"requirements.lock pins ray=={pins.get('ray')}, the image's RAY_VERSION is {ray_version}")
    if "boto3" not in pins:
        problems.append("boto3 is not pinned in requirements.lock")
    if re.search(r"^torch==\S+\+", lock_text, re.M):
        problems.append("torch is pinned with a local build label: the CPU and CUDA builds must both match")
    return problems


def _lock_inputs():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    return pyproject, constraints_torch(), ray_version


def test_lock_pins_every_dependency_pyproject_names():
    assert lock_problems(LOCK.read_text(), *_lock_inputs()) == []
    assert lock_pins(LOCK.read_text())["torch"] == "2.13.0"


@pytest.mark.parametrize("edit, expected", [
    (lambda t: re.sub(r"^transformers==.*\n", "", t, flags=re.M), "transformers is not pinned"),
    (lambda t: re.sub(r"^pyarrow==.*$", "pyarrow==14.0.0", t, flags=re.M), "outside"),
    (lambda t: re.sub(r"^torch==.*$", "torch==2.13.0+cpu", t, flags=re.M), "local build label"),
    (lambda t: re.sub(r"^ray==.*$", "ray==2.59.0", t, flags=re.M), "RAY_VERSION"),
    (lambda t: re.sub(r"^boto3==.*\n", "", t, flags=re.M), "boto3"),
    (lambda t: re.sub(r"^pytest==.*\n", "", t, flags=re.M), "pytest is not pinned"),
])
def test_lock_check_rejects_a_broken_lock(edit, expected):
    broken = edit(LOCK.read_text())
    assert broken != LOCK.read_text()
    assert any(expected in p for p in lock_problems(broken, *_lock_inputs()))


def makefile_problems(makefile: str) -> list:
    stamp = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", makefile, re.M)
    if not stamp:
        return ["no $(STAMP) rule"]
    problems = []
    if "requirements.lock" not in stamp.group(1).split():
        problems.append("$(STAMP) does not depend on requirements.lock")
    body = stamp.group(2)
    if re.search(r"^\s*else\b", body, re.M):  # a fallback for a Python the lock was not resolved for
        body, fallback = re.split(r"^\s*else\b.*$", body, maxsplit=1, flags=re.M)
        guard = [line for line in body.splitlines() if line.strip().startswith("if ")]
        if not any("$(LOCK_PYTHON)" in line and "version_info" in line for line in guard):
            problems.append("the install outside the lock is not guarded by the Python version check")
    installs = [line for line in body.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    if not any("-r requirements.lock" in line for line in installs):
        problems.append("the venv is not installed from requirements.lock")
    for line in installs:
        if "-r requirements.lock" not in line and "--no-deps" not in line:
            problems.append(f"an install resolves outside the lock: {line.strip()}")
    if not re.search(r"^test: \$\(STAMP\)", makefile, re.M) or not re.search(r"^demo: \$\(STAMP\)", makefile, re.M):
        problems.append("make test / make demo do not build the locked venv")
    if not re.search(r"^lock:", makefile, re.M):
        problems.append("no `make lock` target")
    return problems


def test_make_test_and_ci_install_from_the_lock():
    makefile = (REPO / "Makefile").read_text()
    assert makefile_problems(makefile) == []
    # the Python running the tests is the lock's, so `make test` here (and in CI) took the lock
    lock_python = re.search(r"^LOCK_PYTHON := (\S+)$", makefile, re.M).group(1)
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" == lock_python
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if not line.startswith("#")]
    assert "make test" in ci


@pytest.mark.parametrize("old, new, expected", [
    ("-r requirements.lock", "-e '.[test,report]'", "not installed from requirements.lock"),
    ("--no-deps -e .", "-e '.[test]'", "resolves outside the lock"),
    ("constraints.txt requirements.lock\n", "constraints.txt\n", "depend on requirements.lock"),
    ("sys.version_info[:2]", "sys.maxsize", "not guarded"),
])
def test_makefile_check_rejects_an_unlocked_install(old, new, expected):
    text = (REPO / "Makefile").read_text()
    assert old in text
    assert any(expected in p for p in makefile_problems(text.replace(old, new)))


# --- Kubernetes: every pod has the S3 identity -------------------------------------------------

def pod_specs(node, where="") -> list:
    """(where, pod spec) of every pod template in a manifest, RayJob templates kept as text in
    ConfigMaps included."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            found.append((where, node))
        for key, value in node.items():
            if isinstance(value, str) and "\n" in value and "apiVersion:" in value:
                for doc in yaml.safe_load_all(value):
                    found += pod_specs(doc, f"{where}.{key}(text)")
            else:
                found += pod_specs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for n, value in enumerate(node):
            found += pod_specs(value, f"{where}[{n}]")
    return found


def manifest_pods() -> list:
    pods = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for n, doc in enumerate(yaml.safe_load_all(path.read_text().replace("@STAMP@", "20260101-020000"))):
            pods += [(f"{path.name}#{n}{where}", pod) for where, pod in pod_specs(doc)]
    return pods


def test_every_pod_runs_as_a_service_account():
    pods = manifest_pods()
    assert len(pods) >= 9  # head + worker group in four cluster specs, the CronJob's pod
    assert [where for where, pod in pods if not pod.get("serviceAccountName")] == []
    ray_pods = [pod for _, pod in pods if any(c["name"].startswith("ray-") for c in pod["containers"])]
    assert len(ray_pods) == 8 and {p["serviceAccountName"] for p in ray_pods} == {SERVICE_ACCOUNT}


def test_the_service_account_exists_with_an_irsa_role():
    docs = list(yaml.safe_load_all((KUBERAY / "serviceaccount.yaml").read_text()))
    accounts = {d["metadata"]["name"]: d for d in docs if d and d.get("kind") == "ServiceAccount"}
    assert SERVICE_ACCOUNT in accounts
    role = accounts[SERVICE_ACCOUNT]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role)


def test_pod_walker_finds_a_pod_without_an_account():
    cronjob = (KUBERAY / "cronjob.yaml").read_text()
    doc = {"kind": "ConfigMap", "data": {"t.yaml": "apiVersion: v1\nspec:\n  template:\n    spec:\n"
                                                   "      containers: [{name: ray-head}]\n"}}
    assert [w for w, p in pod_specs(doc) if not p.get("serviceAccountName")] == [".data.t.yaml(text).spec.template.spec"]
    assert cronjob.count("serviceAccountName:") >= 3


# --- the AWS launcher: workers reach S3, strangers reach nothing -------------------------------

def launcher_problems(config: dict) -> list:
    problems = []
    head_type = config["head_node_type"]
    for name, node_type in config["available_node_types"].items():
        if name == head_type:
            continue  # Ray attaches its default profile (S3 and EC2 access) to the head
        arn = (node_type["node_config"].get("IamInstanceProfile") or {}).get("Arn", "")
        if not re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@/-]+", arn):
            problems.append(f"{name} has no IamInstanceProfile ARN: its nodes cannot read S3")
    run_options = " ".join(config.get("docker", {}).get("run_options", []))
    if not re.search(r"-e RAY_AUTH_MODE=token(\s|$)", run_options):
        problems.append("the containers do not run with RAY_AUTH_MODE=token")
    if "~/.ray/auth_token" not in (config.get("file_mounts") or {}):
        problems.append("no token is copied to the nodes (file_mounts ~/.ray/auth_token)")
    head_start = " ".join(config.get("head_start_ray_commands", []))
    host = re.search(r"--dashboard-host[= ](\S+)", head_start)
    if not host or host.group(1) not in ("127.0.0.1", "localhost"):
        problems.append(f"the dashboard listens on {host.group(1) if host else '0.0.0.0'}, not localhost")
    return problems


def _launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_gives_workers_s3_and_requires_a_token_on_localhost():
    assert launcher_problems(_launcher()) == []


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["available_node_types"]["worker.gpu.spot"]["node_config"].pop("IamInstanceProfile"), "S3"),
    (lambda c: c["docker"]["run_options"].remove("-e RAY_AUTH_MODE=token"), "RAY_AUTH_MODE"),
    (lambda c: c.pop("file_mounts"), "auth_token"),
    (lambda c: c.update(head_start_ray_commands=[s.replace("127.0.0.1", "0.0.0.0") for s in c["head_start_ray_commands"]]),
     "0.0.0.0"),
])
def test_launcher_check_rejects_an_open_or_keyless_cluster(edit, expected):
    config = _launcher()
    edit(config)
    assert any(expected in p for p in launcher_problems(config))
