"""The nightly manifests (infra/kuberay/cronjob.yaml, raycronjob.yaml) checked for what makes a night
bounded and loud: the tick reaches the job, the total deadline covers retries, only retryable exit
codes are retried, missed ticks do not pile up; and cronjob.yaml's wrapper script run for real
against a stub `kubectl` (a RayJob that fails must fail the Kubernetes Job)."""
import calendar
import copy
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from cogview_ray.nightly import MISSED_AFTER_S, RAYCRONJOB, SCHEDULED_AT_ENV, scheduled_tick
from tests.test_infra import KUBERAY, STAMP, crd_errors, load_docs, metadata_errors, ray_resources

pytestmark = pytest.mark.timeout(120)

DAY_S = 24 * 3600
RAYJOB_NAME_MAX = 47  # KubeRay appends suffixes to a RayJob's name for its own objects
MINUTE_DIGITS = 9  # a Unix minute has 8 digits until 2160; leave room for one more


def cron_docs() -> dict:
    return {d["kind"]: d for d in load_docs(KUBERAY / "cronjob.yaml")}


def template_text(docs: dict) -> str:
    return docs["ConfigMap"]["data"]["rayjob.yaml"]


def night_container(docs: dict) -> dict:
    return docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


def wrapper_script(docs: dict) -> str:
    command = night_container(docs)["command"]
    assert command[-2] == "-c", command
    return command[-1]


def raycronjob() -> dict:
    return [d for label, d in ray_resources() if d["kind"] == "RayCronJob"][0]


def cron_rayjob() -> dict:
    return [d for label, d in ray_resources() if label.startswith("cronjob.yaml:ConfigMap")][0]


def runtime_env_vars(spec: dict) -> dict:
    return (yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}).get("env_vars", {})


# --- the plain CronJob -----------------------------------------------------------------------------

def cronjob_problems(docs: dict) -> list:
    """What would let a night overlap the next, run unbounded, retry hopelessly, or fail silently."""
    problems = []
    spec = docs["CronJob"]["spec"]
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    container = night_container(docs)
    rayjob = yaml.safe_load(template_text(docs).replace("@STAMP@", STAMP))["spec"]
    if spec.get("concurrencyPolicy") != "Forbid":
        problems.append(f"concurrencyPolicy is {spec.get('concurrencyPolicy')!r}, not 'Forbid'")
    if not 0 < (spec.get("startingDeadlineSeconds") or 0) <= 3600:
        problems.append("startingDeadlineSeconds must bound a late start (at most an hour)")
    if not re.fullmatch(r"\d+ \d+ \* \* \*", spec.get("schedule", "")):
        problems.append("the schedule must be daily, at a fixed minute")
    deadline = job.get("activeDeadlineSeconds")
    if not isinstance(deadline, int) or not 0 < deadline < DAY_S:
        problems.append("the Job's activeDeadlineSeconds must bound the whole night below a day")
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    if env.get("NIGHT_DEADLINE_S") != str(deadline):
        problems.append("NIGHT_DEADLINE_S must equal the Job's activeDeadlineSeconds")
    if rayjob.get("backoffLimit", 0) != 0:
        problems.append("the RayJob must not retry itself (KubeRay retries every exit code and restarts its deadline)")
    if not isinstance(rayjob.get("activeDeadlineSeconds"), int) or rayjob["activeDeadlineSeconds"] > (deadline or 0):
        problems.append("the RayJob's activeDeadlineSeconds must not exceed the Job's")
    if not isinstance(job.get("backoffLimit"), int) or job["backoffLimit"] < 1:
        problems.append("the Job must retry a retryable failure at least once")
    if pod.get("restartPolicy") != "Never":
        problems.append("podFailurePolicy needs restartPolicy Never")
    if pod.get("serviceAccountName") != docs["ServiceAccount"]["metadata"]["name"]:
        problems.append("the pod does not run as the ServiceAccount")
    rules = (job.get("podFailurePolicy") or {}).get("rules", [])
    fail_codes = {code for r in rules if r.get("action") == "FailJob"
                  and (r.get("onExitCodes") or {}).get("operator") == "In"
                  and (r.get("onExitCodes") or {}).get("containerName") == container["name"]
                  for code in r["onExitCodes"].get("values", [])}
    if fail_codes != {2, 3, 4}:
        problems.append(f"podFailurePolicy fails the Job at once on exit codes {sorted(fail_codes)}, not 2, 3 and 4")
    if not any(r.get("action") == "Ignore" and {"type": "DisruptionTarget"} in (r.get("onPodConditions") or [])
               for r in rules):
        problems.append("an evicted pod should not use up the retry (Ignore DisruptionTarget)")
    grants = {(g, res, verb) for rule in docs["Role"]["rules"] for g in rule["apiGroups"]
              for res in rule["resources"] for verb in rule["verbs"]}
    needed = {("ray.io", "rayjobs", v) for v in ("create", "get", "delete")} | {("batch", "jobs", "get")}
    if not needed <= grants:
        problems.append(f"the Role lacks {sorted(needed - grants)}")
    binding = docs["RoleBinding"]
    if binding["roleRef"]["name"] != docs["Role"]["metadata"]["name"] or not any(
            s.get("name") == docs["ServiceAccount"]["metadata"]["name"] for s in binding.get("subjects", [])):
        problems.append("the RoleBinding does not bind the Role to the ServiceAccount")
    job_name = {e["name"]: e for e in container.get("env", [])}.get("JOB_NAME", {})
    if job_name.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != \
            "metadata.labels['batch.kubernetes.io/job-name']":
        problems.append("JOB_NAME must come from the pod's batch.kubernetes.io/job-name label")
    return problems


