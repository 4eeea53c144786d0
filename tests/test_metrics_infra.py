"""The metrics' ops side without Ray: every PromQL expression of the Grafana dashboard names only
metrics that cogview_ray/metrics.py defines (as Ray exports them), the PodMonitor selects the pods
of infra/kuberay/raycluster.yaml, and RunMetrics turns running totals into counter increments."""
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from cogview_ray import metrics
from cogview_ray.metrics import DEFINITIONS, RunMetrics, exported_name, record_device_memory

INFRA = Path(__file__).resolve().parents[1] / "infra"
DASHBOARD = INFRA / "grafana" / "cogview-ray-dashboard.json"
PODMONITOR = INFRA / "kuberay" / "podmonitor.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"

# PromQL words that are not metric names
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile",
                "label_values", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "clamp_min", "clamp_max", "topk", "bottomk", "vector", "scalar", "offset"}


def exported_series() -> set[str]:
    """Every series name Prometheus can see from metrics.py (histograms as _bucket/_sum/_count)."""
    out = set()
    for name, (kind, _, _) in DEFINITIONS.items():
        full = exported_name(name)
        out |= {full + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {full}
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: what is left once strings, label matchers,
    ranges, groupings, numbers and PromQL's own words are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)
    text = re.sub(r"\blabel_values\(([^,)]*),[^)]*\)", r"\1", text)  # Grafana's: (metric, label)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {w for w in words if w not in PROMQL_WORDS}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if var["type"] == "query":
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def test_metric_names_is_strict():
    assert metric_names('sum by (le) (rate(a_bucket{run_id=~"$run_id"}[5m])) / b') == {"a_bucket", "b"}
    assert metric_names("histogram_quantile(0.9, c)") == {"c"}
    assert metric_names("label_values(d, run_id)") == {"d"}


def test_every_dashboard_expression_names_only_metrics_we_export():
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    allowed = exported_series()
    used = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names and names <= allowed, (expr, names - allowed)
        used |= names
    # the list: images/s, rows by status, queue depth, ETA, latency, replacements, memory
    for name in ("images_per_second", "rows", "shards_queued", "rows_queued", "shard_latency_seconds",
                 "worker_replacements", "worker_device_memory_bytes"):
        assert any(u.startswith(f"ray_cogview_{name}") for u in used), name
    assert any("histogram_quantile(0.9," in e for e in exprs) and any("histogram_quantile(0.5," in e for e in exprs)


def test_exported_names_follow_rays_exporter():
    # as read from a real node's endpoint (tests/test_elastic.py): ray_ first, _total on counters
    assert exported_name("cogview_rows") == "ray_cogview_rows_total"
    assert exported_name("cogview_shards_queued") == "ray_cogview_shards_queued"
    assert exported_name("cogview_shard_latency_seconds") == "ray_cogview_shard_latency_seconds"
    assert all(not n.endswith("_total") for n in DEFINITIONS)  # else Ray would export _total_total


def _pod_labels(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", [])
    return [g["template"]["metadata"]["labels"] for g in groups]


def test_podmonitor_selects_the_head_and_every_worker_pod_on_the_metrics_port():
    (pm,) = [d for d in yaml.safe_load_all(PODMONITOR.read_text()) if d]
    (cluster,) = [d for d in yaml.safe_load_all(RAYCLUSTER.read_text()) if d and d.get("kind") == "RayCluster"]
    assert (pm["apiVersion"], pm["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    selector = pm["spec"]["selector"]
    assert set(selector) == {"matchLabels"} and selector["matchLabels"]
    labels = _pod_labels(cluster)
    assert len(labels) >= 2  # head + the GPU group
    for pod in labels:
        assert all(pod.get(k) == v for k, v in selector["matchLabels"].items()), pod
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint.get("path", "/metrics") == "/metrics"


class FakeMetric:
    def __init__(self):
        self.calls = []

    def inc(self, n, tags):
        self.calls.append(("inc", n, tags))

    def set(self, v, tags):
        self.calls.append(("set", v, tags))

    def observe(self, v, tags):
        self.calls.append(("observe", v, tags))


def _update(m, **kw):
    args = dict(row_counts={"ok": 0, "failed": 0, "rejected": 0}, shard_counts={"ok": 0, "failed": 0}, replaced=0,
                rows_queued=8, shards_queued=2, in_flight=1, ready=1, loading=1, images_per_s=0.5)
    args.update(kw)
    m.update(**args)


def test_run_metrics_count_what_changed_and_tag_the_run():
    m = RunMetrics("r1", enabled=False)  # then given fakes in place of Ray's metrics
    m.enabled, m._m = True, {n: FakeMetric() for n in DEFINITIONS}
    _update(m, row_counts={"ok": 3, "failed": 0, "rejected": 1})
    _update(m, row_counts={"ok": 7, "failed": 0, "rejected": 1}, replaced=2)
    rows = m._m["cogview_rows"].calls
    assert rows == [("inc", 3, {"run_id": "r1", "status": "ok"}), ("inc", 1, {"run_id": "r1", "status": "rejected"}),
                    ("inc", 4, {"run_id": "r1", "status": "ok"})]
    assert m._m["cogview_worker_replacements"].calls == [("inc", 2, {"run_id": "r1"})]
    assert m._m["cogview_workers"].calls[-2:] == [("set", 1, {"run_id": "r1", "state": "ready"}),
                                                  ("set", 1, {"run_id": "r1", "state": "loading"})]
    m.shard_latency(-1.0)  # a clock step never records a negative latency
    assert m._m["cogview_shard_latency_seconds"].calls == [("observe", 0.0, {"run_id": "r1"})]


def test_without_ray_metrics_are_no_ops(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not importable
    m = RunMetrics("r1")
    assert not m.enabled and m._m == {}
    _update(m)
    m.shard_latency(3.0)
    record_device_memory("r1", "w00.0", "cpu")
    assert metrics._device_gauge is None


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_every_metric_is_documented_in_the_readme(name):
    readme = (INFRA.parent / "README.md").read_text()
    assert f"`{exported_name(name)}`" in readme
