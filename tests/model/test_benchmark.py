"""jobs/benchmark.py on CPU: the MFU peak table picks the right device, percentiles and variants."""
import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "jobs" / "benchmark.py"
_spec = importlib.util.spec_from_file_location("benchmark_job", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


@pytest.mark.parametrize("name, bf16, fp32", [
    ("NVIDIA H100 80GB HBM3", 989.0, 67.0),
    ("NVIDIA H100 PCIe", 756.0, 51.0),
    ("NVIDIA H100 NVL", 835.0, 60.0),
    ("NVIDIA H200", 989.0, 67.0),
    ("NVIDIA H200 NVL", 835.0, 60.0),
    ("NVIDIA A100-SXM4-40GB", 312.0, 19.5),
    ("NVIDIA A100-SXM4-80GB", 312.0, 19.5),
    ("NVIDIA A100 80GB PCIe", 312.0, 19.5),
    ("NVIDIA L40S", 362.0, 91.6),
    ("NVIDIA L40", 181.0, 90.5),
    ("NVIDIA L4", 121.0, 30.3),
])
def test_peak_table_by_device_name(name, bf16, fp32):
    assert benchmark.peak_tflops(name, torch.bfloat16) == bf16
    assert benchmark.peak_tflops(name, torch.float32) == fp32


def test_unknown_device_has_no_peak():
    assert benchmark.peak_tflops("NVIDIA GeForce RTX 4090", torch.bfloat16) is None
    assert benchmark.peak_tflops("cpu", torch.float32) is None


def test_percentiles_and_variant_plan():
    runs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert (benchmark.percentile(runs, 50), benchmark.percentile(runs, 90)) == (3.0, 5.0)
    assert benchmark.plan_variants(["none", "default", "max-autotune"], ["auto", "math"]) == [
        ("none", "auto"), ("none", "math"), ("default", "auto"), ("max-autotune", "auto")]
    assert benchmark.plan_variants(["default"], ["auto", "math"]) == [("default", "auto"), ("default", "math")]


def test_scaled_time_scales_only_denoising():
    phases = {"text_encoding": 0.1, "denoising": 0.4, "decoding": 0.2}
    assert benchmark._scale(phases, 4, 50) == pytest.approx(0.1 + 5.0 + 0.2)
    assert benchmark._scale(phases, 4, None) == pytest.approx(0.7)