def test_cronjob_bounds_the_night_and_retries_only_retryable_exit_codes():
    docs = cron_docs()
    assert cronjob_problems(docs) == []
    assert [p for d in docs.values() for p in metadata_errors(d)] == []
    assert docs["CronJob"]["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 72000


def _set(path, value):
    def breaker(docs):
        node = docs
        for key in path[:-1]:
            node = node[key]
        if value is None:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return breaker


JOB = ("CronJob", "spec", "jobTemplate", "spec")
POD = (*JOB, "template", "spec")


def _rayjob_retries(docs):
    cm = docs["ConfigMap"]["data"]
    cm["rayjob.yaml"] = cm["rayjob.yaml"].replace("backoffLimit: 0", "backoffLimit: 1")


@pytest.mark.parametrize("breaker, expected", [
    (_set(("CronJob", "spec", "concurrencyPolicy"), "Allow"), "Forbid"),
    (_set(("CronJob", "spec", "startingDeadlineSeconds"), None), "startingDeadlineSeconds"),
    (_set((*JOB, "activeDeadlineSeconds"), None), "whole night"),
    (_set((*JOB, "activeDeadlineSeconds"), 2 * DAY_S), "whole night"),
    (_set((*JOB, "podFailurePolicy", "rules", 0, "onExitCodes", "values"), [2]), "not 2, 3 and 4"),
    (_set((*JOB, "podFailurePolicy"), None), "not 2, 3 and 4"),
    (_set((*JOB, "backoffLimit"), 0), "retry a retryable failure"),
    (_set((*POD, "restartPolicy"), "OnFailure"), "restartPolicy Never"),
    (_set((*POD, "serviceAccountName"), "default"), "ServiceAccount"),
    (_set(("Role", "rules", 1, "verbs"), []), "lacks"),
    (_rayjob_retries, "must not retry itself"),
])
def test_cronjob_check_rejects_a_broken_night(breaker, expected):
    docs = copy.deepcopy(cron_docs())
    breaker(docs)
    assert any(expected in p for p in cronjob_problems(docs)), cronjob_problems(docs)


def test_cronjob_passes_the_tick_that_names_the_night():
    docs = cron_docs()
    text = template_text(docs)
    assert text.count("@SCHEDULED_AT@") == 1 and text.count("@JOB_UID@") == 1
    filled = yaml.safe_load(text.replace("@STAMP@", STAMP).replace("@SCHEDULED_AT@", "2026-12-03T02:00:00Z"))
    env = runtime_env_vars(filled["spec"])
    assert scheduled_tick(None, environ=env) == dt.datetime(2026, 12, 3, 2, tzinfo=dt.timezone.utc)
    script = wrapper_script(docs)
    assert "batch\\.kubernetes\\.io/cronjob-scheduled-timestamp" in script and "creationTimestamp" in script


# --- the RayCronJob --------------------------------------------------------------------------------

def test_raycronjob_makes_one_bounded_attempt_and_passes_its_tick():
    cron = raycronjob()
    spec, template = cron["spec"], cron["spec"]["jobTemplate"]
    assert template.get("backoffLimit", 0) == 0  # KubeRay would retry exit 2 and 3 and restart the deadline
    assert 0 < template["activeDeadlineSeconds"] < DAY_S  # ended before the next daily tick
    assert re.fullmatch(r"\d+ \d+ \* \* \*", spec["schedule"])
    # no jobId: KubeRay's submission id is then `{name}-{minute}-{5 chars}`, which nightly.py reads
    assert "jobId" not in template
    assert runtime_env_vars(template) == {SCHEDULED_AT_ENV: RAYCRONJOB}
    assert len(cron["metadata"]["name"]) + 1 + MINUTE_DIGITS <= RAYJOB_NAME_MAX
    minute = calendar.timegm((2026, 12, 3, 2, 0, 0)) // 60
    ray_env = {**runtime_env_vars(template), "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(
        {"metadata": {"job_submission_id": f"{cron['metadata']['name']}-{minute}-b7x2q"}})}
    assert scheduled_tick(None, environ=ray_env) == dt.datetime(2026, 12, 3, 2, tzinfo=dt.timezone.utc)
    # a catch-up RayJob for a tick a day old is skipped by nightly.py: the deadline is shorter than that
    assert template["activeDeadlineSeconds"] < MISSED_AFTER_S


