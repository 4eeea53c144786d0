"""The fault plan (`cogview_ray.testing.faults`) without Ray: typed rules, refusals that name the key,
the `nan` pipeline wrapper, firing caps shared across processes, traces and driver exits."""
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from cogview_ray.testing.faults import (DriverRule, FaultPlan, FaultSpecError, NanPipeline, StorageRule, WorkerRule,
                                        parse_env, parse_spec)


def _row(prompt, status="pending", index=0):
    return SimpleNamespace(prompt=prompt, status=status, file="in.parquet", row_index=index)


def test_rules_of_the_fault_tests_parse_to_typed_rules(tmp_path):
    spec = parse_spec({
        "rules": [{"match": "", "action": "slow", "seconds": 0.3}, {"match": "HANG", "action": "hang", "times": 1},
                  {"match": "NANROW", "action": "nan"}, {"match": "", "action": "oom", "batch_over": 1},
                  {"point": "after_manifest"}, {"point": "before_manifest", "shard": "f00000-000001", "times": 2}],
        "state_dir": str(tmp_path), "trace_dir": str(tmp_path),
        "storage": {"persistent_after": 2, "ops": ["write"], "paths": ["/manifest/"]}})
    assert spec.rules == (
        WorkerRule("slow", "", "batch", None, 0.3, 0), WorkerRule("hang", "HANG", "batch", 1, 3600.0, 0),
        WorkerRule("nan", "NANROW"), WorkerRule("oom", "", "batch", None, 0.0, 1),
        DriverRule("after_manifest", None, "exit", None), DriverRule("before_manifest", "f00000-000001", "exit", 2))
    assert spec.storage == StorageRule(every=0, persistent_after=2, ops=("write",), paths=("/manifest/",))
    assert parse_spec({"rules": [{"action": "slow"}]}).rules[0].seconds == 1.0
    with pytest.raises(Exception):
        spec.rules[0].action = "raise"  # frozen


@pytest.mark.parametrize("spec, message", [
    ({"rules": [{"match": "X", "acton": "raise"}]}, "rules[0] (a worker rule) has unknown key 'acton'"),
    ({"rules": [{"match": "X"}]}, "rules[0] has no 'action'"),
    ({"rules": [{"match": "X", "action": "explode"}]}, "'action' is 'explode', not one of raise, exit, hang"),
    ({"rules": [{"action": "raise", "scope": "row"}]}, "'scope' is 'row', not one of batch, shard"),
    ({"rules": [{"action": "raise", "times": "2"}]}, "'times' must be an integer, not '2'"),
    ({"rules": [{"action": "raise", "times": True}]}, "'times' must be an integer, not True"),
    ({"rules": [{"action": "raise", "times": -1}], "state_dir": "/x"}, "'times' must be >= 0"),
    ({"rules": [{"action": "hang", "seconds": "long"}]}, "'seconds' must be a number"),
    ({"rules": [{"action": "raise", "seconds": 5}]}, "'seconds' does nothing for action 'raise'"),
    ({"rules": [{"action": "slow", "batch_over": 2}]}, "'batch_over' does nothing for action 'slow'"),
    ({"rules": [{"action": "nan", "times": 1}], "state_dir": "/x"}, "'times' does nothing for action 'nan'"),
    ({"rules": [{"match": 3, "action": "raise"}]}, "'match' must be a string, not 3"),
    ({"rules": [{"point": "after_marker"}]}, "'point' is 'after_marker', not one of before_manifest, after_manifest"),
    ({"rules": [{"point": "after_manifest", "match": "X"}]}, "rules[0] (a driver rule) has unknown key 'match'"),
    ({"rules": [{"point": "after_manifest", "action": "raise"}]}, "'action' is 'raise', not one of exit"),
    ({"rules": [{"action": "raise", "times": 2}]}, "rules with 'times' need a 'state_dir'"),
    ({"rules": [{"action": "raise"}, "raise"]}, "rules[1] must be a JSON object"),
    ({"rules": {"match": "X"}}, "'rules' must be a list"),
    ({"trace-dir": "/tmp/t"}, "COGVIEW_RAY_FAULTS has unknown key 'trace-dir'"),
    ({"storage": {"every": 2, "paths": "/manifest/"}}, "storage: 'paths' must be a list"),
    ([], "COGVIEW_RAY_FAULTS must hold a JSON object, not list"),
])
def test_a_malformed_rule_is_refused_with_a_sentence_naming_the_key(spec, message):
    with pytest.raises(FaultSpecError) as info:
        parse_spec(spec)
    assert message in str(info.value) and str(info.value).endswith(".")


def test_invalid_json_is_refused():
    with pytest.raises(FaultSpecError, match="COGVIEW_RAY_FAULTS is not valid JSON"):
        parse_env("{rules: []")


