"""`helios bench`'s helios_serve system: the Serve app (on the shared test cluster) driven over real
HTTP, closed and open loop; its traces must be complete and match the in-process engine."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from deployments.app import build_app  # noqa: E402
from helios_core.benchmark.http import app_args, run_serve  # noqa: E402
from helios_core.benchmark.runner import BenchConfig, parse_load  # noqa: E402
from helios_core.benchmark.systems import greedy  # noqa: E402
from helios_core.benchmark.traces import SLO, summarize  # noqa: E402
from helios_core.benchmark.workload import load_workload, poisson_arrivals  # noqa: E402
from helios_core.engine import EngineConfig, LLMEngine  # noqa: E402
from helios_core.policy import Registry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = str(ROOT / "models" / "registry.yaml")


def _complete(url: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.load(resp)


def test_helios_serve_system(serve_cluster, tmp_path):
    # One model (one replica to start), with no token exiting early (threshold 2 > any confidence);
    # profiling never ends, so it serves every request at full depth: plain greedy decoding.
    doc = yaml.safe_load(Path(REGISTRY).read_text())
    doc["models"] = [{**doc["models"][0], "path": str(ROOT / "models" / doc["models"][0]["path"])}]
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump(doc))
    cfg = BenchConfig(registry=str(registry), limit=4, max_tokens=8, loads=("closed:4", "poisson:4"), warmup=2,
                      threshold=2.0, policy={"profile_requests": 10**6})
    budget = 48 << 20
    base = load_workload("mixed", cfg.limit, cfg.max_tokens)
    warm = load_workload("code", cfg.warmup, cfg.max_tokens)
    url = f"{serve_cluster.url}/bench"
    serve.run(build_app(app_args(cfg, budget)), name="bench", route_prefix="/bench")
    try:
        runs, policy = run_serve(cfg, budget, base, warm, [parse_load(s) for s in cfg.loads], log=lambda _: None,
                                 url=url)
        # Not streamed: token ids only when asked for (the response shape is otherwise unchanged).
        body = {"model": "helios", "prompt": base[0].prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        plain, with_ids = _complete(url, body)["choices"][0], _complete(url, {**body, "return_token_ids": True})
    finally:
        serve.delete("bench")

    assert [spec for spec, _ in runs] == list(cfg.loads)
    [entry] = Registry.load(registry, "float32")
    # The router's events: it profiles its one candidate (and never finishes: profile_requests is huge).
    assert [(e["kind"], e["model"], e["depth"]) for e in policy["events"]] == [("profile", entry.name, entry.num_layers)]
    assert policy["pht"][entry.name]["requests"] > 0  # and its PHT comes with them
    [model] = {m for _, run in runs for t in run.traces for (m, _, _) in t.served_by}
    assert model == entry.name
    depth = entry.num_layers
    engine = LLMEngine(EngineConfig(model=str(entry.path), dtype="float32", early_exit=False))
    expected = {r.id: c.token_ids for r, c in zip(base, engine.generate([r.prompt for r in base],
                                                                        [greedy(r) for r in base]))}
    for spec, run in runs:
        assert summarize(run.traces, run.seconds, SLO())["completed"] == 4
        assert run.peak_weight_bytes > 0 and run.peak_kv_bytes > 0  # the policy's model always counts
        for t in run.traces:
            assert t.error is None and t.finished is not None
            assert len(t.token_times) == len(t.output_ids) == 8
            assert t.token_times == sorted(t.token_times) and t.ttft <= t.finished - t.arrival
            assert t.served_by == {(model, depth, None): 8}  # profiling: every exit point
            assert t.exit_layers == [depth] * 8 and t.forced == t.breaches == 0
            assert t.output_ids == expected[t.id.removeprefix(f"{spec}-")]
        lookups, hits, saved = run.prefix  # the replicas' prefix-cache counts over this load
        assert lookups > 0 and saved == hits * EngineConfig.block_size
    # The second load repeats the first's prompts: their full blocks are found cached, as in process.
    assert runs[1][1].prefix[1] > 0
    # The batch is sampled every 0.25 s; the closed loop's 4 requests stream together for longer (CPU).
    assert 1 <= runs[0][1].max_batch <= 4
    [(_, poisson)] = [r for r in runs if r[0] == "poisson:4"]
    assert [t.arrival for t in poisson.traces] == poisson_arrivals(4, 4, cfg.seed)
    assert "token_ids" not in plain and with_ids["choices"][0]["token_ids"] == expected[base[0].id]