def test_nightly_definitions_agree():
    cron = raycronjob()["spec"]
    plain = cron_docs()["CronJob"]["spec"]
    stamped = copy.deepcopy(cron_rayjob()["spec"])
    # they differ only in how the tick reaches nightly.py
    assert stamped.pop("jobId") == f"cogview-nightly-{STAMP}"
    assert runtime_env_vars(stamped) == {SCHEDULED_AT_ENV: "@SCHEDULED_AT@"}
    stamped.pop("runtimeEnvYAML")
    template = {k: v for k, v in cron["jobTemplate"].items() if k != "runtimeEnvYAML"}
    assert template == stamped
    assert (cron["schedule"], cron.get("timeZone")) == (plain["schedule"], plain.get("timeZone"))
    assert plain["jobTemplate"]["spec"]["activeDeadlineSeconds"] == stamped["activeDeadlineSeconds"]
    assert template["entrypoint"] == "python jobs/nightly.py configs/cogview3plus.yaml"


# --- the wrapper script, run against a stub kubectl -----------------------------------------------

STUB = r'''
import json, os, re, sys

state_path = os.environ["STUB_STATE"]
state = json.load(open(state_path))
args = sys.argv[1:]
with open(os.environ["STUB_CALLS"], "a") as f:
    f.write(json.dumps(args) + "\n")

def save():
    json.dump(state, open(state_path, "w"))

def field(obj, path):
    for key in [k.replace("\\.", ".") for k in re.split(r"(?<!\\)\.", path.strip("{}").lstrip("."))]:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return "" if obj is None else str(obj)

verb = args[0]
if verb == "get":
    kind, name = args[1], args[2]
    obj = state["job"] if kind == "job" else state.get("rayjob")
    if "--ignore-not-found" in args:
        print(f"rayjob.ray.io/{name}" if obj else "")
        sys.exit(0)
    if obj is None:
        print(f'Error from server (NotFound): {kind}s "{name}" not found', file=sys.stderr)
        sys.exit(1)
    path = [a for a in args if a.startswith("jsonpath=")][0][len("jsonpath="):]
    if kind == "rayjob" and path == "{.status.jobDeploymentStatus}" and state.get("timeline"):
        obj["status"] = state["timeline"].pop(0)
        save()
    sys.stdout.write(field(obj, path))
elif verb == "create":
    import yaml  # only here: every call is a process start

    doc = yaml.safe_load(open(args[args.index("-f") + 1]))
    state["created"].append(doc)
    state["rayjob"] = dict(doc, status={})
    state["timeline"] = list(state.get("after_create", []))
    save()
    print(f"rayjob.ray.io/{doc['metadata']['name']} created")
elif verb == "delete":
    state["rayjob"] = None
    save()
else:
    sys.exit(f"stub kubectl: unexpected {args}")
'''

JOB_NAME = "cogview-nightly-29412345"
TICK = "2026-12-03T02:00:00Z"


def utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def done(status="SUCCEEDED", deployment="Complete", reason="", message=""):
    return {"jobDeploymentStatus": deployment, "jobStatus": status, "reason": reason, "message": message}


def failed(code=None, reason="AppFailed"):
    message = (f"Job entrypoint command failed with exit code {code}, last available logs (truncated to 20,000 "
               f"chars):\n[cogview-ray] nightly: some output\n" if code is not None else "Submitter job failed")
    return done("FAILED", "Failed", reason, message)


