"""`cogview_ray.hooks`: the no-op default, loading hooks by dotted path, one-sentence refusals, the
fault-plan fallback, and that the product never imports the test doubles in `cogview_ray.testing`."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from cogview_ray.config import ConfigError
from cogview_ray.hooks import FAULTS_ENV, FORWARDED_ENV, HOOKS_ENV, Hooks, HooksError, load_hooks

HOOKS_MODULE = '''
from cogview_ray.hooks import Hooks

class Recorder(Hooks):
    def __init__(self, tag="class"):
        self.tag, self.calls = tag, []

    def before_batch(self, rows):
        self.calls.append(("before_batch", list(rows)))

def make():
    return Recorder("factory")

NOT_CALLABLE = 3

def not_hooks():
    return {"a": 1}
'''


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(HOOKS_ENV, raising=False)
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    return monkeypatch


@pytest.fixture
def hooks_module(tmp_path, clean_env):
    (tmp_path / "my_drill_hooks.py").write_text(HOOKS_MODULE)
    clean_env.syspath_prepend(str(tmp_path))
    yield "my_drill_hooks"
    sys.modules.pop("my_drill_hooks", None)


def test_unset_gives_the_no_op_hooks(clean_env):
    hooks = load_hooks()
    assert type(hooks) is Hooks
    pipeline = object()
    assert hooks.wrap_pipeline(pipeline) is pipeline
    assert [hooks.worker_started("w"), hooks.worker_ready("w"), hooks.shard_started("s", 1),
            hooks.before_shard("s", []), hooks.before_batch([]), hooks.after_batch([]),
            hooks.at_driver("before_manifest", "s")] == [None] * 7
    assert set(FORWARDED_ENV) == {HOOKS_ENV, FAULTS_ENV, "COGVIEW_RAY_CACHE"}


def test_dotted_path_to_a_class_or_a_factory_is_loaded_and_cached(hooks_module, clean_env):
    clean_env.setenv(HOOKS_ENV, f"{hooks_module}:Recorder")
    hooks = load_hooks()
    assert type(hooks).__name__ == "Recorder" and hooks.tag == "class"
    hooks.before_batch(["row"])
    assert load_hooks() is hooks and hooks.calls == [("before_batch", ["row"])]  # one per process
    clean_env.setenv(HOOKS_ENV, f"{hooks_module}:make")
    fresh = load_hooks()
    assert fresh is not hooks and fresh.tag == "factory"  # a changed variable is read again


@pytest.mark.parametrize("path, message", [
    ("my_drill_hooks.Recorder", "is not of the form package.module:attr"),
    ("my_drill_hooks:", "is not of the form package.module:attr"),
    ("no_such_pkg.hooks:Recorder", "module 'no_such_pkg.hooks' could not be imported (ModuleNotFoundError"),
    ("my_drill_hooks:Missing", "module 'my_drill_hooks' has no class or factory 'Missing'"),
    ("my_drill_hooks:NOT_CALLABLE", "has no class or factory 'NOT_CALLABLE'"),
    ("my_drill_hooks:not_hooks", "gave a dict, not a cogview_ray.hooks.Hooks"),
])
def test_a_bad_path_is_refused_in_one_sentence(hooks_module, clean_env, path, message):
    clean_env.setenv(HOOKS_ENV, path)
    with pytest.raises(HooksError) as info:
        load_hooks()
    text = str(info.value)
    assert message in text and text.startswith(f"{HOOKS_ENV}=") and "\n" not in text
    assert isinstance(info.value, ConfigError)  # the CLI prints it as one error line, exit code 2


def test_faults_alone_load_the_fault_plan_and_hooks_take_precedence(hooks_module, clean_env, tmp_path):
    from cogview_ray.testing import FaultPlan

    clean_env.setenv(FAULTS_ENV, json.dumps({"rules": [{"match": "X", "action": "raise"}]}))
    plan = load_hooks()
    assert type(plan) is FaultPlan and plan.spec.rules[0].match == "X"
    clean_env.setenv(HOOKS_ENV, f"{hooks_module}:Recorder")
    assert type(load_hooks()).__name__ == "Recorder"


def test_a_malformed_fault_plan_is_refused_by_load_hooks(clean_env):
    clean_env.setenv(FAULTS_ENV, json.dumps({"rules": [{"match": "X", "acton": "raise"}]}))
    with pytest.raises(HooksError, match="rules\\[0\\] \\(a worker rule\\) has unknown key 'acton'"):
        load_hooks()


PROBE = textwrap.dedent('''
    import json, sys
    import fsspec
    import cogview_ray.driver, cogview_ray.worker
    from cogview_ray.hooks import load_hooks
    before = {"testing": "cogview_ray.testing" in sys.modules, "faulty": "faulty" in fsspec.registry}
    hooks = load_hooks()
    after = {"testing": "cogview_ray.testing" in sys.modules, "faulty": "faulty" in fsspec.registry}
    print(json.dumps({"before": before, "after": after, "hooks": type(hooks).__name__}))
''')


def _probe(**env) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("COGVIEW_RAY_")}
    proc = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_product_imports_no_test_doubles_and_registers_no_faulty_filesystem():
    # a clean interpreter: this test process has imported cogview_ray.testing already
    clean = _probe()
    assert clean == {"before": {"testing": False, "faulty": False},
                     "after": {"testing": False, "faulty": False}, "hooks": "Hooks"}
    # only a fault plan in the environment brings them in (and registers faulty://)
    drill = _probe(**{FAULTS_ENV: json.dumps({"rules": []})})
    assert drill == {"before": {"testing": False, "faulty": False},
                     "after": {"testing": True, "faulty": True}, "hooks": "FaultPlan"}
