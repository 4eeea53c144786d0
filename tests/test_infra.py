"""The deployment files in infra/ checked offline against what enforces them: the KubeRay CRD
schemas (as the API server would), Ray's cluster launcher schema, Docker's ignore rules, and
the repository itself (entrypoints, configs, Dockerfile sources, one image everywhere)."""
import copy
import functools
import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO.parent / "shared" / "reference" / "kuberay-crds"
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
LAUNCHER = INFRA / "aws" / "cluster.yaml"
KUBERAY_FILES = ("raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob.yaml")

STAMP_PLACEHOLDER = "@STAMP@"
STAMP = "20260101-020000"  # what `date -u +%Y%m%d-%H%M%S` gives
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# KubeRay appends suffixes to these names to build its own objects.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 40, "CronJob": 52}


# --- loading -----------------------------------------------------------------------------------

def load_docs(path: Path, stamp: str = STAMP) -> list:
    text = path.read_text().replace(STAMP_PLACEHOLDER, stamp)
    return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]


def ray_resources() -> list:
    """(label, doc) for every ray.io object in infra/kuberay, including RayJob templates
    kept as text in ConfigMaps (what cronjob.yaml creates)."""
    found = []
    for name in KUBERAY_FILES:
        for doc in load_docs(KUBERAY / name):
            if doc.get("apiVersion", "").startswith("ray.io/"):
                found.append((f"{name}:{doc['kind']}", doc))
            elif doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    inner = yaml.load(text.replace(STAMP_PLACEHOLDER, STAMP), Loader=_Loader)
                    if isinstance(inner, dict) and str(inner.get("apiVersion", "")).startswith("ray.io/"):
                        found.append((f"{name}:ConfigMap/{doc['metadata']['name']}[{key}]", inner))
    return found


def by_kind(kind: str, file: str | None = None) -> list:
    return [d for label, d in ray_resources() if d["kind"] == kind and (file is None or label.startswith(file))]


def cluster_specs() -> list:
    """(label, RayClusterSpec) of every Ray cluster the manifests would create."""
    specs = []
    for label, doc in ray_resources():
        spec = doc["spec"]
        if doc["kind"] == "RayCluster":
            specs.append((label, spec))
        elif doc["kind"] == "RayJob":
            specs.append((label, spec["rayClusterSpec"]))
        elif doc["kind"] == "RayCronJob":
            specs.append((label, spec["jobTemplate"]["rayClusterSpec"]))
    return specs


def rayjob_specs() -> list:
    out = [(label, d["spec"]) for label, d in ray_resources() if d["kind"] == "RayJob"]
    out += [(label, d["spec"]["jobTemplate"]) for label, d in ray_resources() if d["kind"] == "RayCronJob"]
    return out


