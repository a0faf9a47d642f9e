"""A short overload soak (bench/soak.py) on the shared cluster: 2x the saturation rate for 20 s.

One model (code-6l, capacity 9 at 64 MiB) behind a replica that takes 12 streams at once and lets
8 more wait, so the engine's own queue is used too and the rest of the overload must be refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from deployments.app import build_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import soak  # noqa: E402
from prompts import load_prompts  # noqa: E402

MODEL = "helios-demo-code-6l"
CONFIG = soak.SoakConfig(model=MODEL, max_tokens=8, seconds=20, saturation_seconds=6, warmup_seconds=4,
                         concurrency=12, timeout_s=60)


@pytest.fixture(scope="module")
def soak_url(serve_cluster, tmp_path_factory):
    # A registry of the one model the soak loads: the app deploys (and loads) nothing else.
    doc = yaml.safe_load((ROOT / "models" / "registry.yaml").read_text())
    [entry] = [m for m in doc["models"] if m["name"] == MODEL]
    entry["path"] = str(ROOT / "models" / entry["path"])
    registry = tmp_path_factory.mktemp("soak") / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": [entry]}))
    # float32: in bf16 this torch build's CPU kernels hold memory per new matmul shape, so the replica's
    # RSS keeps growing through a 20 s soak (~140 MiB after warm-up here) and would hide a real leak.
    args = soak.app_args(str(registry), "64MiB", max_ongoing=12, max_queued=8) | {"dtype": "float32"}
    serve.run(build_app(args), name="soak", route_prefix="/soak")
    yield f"{serve_cluster.url}/soak"
    serve.delete("soak")


def test_overload_gets_complete_answers_or_503_within_budget_and_without_leak(soak_url):
    prompts = [r["prompt"] for r in load_prompts("code")[:16]]
    r = soak.run_soak(soak_url, "soak", CONFIG, prompts, log=lambda m: print(m, file=sys.stderr))
    soak.print_table(r)

    # Every response is a complete answer or a refusal with Retry-After: no other status, no cut
    # stream, no hang. And the load was an overload: some requests were refused, some completed.
    assert r["complete"] + r["rejected_503"] + r["rejected_429"] == r["sent"], r["problems"]
    assert r["incomplete"] == r["errors"] == r["timeouts"] == 0
    assert r["rejected_503"] > 0 and r["complete"] > 0 and r["streams"] > 0
    assert set(r["saturation"]["kinds"]) <= {"complete", "rejected"}, r["saturation"]["problems"]

    # The replica stayed within its batch capacity and memory budget at every sample, under load.
    overload = [s for s in r["sample_log"] if s["phase"] == "overload"]
    assert len(overload) >= 10 and max(s["running"] for s in overload) > 0
    assert r["running_over_capacity"] == 0 and r["memory_over_budget"] == 0
    assert r["max_memory_bytes"] <= r["memory_budget"] == 64 << 20
    assert not r["replica_restarted"]

    # No leak: resident memory after warm-up to the end grows by less than a loose bound.
    assert r["rss_mib"]["growth_after_warmup"] < 50, r["rss_mib"]

    # Afterwards the server answers normally and the replica holds no request.
    assert r["after"]["kind"] == "complete", r["after"]
    assert r["idle_after"] is not None
