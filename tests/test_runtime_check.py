"""The run's runtime identity: recorded once at the first worker load, every later load (this run
or a resumed one) compared with it; refused with what differs, or said and accepted with force."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogview_ray import layout
from cogview_ray import manifest as mf
from cogview_ray.config import load_config
from cogview_ray.driver import Driver
from cogview_ray.errors import RunRefused
from cogview_ray.identity import runtime_identity
from cogview_ray.pool import Loaded
from cogview_ray.runtime_check import check_runtime, describe_runtime, read_runtime
from cogview_ray.storage import RunStore
from cogview_ray.verify import verify_run

pytestmark = pytest.mark.timeout(60)

PIPELINE = {"family": "CogView3PlusPipeline", "compile": "none", "attention": "flash", "dtype": "bfloat16"}


def info(worker_id="w00.0", device="NVIDIA H100 80GB HBM3", torch_version="2.6.0", **pipeline):
    runtime = runtime_identity({**PIPELINE, **pipeline}, torch_version, device, 90100)
    return {"worker_id": worker_id, "node": "node-a", "runtime": runtime}


@pytest.fixture
def store(tmp_path):
    return RunStore(str(tmp_path / "out"), "run1")


def test_the_first_load_records_the_runtime_once_and_equal_ones_pass(store):
    said = []
    check_runtime(store, info(), False, said.append)
    recorded = json.loads(store.read(layout.RUNTIME))
    assert recorded["runtime"] == {"compile": "none", "attention": "flash", "dtype": "bfloat16", "torch": "2.6.0",
                                   "cudnn": 90100, "device": "NVIDIA H100 80GB HBM3"}
    assert (recorded["worker_id"], recorded["node"]) == ("w00.0", "node-a")
    assert said == ["runtime torch 2.6.0, cuDNN 90100, NVIDIA H100 80GB HBM3, attention flash, compile none, "
                    "bfloat16"]
    check_runtime(store, info("w01.0"), False, said.append)  # same runtime: nothing to say
    assert len(said) == 1 and json.loads(store.read(layout.RUNTIME)) == recorded


def test_a_worker_on_another_device_in_the_same_run_is_refused(store):
    check_runtime(store, info(), False, print)
    with pytest.raises(RunRefused) as e:
        check_runtime(store, info("w01.0", device="NVIDIA A100-SXM4-80GB"), False, print)
    msg = str(e.value)
    assert "worker w01.0 on node-a renders with another runtime" in msg
    assert 'device: "NVIDIA H100 80GB HBM3" -> "NVIDIA A100-SXM4-80GB"' in msg and "resume=force" in msg


def test_a_resume_with_other_versions_or_backend_names_each_difference(store, tmp_path):
    check_runtime(store, info(), False, print)
    resumed = RunStore(str(tmp_path / "out"), "run1")  # a later driver on the same run folder
    with pytest.raises(RunRefused) as e:
        check_runtime(resumed, info(torch_version="2.7.1", attention="cudnn", compile="max-autotune"), False, print)
    msg = str(e.value)
    for change in ('attention: "flash" -> "cudnn"', 'compile: "none" -> "max-autotune"',
                   'torch: "2.6.0" -> "2.7.1"'):
        assert change in msg
    assert "dtype" not in msg  # unchanged settings are not named


def test_force_says_what_differs_and_goes_on(store):
    check_runtime(store, info(), False, print)
    said = []
    check_runtime(store, info("w03.1", dtype="float32"), True, said.append)
    assert said == ['worker w03.1 on node-a renders with another runtime than the run recorded, going on '
                    '(resume=force): dtype: "bfloat16" -> "float32"']
    assert read_runtime(store)["dtype"] == "bfloat16"  # the record is never rewritten


def test_an_unreadable_record_is_refused_and_a_worker_without_runtime_is_not_held(store):
    check_runtime(store, {"worker_id": "w00.0"}, False, print)
    assert not store.exists(layout.RUNTIME)
    store.write(layout.RUNTIME, b"not json")
    with pytest.raises(RunRefused, match="_runtime.json is unreadable"):
        check_runtime(store, info(), False, print)


def test_the_driver_checks_each_loaded_worker(tmp_path):
    pq.write_table(pa.table({"prompt": ["p0"]}), str(tmp_path / "p.parquet"))
    cfg = load_config(None, [f"dataset.uri={tmp_path}/p.parquet", "model.path=x", f"output.uri={tmp_path}/out"])
    out = []
    driver = Driver(cfg, out=type("W", (), {"write": lambda self, s: out.append(s), "flush": lambda self: None})())
    driver.store = RunStore(str(tmp_path / "out"), "run1")
    loaded = {"node": "node-a", "device": "cpu", "load_s": 1.0, "compile_s": 0.0, "limits": None}
    driver._handle(Loaded("w00.0", {**loaded, **info()}), None, None, None)
    assert read_runtime(driver.store)["device"] == "NVIDIA H100 80GB HBM3"
    assert any("runtime torch 2.6.0" in line for line in out)
    with pytest.raises(RunRefused, match='device: "NVIDIA H100 80GB HBM3" -> "cpu"'):
        driver._handle(Loaded("w01.0", {**loaded, **info("w01.0", device="cpu")}), None, None, None)


def test_verify_prints_the_runtime_when_recorded(store):
    mf.write_run_info(store, {"config": {}})
    assert verify_run(store.url()).runtime is None  # runs made before `_runtime.json`
    check_runtime(store, info(attention="math", dtype="float32", device="cpu"), False, print)
    report = verify_run(store.url())
    assert report.runtime == describe_runtime(read_runtime(store))
    assert "  runtime  torch 2.6.0, cuDNN 90100, cpu, attention math, compile none, float32" in report.summary()