@dataclass
class _Result:
    images: list
    finite: list = field(default_factory=list)


class _FakePipeline:
    identity = {"config_hash": "abc"}

    def generate(self, prompts, seeds, height, width, **kwargs):
        return _Result([f"img-{s}" for s in seeds], [p != "already broken" for p in prompts])


def test_nan_rule_wraps_generate_and_marks_matching_rows_non_finite():
    plan = FaultPlan(parse_spec({"rules": [{"match": "NANROW", "action": "nan"}, {"match": "X", "action": "raise"}]}))
    pipe = plan.wrap_pipeline(_FakePipeline())
    assert isinstance(pipe, NanPipeline) and pipe.identity == {"config_hash": "abc"}  # the rest is delegated
    res = pipe.generate(["a house", "NANROW a house", "already broken"], [1, 2, 3], 64, 64, guidance_scale=5.0)
    assert res.finite == [True, False, False] and res.images == ["img-1", "img-2", "img-3"]
    plan.before_batch([_row("NANROW a house")])  # nan is not a before-batch fault: nothing raised
    no_nan = _FakePipeline()
    assert FaultPlan(parse_spec({"rules": [{"action": "slow"}]})).wrap_pipeline(no_nan) is no_nan


def test_rules_fire_on_pending_rows_in_their_scope_and_times_is_shared_across_processes(tmp_path):
    spec = parse_spec({"rules": [{"match": "POISON", "action": "raise", "times": 2},
                                 {"match": "SHARD", "action": "raise", "scope": "shard"}],
                       "state_dir": str(tmp_path / "state"), "trace_dir": str(tmp_path / "trace")})
    (tmp_path / "state").mkdir()
    (tmp_path / "trace").mkdir()
    first, second = FaultPlan(spec), FaultPlan(spec)  # two processes share the state folder
    first.before_batch([_row("POISON", status="rejected")])  # a rejected row is never rendered
    first.before_batch([_row("SHARD a house")])  # a shard-scoped rule does not fire per batch
    with pytest.raises(RuntimeError, match="injected fault: rendering crashed on a prompt matching 'SHARD'"):
        first.before_shard("s0", [_row("SHARD a house")])
    with pytest.raises(RuntimeError, match="'POISON'"):
        first.before_batch([_row("ok"), _row("POISON a house")])
    with pytest.raises(RuntimeError, match="'POISON'"):
        second.before_batch([_row("POISON a house")])
    second.before_batch([_row("POISON a house")])  # used up: times=2 across both
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["rule0-0", "rule0-1"]
    trace = [json.loads(line) for line in next((tmp_path / "trace").glob("*.jsonl")).read_text().splitlines()]
    assert [(e["event"], e["match"]) for e in trace] == [("fault", "SHARD"), ("fault", "POISON"), ("fault", "POISON")]


def test_oom_fires_only_for_batches_larger_than_batch_over():
    import torch

    plan = FaultPlan(parse_spec({"rules": [{"action": "oom", "batch_over": 1}]}))
    plan.before_batch([_row("a")])
    with pytest.raises(torch.cuda.OutOfMemoryError):
        plan.before_batch([_row("a"), _row("b")])


def test_worker_trace_events_carry_the_worker_id(tmp_path):
    plan = FaultPlan(parse_spec({"trace_dir": str(tmp_path)}))
    plan.worker_started("w01.2")
    plan.worker_ready("w01.2")
    plan.shard_started("f00000-000003", 2)
    plan.after_batch([_row("a", index=4), _row("b", index=5)])
    events = [json.loads(line) for line in next(tmp_path.glob("*.jsonl")).read_text().splitlines()]
    assert [{k: v for k, v in e.items() if k not in ("t", "pid")} for e in events] == [
        {"event": "init", "worker_id": "w01.2"}, {"event": "ready", "worker_id": "w01.2"},
        {"event": "shard", "worker_id": "w01.2", "shard": "f00000-000003", "attempt": 2},
        {"event": "rendered", "worker_id": "w01.2", "rows": [["in.parquet", 4], ["in.parquet", 5]]}]


def test_a_driver_rule_kills_the_driver_at_its_point_and_shard_only():
    script = textwrap.dedent('''
        from cogview_ray.testing.faults import FaultPlan, parse_spec
        plan = FaultPlan(parse_spec({"rules": [{"point": "after_manifest", "shard": "s1"}]}))
        plan.at_driver("after_manifest", "s0")
        plan.at_driver("before_manifest", "s1")
        print("alive", flush=True)
        plan.at_driver("after_manifest", "s1")
        print("survived", flush=True)
    ''')
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (137, "alive\n"), proc.stderr
