"""Files under cluster/: the Grafana dashboard queries only metrics Helios exports."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def declared_metrics() -> set[str]:
    """Names passed to ray.serve.metrics Counter/Gauge/Histogram in deployments/."""
    names = set()
    for path in (ROOT / "deployments").glob("*.py"):
        names |= set(re.findall(r'metrics\.(?:Counter|Gauge|Histogram)\(\s*"(\w+)"', path.read_text()))
    return names


def test_grafana_dashboard_uses_exported_metrics_only():
    dash = json.loads((ROOT / "cluster" / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(total|bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_(helios_\w+)", e)}
    declared = declared_metrics()
    assert used and used <= declared, used - declared
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
