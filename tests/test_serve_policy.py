"""The HELIOS policy driving the Serve app under HTTP traffic: profiling moves traffic (and a queued
burst) from model to model, then the chosen model is partially loaded while requests keep arriving;
none fails."""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from ray import serve  # noqa: E402

from deployments.app import build_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from prompts import load_prompts  # noqa: E402


@pytest.fixture(scope="module")
def client(serve_cluster):
    # max_num_seqs 8: the first candidate runs 8 of the burst at once, so there is a queue to hand on.
    serve.run(build_app({"registry": str(ROOT / "models" / "registry.yaml"), "memory_budget": "64MiB",
                         "dtype": "float32", "max_tokens": 32, "max_num_seqs": 8,
                         # breach_limit 99 of 100: the depth chosen stays (no breach-triggered load), so
                         # the replicas can be checked against it
                         "policy": {"profile_requests": 4, "slo": "energy", "coverage": 0.5, "breach_limit": 99}}),
              name="policy", route_prefix="/policy")
    yield openai.OpenAI(base_url=f"{serve_cluster.url}/policy/v1", api_key="unused", max_retries=0, timeout=120)
    serve.delete("policy")


def test_policy_switches_and_loads_during_traffic_without_failures(client):
    router = serve.get_deployment_handle("Router", "policy")
    prompts = [p["prompt"] for p in load_prompts("code")[:12]]

    def one(prompt: str):
        return client.completions.create(model="helios", prompt=prompt, max_tokens=32, temperature=0,
                                         extra_body={"ignore_eos": True})

    # A burst at once: the ingress routes it all to the first candidate. When that one's turn is
    # over, its replica hands back what it has not started, and the queue follows the round.
    with ThreadPoolExecutor(40) as pool:
        served = list(pool.map(one, [prompts[i % len(prompts)] for i in range(40)]))
    assert len({r.model_extra["helios"]["model"] for r in served}) >= 2

    deadline = time.monotonic() + 240
    with ThreadPoolExecutor(4) as pool:
        while time.monotonic() < deadline:
            served += pool.map(one, prompts[:4])  # waves of 4, while the router reorganises
            kinds = [e["kind"] for e in router.snapshot.remote().result()["events"]]
            if "serve" in kinds and len(served) >= 12:
                break
    assert all(r.usage.completion_tokens == 32 and r.choices[0].finish_reason == "length" for r in served)
    events = router.snapshot.remote().result()["events"]
    assert [e["kind"] for e in events][:3] == ["profile", "profile", "profile"]
    chosen = next(e for e in events if e["kind"] == "serve")
    assert len({r.model_extra["helios"]["model"] for r in served}) >= 2  # traffic moved between models

    # The replica applies the router's target depth and exit points (sent back on its next
    # telemetry report). The registry's profiles price a check, so the policy thinned the points.
    assert chosen["exits"] is not None
    replica = serve.get_deployment_handle(f"model-{chosen['model']}", "policy")
    deadline = time.monotonic() + 30

    def applied(stats: dict) -> bool:
        return stats["loaded_layers"] == chosen["depth"] and stats["exit_layers"] == list(chosen["exits"])

    while not applied(replica.stats.remote().result()) and time.monotonic() < deadline:
        one(prompts[5])
        time.sleep(1)
    stats = replica.stats.remote().result()
    assert applied(stats) and stats["loaded_layers"] < stats["num_layers"]
    after = one(prompts[6]).model_extra["helios"]
    assert after["model"] == chosen["model"] and after["loaded_layers"] == chosen["depth"]
    assert after["exit_layers"] == list(chosen["exits"])
    assert {int(d) for d in after["exit_histogram"]} <= set(chosen["exits"]) | {chosen["depth"]}

    # A replica that starts (its engine killed here, as the OOM killer would) reads the target
    # before its first request instead of serving that one at the registry's settings.
    os.kill(stats["engine_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if replica.stats.remote().result()["engine_pid"] != stats["engine_pid"]:
                break
        except Exception:  # the dead replica, until Serve has replaced it
            time.sleep(0.5)
    first = one(prompts[7]).model_extra["helios"]
    assert first["model"] == chosen["model"] and first["loaded_layers"] == chosen["depth"]
    assert first["exit_layers"] == list(chosen["exits"])
