"""jobs/gpu_check.sh without a GPU: it parses, and its dry run lists every step with its time
limit inside the 8-minute budget, CogView4's share kept back from the CogView3-Plus benchmark."""
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "jobs" / "gpu_check.sh"


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_lists_each_step_within_the_budget(tmp_path):
    cmd = ["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "o"), "--ckpt", str(tmp_path / "c")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    steps = dict(re.findall(r"^\[(\w+)\] timeout (\d+)s", res.stdout, re.M))
    assert list(steps) == ["checkpoint", "gpu_tests", "benchmark", "benchmark_cogview4", "reference"]
    assert int(steps["gpu_tests"]) == 150 and int(steps["benchmark_cogview4"]) == 150
    assert int(steps["benchmark"]) == 480 - 150  # CogView4's share kept back
    cv4 = next(line for line in res.stdout.splitlines() if line.startswith("[benchmark_cogview4]"))
    assert "--random-init full-cogview4" in cv4 and "--scale-steps 50" in cv4 and "--height 1024" in cv4
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
