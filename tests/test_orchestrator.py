"""The control loop end to end, in process, on the demo family: profiling, partial loading,
capacity from freed memory, a stable workload, and a shift from code to prose."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import yaml

from helios_core.orchestrator import Orchestrator, OrchestratorConfig
from helios_core.policy import PolicyConfig
from helios_core.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from prompts import load_prompts  # noqa: E402

MODELS = ["helios-demo-code-6l", "helios-demo-prose-12l", "helios-demo-mixed-16l"]
PARAMS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
BUDGET = 64 << 20


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("registry") / "registry.yaml"
    models = [{"name": m, "path": str(ROOT / "models" / m), "threshold": 0.5} for m in MODELS]
    path.write_text(yaml.safe_dump({"models": models}))
    return str(path)


def run(orch: Orchestrator, prompts: list[str], tasks=None) -> list:
    done = orch.generate(prompts, PARAMS, tasks)
    assert all(len(c.token_ids) == PARAMS.max_tokens for c in done)  # every request completes in full
    return done


@pytest.fixture(scope="module")
def global_run(registry):
    """Energy SLO (the FLOPs proxy: deterministic, unlike timings), profiles of N = 10 requests (5 of
    these short code prompts make a noisy profile). 35 code requests in a fixed shuffle, then 30 prose."""
    orch = Orchestrator(OrchestratorConfig(registry=registry, memory_budget=BUDGET, max_model_len=1024,
                                           policy=PolicyConfig(slo="energy", profile_requests=10)))
    code = load_prompts("code")
    random.Random(2).shuffle(code)
    run(orch, [p["prompt"] for p in code[:35]])
    after_code = list(orch.policy.events)
    tokens_at_shift = orch.policy.tokens
    snapshot = orch.stats()
    run(orch, [p["prompt"] for p in load_prompts("prose")[:30]])
    return orch, after_code, snapshot, tokens_at_shift


def test_profiles_each_candidate_then_serves_one_partially_loaded(global_run):
    orch, events, snapshot, _ = global_run
    assert [e.kind for e in events[:4]] == ["profile", "profile", "profile", "serve"]
    assert [e.model for e in events[:3]] == orch.policy.candidates
    assert [e.depth for e in events[:3]] == [orch.registry[m].num_layers for m in orch.policy.candidates]
    pht = snapshot["policy"]["pht"]
    assert all(pht[m]["requests"] == 10 for m in orch.policy.candidates)  # N live requests each
    served = events[3]
    assert served.depth < orch.registry[served.model].num_layers  # greedy partial loading


def test_partial_loading_lowers_memory_and_raises_capacity_as_planned(global_run):
    orch, events, snapshot, _ = global_run
    served = events[-1]  # the depth in use at the end of the code phase
    entry = orch.registry[served.model]
    live = snapshot["models"][served.model]
    assert live["loaded_layers"] == served.depth < entry.num_layers
    assert live["weight_bytes"] == entry.weight_bytes(served.depth) < entry.weight_bytes(entry.num_layers)
    partial, full = entry.plan(served.depth, BUDGET, 1024), entry.plan(entry.num_layers, BUDGET, 1024)
    assert live["capacity"] == partial.capacity > full.capacity
    assert live["weight_bytes"] + live["kv_bytes"] <= BUDGET


def test_stable_workload_causes_no_switch_and_no_flapping(global_run):
    _, events, _, _ = global_run
    later = events[4:]
    # A 5-request profile can be optimistic: at most one load corrects it; depth never goes back down.
    assert [e.kind for e in later] in ([], ["load"])
    assert all(e.model == events[3].model and e.depth > events[3].depth for e in later)


def test_shift_from_code_to_prose_adapts_within_bounded_tokens(global_run):
    orch, before, _, tokens_at_shift = global_run
    at_shift = before[-1]
    assert at_shift.depth < orch.registry[at_shift.model].num_layers  # room to adapt
    adaptations = [e for e in orch.policy.events[len(before):] if e.kind in ("load", "switch")]
    assert adaptations, [e.to_dict() for e in orch.policy.events]
    first = adaptations[0]
    # cooldown (W) + the window (W), plus the code requests still finishing: well under 3 windows
    assert first.tokens - tokens_at_shift <= 3 * orch.config.policy.window
    if first.kind == "load":
        assert before[-1].model == first.model and first.depth > before[-1].depth
    loads = [t for t in orch.timeline if t["kind"] in ("load", "start")]
    assert loads[-1]["weight_bytes"] + loads[-1]["kv_bytes"] <= BUDGET


def test_per_request_mode_keeps_every_candidate_live_and_routes_by_task(registry):
    orch = Orchestrator(OrchestratorConfig(registry=registry, memory_budget=3 * BUDGET // 2, max_model_len=1024,
                                           policy=PolicyConfig(slo="energy", mode="per-request",
                                                               profile_requests=2)))
    code = [p["prompt"] for p in load_prompts("code")[:10]]
    run(orch, code, ["code"] * len(code))
    stats = orch.stats()["models"]
    assert set(stats) == set(MODELS)
    assert sum(s["weight_bytes"] + s["kv_bytes"] for s in stats.values()) <= 3 * BUDGET // 2
    assert orch.policy.choose("code") in MODELS


def test_bad_prompts_are_refused_before_queueing(registry):
    orch = Orchestrator(OrchestratorConfig(registry=registry, memory_budget=BUDGET, max_model_len=64))
    with pytest.raises(ValueError, match="max_model_len"):
        orch.add_request("word " * 200)
    with pytest.raises(ValueError, match="empty"):
        orch.add_request([])
    with pytest.raises(ValueError, match="token ids"):
        orch.add_request([10**6])
    assert not orch.has_unfinished()