@pytest.fixture
def night(tmp_path):
    """Run cronjob.yaml's wrapper with `sh` and a stub kubectl; returns (exit code, stderr, state, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "kubectl"
    stub.write_text(f"#!{sys.executable}\n{STUB}")
    stub.chmod(0o755)
    docs = cron_docs()
    (tmp_path / "template").mkdir()
    (tmp_path / "template" / "rayjob.yaml").write_text(template_text(docs))
    script = wrapper_script(docs)

    def run(job=None, rayjob=None, after_create=(), timeline=(), started_ago_s=600.0):
        job = job or {"metadata": {"name": JOB_NAME, "uid": "0b1c2d3e-job-uid", "creationTimestamp": TICK,
                                   "annotations": {"batch.kubernetes.io/cronjob-scheduled-timestamp": TICK}},
                      "status": {"startTime": utc(time.time() - started_ago_s)}}
        state = {"job": job, "rayjob": rayjob, "after_create": list(after_create), "timeline": list(timeline),
                 "created": []}
        (tmp_path / "state.json").write_text(json.dumps(state))
        (tmp_path / "calls").write_text("")
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "JOB_NAME": job["metadata"]["name"],
               "NIGHT_DEADLINE_S": "72000", "RAYJOB_TEMPLATE": str(tmp_path / "template" / "rayjob.yaml"),
               "WORK_DIR": str(tmp_path), "POLL_S": "0", "STUB_STATE": str(tmp_path / "state.json"),
               "STUB_CALLS": str(tmp_path / "calls")}
        proc = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
        return proc.returncode, proc.stderr, json.loads((tmp_path / "state.json").read_text()), calls

    return run


def test_wrapper_creates_the_nights_rayjob_and_exits_0_when_it_succeeds(night):
    code, err, state, calls = night(after_create=[{"jobDeploymentStatus": "Running"}, done()], started_ago_s=600)
    assert code == 0, err
    [created] = state["created"]
    assert created["metadata"]["name"] == created["spec"]["jobId"] == JOB_NAME
    assert created["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": JOB_NAME, "uid": "0b1c2d3e-job-uid"}]
    assert runtime_env_vars(created["spec"]) == {SCHEDULED_AT_ENV: TICK}
    # what is left of the Job's 72000 s after 600 s, less the 300 s margin
    assert abs(created["spec"]["activeDeadlineSeconds"] - (72000 - 600 - 300)) <= 5
    assert created["spec"]["backoffLimit"] == 0
    assert crd_errors(created) == []
    assert "RayJob Complete: job SUCCEEDED" in err


@pytest.mark.parametrize("outcome, expected", [
    (failed(1), 1),  # shards failed: the Job retries on a fresh cluster
    (failed(2), 2),  # configuration: podFailurePolicy fails the Job at once
    (failed(3), 3),  # locked by another driver
    (failed(None, reason="SubmissionFailed"), 1),  # no driver exit code: the cluster or submission failed
    (failed(None, reason="DeadlineExceeded"), 4),  # out of the night's time
    (done("STOPPED", "Complete"), 1),  # stopped by hand: not a rendered night
])
def test_a_failed_rayjob_fails_the_pod_with_the_nights_exit_code(night, outcome, expected):
    code, err, state, _ = night(after_create=[outcome])
    assert code == expected, err
    assert len(state["created"]) == 1


def test_a_manual_job_is_named_by_its_creation_time(night):
    job = {"metadata": {"name": "cogview-nightly-manual", "uid": "u", "creationTimestamp": "2026-12-03T09:15:00Z"},
           "status": {"startTime": utc(time.time() - 60)}}
    code, err, state, _ = night(job=job, after_create=[done()])
    assert code == 0, err
    assert runtime_env_vars(state["created"][0]["spec"]) == {SCHEDULED_AT_ENV: "2026-12-03T09:15:00Z"}
    assert state["created"][0]["metadata"]["name"] == "cogview-nightly-manual"


def test_a_retry_replaces_the_failed_attempt_and_an_evicted_pods_successor_adopts_a_running_one(night):
    code, err, state, calls = night(rayjob={"metadata": {"name": JOB_NAME}, "status": failed(1)},
                                    timeline=[failed(1)], after_create=[done()])
    assert code == 0, err
    verbs = [c[0] for c in calls]
    assert verbs.index("delete") < verbs.index("create") and len(state["created"]) == 1
    # the earlier pod was evicted while its RayJob ran: wait for that one, create none
    code, err, state, calls = night(rayjob={"metadata": {"name": JOB_NAME}, "status": {}},
                                    timeline=[{"jobDeploymentStatus": "Running"}, done()])
    assert code == 0, err
    assert state["created"] == [] and "adopting" in err and "delete" not in [c[0] for c in calls]
    # the earlier pod's RayJob had already rendered the night
    code, err, state, calls = night(rayjob={"metadata": {"name": JOB_NAME}, "status": done()})
    assert code == 0 and state["created"] == [] and "delete" not in [c[0] for c in calls], err


def test_no_rayjob_is_started_when_the_nights_deadline_has_passed(night):
    code, err, state, _ = night(started_ago_s=72000 - 100, after_create=[done()])
    assert code == 4 and state["created"] == [] and "no time left" in err


@pytest.mark.parametrize("stamp", ["1970-01-01T00:00:00Z", "2000-02-29T23:59:59Z", "2026-12-03T02:00:05Z",
                                   "2028-03-01T00:00:00Z", "2099-12-31T08:09:07Z"])
def test_the_wrappers_time_arithmetic_matches_python(stamp):
    script = wrapper_script(cron_docs())
    func = re.search(r"^utc_seconds\(\) \{\n.*?^\}\n", script, re.S | re.M).group(0)
    out = subprocess.run(["sh", "-c", f'{func}utc_seconds "$1"', "sh", stamp], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