def pod_specs(cluster: dict) -> list:
    """(role, pod spec) for the head and each worker group."""
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    pods += [(f"worker:{g['groupName']}", g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    return pods


# --- CRD validation ------------------------------------------------------------------------------

def _list_map_keys(validator, keys, instance, schema):
    """`x-kubernetes-list-type: map`: items must be unique by their key fields."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        if not isinstance(item, dict):
            continue
        ident = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
        if ident in seen:
            shown = ", ".join(f"{k}={item.get(k)!r}" for k in keys)
            yield jsonschema.ValidationError(f"duplicate entry with {shown} in a list keyed by {keys}")
        seen.add(ident)


K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
)


def structural(schema):
    """An OpenAPI v3 CRD schema as the API server applies it, for jsonschema:
    - unknown fields are errors (kubectl's strict field validation), unless the schema keeps
      them (`additionalProperties`, `x-kubernetes-preserve-unknown-fields`) or declares no
      properties at all (free-form objects such as `metadata`, checked separately);
    - `nullable` admits null; `x-kubernetes-int-or-string` admits an integer or a string;
    - `x-kubernetes-list-type: set` means unique items, `map` unique by its keys (above).
    CEL rules (`x-kubernetes-validations`) are not evaluated; the manifests set none of the
    fields they guard (`managedBy`, `deletionStrategy`, `gcsFaultToleranceOptions`)."""
    if isinstance(schema, list):
        return [structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: structural(v) for k, v in schema.items()}
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, version: str):
    assert CRD_DIR.is_dir(), f"KubeRay CRDs not found at {CRD_DIR} (shared/ must sit beside the repo)"
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_Loader)
        if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["names"]["kind"] != kind:
            continue
        for v in crd["spec"]["versions"]:
            if v["name"] == version:
                assert v.get("served", False), f"{kind} {version} is not served by the CRD"
                return K8sValidator(structural(v["schema"]["openAPIV3Schema"]))
        pytest.fail(f"{path.name} has no version {version} of {kind}")
    pytest.fail(f"no CRD for kind {kind} in {CRD_DIR}")


def crd_errors(doc: dict) -> list:
    group_version = doc.get("apiVersion", "")
    if "/" not in group_version or not doc.get("kind"):
        return ["apiVersion and kind must be set"]
    validator = crd_validator(doc["kind"], group_version.split("/", 1)[1])
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]
    errors += metadata_errors(doc)
    return sorted(errors)


def metadata_errors(doc: dict) -> list:
    meta = doc.get("metadata") or {}
    name, kind = meta.get("name"), doc.get("kind")
    if not isinstance(name, str):
        return ["metadata.name must be set"]
    rule = DNS1035 if kind in MAX_NAME and kind != "CronJob" else DNS1123_SUBDOMAIN
    problems = [] if rule.match(name) else [f"metadata.name {name!r} is not a valid {kind} name"]
    if len(name) > MAX_NAME.get(kind, 253):
        problems.append(f"metadata.name {name!r} is longer than {MAX_NAME[kind]} characters")
    for field in ("labels", "annotations"):
        if not all(isinstance(v, str) for v in (meta.get(field) or {}).values()):
            problems.append(f"metadata.{field} values must be strings")
    return problems


@pytest.mark.parametrize("label, doc", ray_resources(), ids=[label for label, _ in ray_resources()])
def test_kuberay_manifest_matches_its_crd(label, doc):
    assert crd_errors(doc) == []


def test_every_kuberay_kind_is_present():
    assert sorted(label for label, _ in ray_resources()) == [
        "cronjob.yaml:ConfigMap/cogview-nightly-rayjob[rayjob.yaml]",
        "raycluster.yaml:RayCluster",
        "raycronjob.yaml:RayCronJob",
        "rayjob.yaml:RayJob",
    ]


def _rayjob():
    return copy.deepcopy(by_kind("RayJob", "rayjob.yaml")[0])


def _break_typo(d):
    d["spec"]["shutdownAfterJobFinish"] = d["spec"].pop("shutdownAfterJobFinishes")


def _break_int_start_param(d):
    d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _break_quantity(d):
    d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"]["memory"] = "40 GiB"


def _break_duplicate_container(d):
    pod = d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    pod["containers"].append(copy.deepcopy(pod["containers"][0]))


def _break_missing_required(d):
    del d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"]


def _break_type(d):
    d["spec"]["ttlSecondsAfterFinished"] = "900"


def _break_enum(d):
    d["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"


def _break_pod_typo(d):
    pod = d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    pod["toleration"] = pod.pop("tolerations")


def _break_name(d):
    d["metadata"]["name"] = "Render_" + STAMP


@pytest.mark.parametrize(
    "breaker, where",
    [
        (_break_typo, "shutdownAfterJobFinish"),
        (_break_int_start_param, "rayStartParams.num-cpus"),
        (_break_quantity, "resources.limits.memory"),
        (_break_duplicate_container, "containers"),
        (_break_missing_required, "maxReplicas"),
        (_break_type, "ttlSecondsAfterFinished"),
        (_break_enum, "authOptions.mode"),
        (_break_pod_typo, "toleration"),
        (_break_name, "metadata.name"),
    ],
)
def test_crd_validation_rejects_a_broken_manifest(breaker, where):
    doc = _rayjob()
    assert crd_errors(doc) == []
    breaker(doc)
    errors = crd_errors(doc)
    assert errors and any(where in e for e in errors), errors


# --- references to the repository ----------------------------------------------------------------

def entrypoints() -> list:
    return [(label, spec["entrypoint"]) for label, spec in rayjob_specs()]


@pytest.mark.parametrize("label, entrypoint", entrypoints(), ids=[label for label, _ in entrypoints()])
def test_entrypoint_runs_a_job_script_with_a_config_of_this_repo(label, entrypoint):
    argv = shlex.split(entrypoint)
    assert argv[:1] == ["python"] and len(argv) >= 3, entrypoint
    script, config, overrides = argv[1], argv[2], argv[3:]
    assert re.fullmatch(r"jobs/\w+\.py", script) and (REPO / script).is_file(), f"{label}: no {script}"
    assert re.fullmatch(r"configs/[\w.-]+\.ya?ml", config) and (REPO / config).is_file(), f"{label}: no {config}"
    assert all(re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=\S+", o) for o in overrides), overrides
    if script == "jobs/render.py":
        from cogview_ray.config import load_config

        cfg = load_config(REPO / config, overrides)  # raises ConfigError on a bad key or value
        if any(o.startswith("output.run_id=") for o in overrides):
            assert STAMP in cfg.output.run_id


def test_every_path_named_in_infra_exists():
    """Commands in comments and the README are what users copy: their paths must exist."""
    texts = {p: p.read_text() for p in [*INFRA.rglob("*.yaml"), DOCKERFILE, INFRA / "README.md"]}
    named = {}
    for path, text in texts.items():
        for ref in re.findall(r"(?<![\w/.-])((?:jobs|configs|infra)/[\w./-]*\w)", text):
            named.setdefault(ref, path.relative_to(REPO).as_posix())
    assert {"infra/kuberay/rayjob.yaml", "jobs/render.py", "configs/cogview3plus.yaml"} <= set(named)
    missing = {ref: where for ref, where in named.items() if not (REPO / ref).exists()}
    assert missing == {}


def test_rayjobs_clean_up_and_retry():
    for label, spec in rayjob_specs():
        assert spec.get("shutdownAfterJobFinishes") is True, label
        assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] > 0, label
        assert isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] >= 0, label
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", label


def test_rayjob_submission_ids_are_date_stamped():
    for name in ("rayjob.yaml", "cronjob.yaml"):
        raw = (KUBERAY / name).read_text()
        assert f"name: cogview-{'render' if name == 'rayjob.yaml' else 'nightly'}-{STAMP_PLACEHOLDER}" in raw
    for label, doc in ray_resources():
        if doc["kind"] == "RayJob":
            assert doc["spec"]["jobId"] == doc["metadata"]["name"], label
            assert doc["metadata"]["name"].endswith(STAMP), label
            assert metadata_errors(doc) == [], label
    # a different stamp gives a different job, with a name that is still valid
    later = [d for d in load_docs(KUBERAY / "rayjob.yaml", stamp="20991231-235959") if d["kind"] == "RayJob"][0]
    assert later["spec"]["jobId"] != _rayjob()["spec"]["jobId"] and metadata_errors(later) == []


def test_cluster_copies_agree_with_raycluster_yaml():
    reference = by_kind("RayCluster")[0]["spec"]
    for label, spec in cluster_specs():
        assert spec == reference, f"{label} differs from raycluster.yaml; keep the copies equal"


# --- the GPU layout ------------------------------------------------------------------------------

def test_one_gpu_per_worker_pod_and_a_node_local_model_cache():
    dockerfile_cache = re.search(r"COGVIEW_RAY_CACHE=(\S+)", DOCKERFILE.read_text()).group(1)
    for label, cluster in cluster_specs():
        for role, pod in pod_specs(cluster):
            ray_container = pod["containers"][0]
            limits = ray_container.get("resources", {}).get("limits", {})
            requests = ray_container.get("resources", {}).get("requests", {})
            if role == "head":
                assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests, label
                continue
            assert str(limits.get("nvidia.com/gpu")) == "1", (label, role)
            assert str(requests.get("nvidia.com/gpu", 1)) == "1", (label, role)
            env = {e["name"]: e.get("value") for e in ray_container.get("env", [])}
            cache = env.get("COGVIEW_RAY_CACHE", dockerfile_cache)
            assert cache == dockerfile_cache, (label, role)
            mounts = {m["mountPath"]: m["name"] for m in ray_container.get("volumeMounts", [])}
            assert cache in mounts, f"{label} {role}: nothing mounted at the model cache {cache}"
            volume = {v["name"]: v for v in pod.get("volumes", [])}[mounts[cache]]
            assert "hostPath" in volume or "emptyDir" in volume, (label, role)


# --- images --------------------------------------------------------------------------------------

def _dockerfile_tag() -> str:
    return re.search(r"docker build -f infra/docker/Dockerfile -t (\S+) \.", DOCKERFILE.read_text()).group(1)


def ray_images() -> dict:
    """Every image a Ray node runs: the Kubernetes pods (init containers too) and the launcher."""
    images = {}
    for label, cluster in cluster_specs():
        for role, pod in pod_specs(cluster):
            for c in [*pod.get("initContainers", []), *pod["containers"]]:
                images[f"{label} {role} {c['name']}"] = c["image"]
    docker = yaml.load(LAUNCHER.read_text(), Loader=_Loader)["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            images[f"aws/cluster.yaml docker.{key}"] = docker[key]
    return images


def test_images_agree_everywhere():
    images = ray_images()
    assert len(images) >= 11
    assert set(images.values()) == {_dockerfile_tag()}, images
    image = _dockerfile_tag()
    assert re.fullmatch(r"[\w.-]+(:\d+)?(/[\w.-]+)+:[\w][\w.-]*", image) and not image.endswith(":latest")
    assert image in (INFRA / "README.md").read_text()


def test_helper_images_are_pinned():
    docs = load_docs(KUBERAY / "cronjob.yaml")
    pod = [d for d in docs if d["kind"] == "CronJob"][0]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    helpers = [c["image"] for c in [*pod.get("initContainers", []), *pod["containers"]]]
    assert helpers and all(re.search(r":[\w.-]+$", i) and not i.endswith(":latest") for i in helpers), helpers


def test_ray_version_matches_the_image():
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert {spec.get("rayVersion") for _, spec in cluster_specs()} == {ray_version}


# --- the launcher --------------------------------------------------------------------------------

def ray_launcher_schema() -> dict:
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations, "ray is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def launcher_problems(config: dict) -> list:
    """Ray's schema, plus the cross-field rules Ray checks itself (head type, worker counts)."""
    validator = jsonschema.Draft7Validator(ray_launcher_schema())
    problems = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in validator.iter_errors(config)
    ]
    types = config.get("available_node_types") or {}
    if config.get("head_node_type") not in types:
        problems.append("head_node_type must be one of available_node_types")
    if sum(t.get("min_workers", 0) for t in types.values()) > config.get("max_workers", 2):
        problems.append("max_workers is below the sum of min_workers")
    return sorted(problems)


def _launcher():
    return yaml.load(LAUNCHER.read_text(), Loader=_Loader)


def test_launcher_config_matches_rays_schema():
    assert launcher_problems(_launcher()) == []


def test_launcher_runs_an_on_demand_head_and_autoscaled_spot_gpu_workers():
    config = _launcher()
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]  # on-demand
    assert re.match(r"[mcr]\d", head["node_config"]["InstanceType"])  # a CPU instance family
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers
    for name, t in workers.items():
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert re.match(r"(g\d|p\d)", t["node_config"]["InstanceType"]), name  # a GPU family
        assert t.get("min_workers", 0) < t["max_workers"] <= config["max_workers"], name
    assert config["provider"].get("cache_stopped_nodes") is False  # spot nodes cannot be stopped


@pytest.mark.parametrize(
    "breaker, where",
    [
        (lambda c: c.update(max_worker=4), "max_worker"),
        (lambda c: c.update(max_workers=-1), "max_workers"),
        (lambda c: c["available_node_types"]["worker.gpu.spot"].pop("node_config"), "node_config"),
        (lambda c: c["available_node_types"]["worker.gpu.spot"].update(resources={"GPU": "1"}), "GPU"),
        (lambda c: c["docker"].update(imagee="x"), "imagee"),
        (lambda c: c.update(head_node_type="head.gpu"), "head_node_type"),
    ],
)
def test_launcher_check_rejects_a_broken_config(breaker, where):
    config = _launcher()
    breaker(config)
    problems = launcher_problems(config)
    assert problems and any(where in p for p in problems), problems


# --- the Dockerfile and its build context --------------------------------------------------------

def dockerfile_instructions(text: str) -> list:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def copy_sources(text: str) -> list:
    sources = []
    for instr, args in dockerfile_instructions(text):
        if instr not in ("COPY", "ADD"):
            continue
        parts = [p for p in shlex.split(args)]
        if any(p.startswith("--from") for p in parts):
            continue
        paths = [p for p in parts if not p.startswith("--")]
        sources += paths[:-1]
    return sources


def _ignore_regex(pattern: str):
    regex = ""
    segments = pattern.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            regex += ".*" if last else "(?:[^/]+/)*"
            continue
        j = 0
        while j < len(seg):
            ch = seg[j]
            if ch == "*":
                regex += "[^/]*"
            elif ch == "?":
                regex += "[^/]"
            elif ch == "[" and "]" in seg[j:]:
                end = seg.index("]", j)
                body = seg[j + 1:end]
                regex += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
                j = end
            else:
                regex += re.escape(ch)
            j += 1
        regex += "" if last else "/"
    return re.compile(f"^{regex}$")


def dockerignore_excludes(rules_text: str, path: str) -> bool:
    """Docker's rules: patterns match a path or any folder above it, `!` re-includes, the
    last matching line wins."""
    rules = []
    for line in rules_text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        rules.append((negate, _ignore_regex(pattern.strip("/").removeprefix("./"))))
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerfile_sources_exist_and_are_in_the_build_context():
    rules = DOCKERIGNORE.read_text()
    sources = copy_sources(DOCKERFILE.read_text())
    assert {"pyproject.toml", "cogview_ray", "jobs", "configs"} <= set(sources)
    assert [s for s in sources if not (REPO / s).exists()] == []
    assert [s for s in sources if dockerignore_excludes(rules, s)] == []


def test_dockerignore_keeps_outputs_environments_caches_and_weights_out():
    rules = DOCKERIGNORE.read_text()
    for path in (
        "outputs/demo/images/000/a.png",
        ".venv/bin/python",
        ".cache/cogview-ray/models/x/model_index.json",
        "cogview_ray/__pycache__/config.cpython-311.pyc",
        "tests/__pycache__/x.pyc",
        ".git/HEAD",
        "configs/transformer/diffusion_pytorch_model.safetensors",
        "checkpoints/CogView3-Plus-3B/vae/diffusion_pytorch_model.bin",
        "model.ckpt",
        ".pytest_cache/v/cache/lastfailed",
        "cogview_ray.egg-info/PKG-INFO",
    ):
        assert dockerignore_excludes(rules, path), path
    for path in (
        "pyproject.toml",
        "cogview_ray/model/pipeline.py",
        "cogview_ray/assets/tokenizer/spiece.model",
        "jobs/render.py",
        "configs/demo_prompts.parquet",
    ):
        assert not dockerignore_excludes(rules, path), path


def test_dockerignore_matcher_and_copy_parser_can_fail():
    rules = "outputs\n**/*.bin\n!keep/*.bin\n*.py[cod]\n"
    assert dockerignore_excludes(rules, "outputs/x/y.png") and dockerignore_excludes(rules, "a/b/c.bin")
    assert not dockerignore_excludes(rules, "keep/w.bin") and not dockerignore_excludes(rules, "my_outputs/x")
    assert dockerignore_excludes(rules, "x.pyc") and not dockerignore_excludes(rules, "pkg/x.pyc")
    broken = "FROM base\nCOPY --chown=1:1 missing_dir ./x\nCOPY --from=builder /a /b\nCOPY a \\\n  b ./c/\n"
    assert copy_sources(broken) == ["missing_dir", "a", "b"]
    assert not (REPO / "missing_dir").exists()


def test_dockerfile_builds_a_non_root_cuda_pytorch_image_without_weights():
    text = DOCKERFILE.read_text()
    instructions = dockerfile_instructions(text)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    base = [a for i, a in instructions if i == "FROM"][0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base), base
    user = [a for i, a in instructions if i == "USER"][-1]
    user = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], user)
    assert user.split(":")[0] not in ("root", "0"), user
    runs = " ".join(a for i, a in instructions if i == "RUN")
    assert re.search(r"pip install (--[\w-]+ )*\.(\s|$)", runs)
    assert not re.search(r"huggingface|snapshot_download|\.safetensors|s3 cp|s3 sync", runs, re.I)
    workdir = [a for i, a in instructions if i == "WORKDIR"][-1]
    dests = {shlex.split(a)[-1].rstrip("/") for i, a in instructions if i == "COPY"}
    assert {"./jobs", "./configs"} <= dests and workdir.startswith("/home/")
