"""`helios bench`: loads, the drive loop against the engine's own outputs, transformers' static
batches against Helios at full depth, the budget's shape, and a CLI smoke run with its results.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helios_core.benchmark.runner import _ratios, baseline_budget, parse_load
from helios_core.benchmark.systems import EngineSystem, HFGenerate, drive, greedy
from helios_core.benchmark.traces import SLO, Trace, summarize
from helios_core.benchmark.workload import BenchRequest, load_workload, poisson_arrivals, with_system_prompt
from helios_core.engine import EngineConfig, LLMEngine, load_tokenizer
from helios_core.exits import ExitConfig
from helios_core.policy import Registry

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ROOT / "models" / "registry.yaml"
CODE = "helios-demo-code-6l"


def requests(n: int, max_tokens: int = 6) -> list[BenchRequest]:
    return [BenchRequest(f"r{i}", p.prompt, p.task, max_tokens) for i, p in enumerate(load_workload("mixed", n))]


def reference(model: str, reqs: list[BenchRequest]) -> dict[str, list[int]]:
    engine = LLMEngine(EngineConfig(model=model, dtype="float32", early_exit=False, max_model_len=1024,
                                    enable_prefix_caching=False))
    return {r.id: c.token_ids for r, c in zip(reqs, engine.generate([r.prompt for r in reqs],
                                                                    [greedy(r) for r in reqs]))}


@pytest.mark.parametrize("spec, parsed", [("closed:64", ("closed", 64.0)), ("poisson:2.5", ("poisson", 2.5))])
def test_parse_load(spec, parsed):
    assert parse_load(spec) == parsed


@pytest.mark.parametrize("spec", ["closed", "poisson:-1", "burst:3", "closed:x"])
def test_parse_load_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="closed:CONCURRENCY or poisson:RATE"):
        parse_load(spec)


def test_poisson_arrivals_are_reproducible_with_the_asked_rate():
    times = poisson_arrivals(4.0, 4000, seed=1)
    assert times == poisson_arrivals(4.0, 4000, seed=1) and times != poisson_arrivals(4.0, 4000, seed=2)
    assert all(b > a for a, b in zip(times, times[1:]))
    assert times[-1] / len(times) == pytest.approx(0.25, rel=0.06)


def test_budget_holds_exactly_b0_sequences_of_the_baseline():
    registry = Registry.load(REGISTRY, "float32")
    entry = registry["helios-demo-mixed-16l"]
    for b0 in (2, 4, 9):
        budget = baseline_budget(registry, entry.name, b0, 1024)
        assert entry.plan(entry.num_layers, budget, 1024).sequences(1024) == b0
        assert entry.plan(entry.num_layers, budget - 1, 1024).sequences(1024) == b0 - 1
        # Half the layers in the same budget: the freed weights and half-size K/V blocks hold more.
        half = entry.plan(entry.num_layers // 2, budget, 1024)
        assert half.kv_bytes_per_block * 2 == entry.plan(entry.num_layers, budget, 1024).kv_bytes_per_block
        assert half.num_blocks > 1.75 * b0 * 16  # not quite twice: more rows' workspace comes with them
        # Paged: sequences shorter than max_model_len take only the blocks they fill.
        assert entry.plan(entry.num_layers, budget, 1024).sequences(290) >= 3 * b0


def test_summary_percentiles_goodput_and_exits():
    fast = Trace("a", "code", 0.0, token_times=[0.1, 0.2, 0.3], output_ids=[1, 2, 3], exit_layers=[1, 2, 2],
                 finished=0.3)
    slow = Trace("b", "prose", 0.0, token_times=[3.0, 4.0], output_ids=[4, 5], exit_layers=[6, 6], finished=4.0)
    failed = Trace("c", None, 0.0, error="aborted")
    s = summarize([fast, slow, failed], seconds=5.0, slo=SLO(ttft_s=1.0, tpot_s=0.5))
    assert (s["requests"], s["completed"], s["errors"], s["output_tokens"]) == (3, 2, 1, 5)
    assert s["output_tokens_per_s"] == pytest.approx(1.0) and s["goodput_requests_per_s"] == pytest.approx(0.2)
    assert s["ttft_p50_s"] == pytest.approx((0.1 + 3.0) / 2) and s["tpot_p99_s"] <= 1.0
    assert s["exit_histogram"] == {"1": 1, "2": 2, "6": 2} and s["mean_exit_layer"] == pytest.approx(17 / 5)


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_drive_serves_every_request_with_the_engines_own_tokens(mode):
    model = str(ROOT / "models" / CODE)
    reqs = requests(6)
    engine = LLMEngine(EngineConfig(model=model, dtype="float32", early_exit=False, memory_budget=32 << 20,
                                    max_model_len=1024))
    kwargs = {"concurrency": 3} if mode == "closed" else {"arrivals": poisson_arrivals(50.0, len(reqs))}
    run = drive(EngineSystem(engine), reqs, **kwargs)
    expected = reference(model, reqs)
    assert sorted(t.id for t in run.traces) == sorted(expected)
    for t in run.traces:
        assert t.output_ids == expected[t.id] and t.error is None
        assert t.arrival <= t.token_times[0] <= t.token_times[-1] == t.finished <= run.seconds
        assert t.served_by == {(CODE, 6, None): 6} and t.exit_layers == [6] * 6
    assert 1 <= run.max_batch <= (3 if mode == "closed" else engine.memory.max_seqs)
    assert run.peak_weight_bytes == engine.memory.weight_bytes and run.peak_kv_bytes == engine.memory.kv_bytes


def test_early_exit_system_records_exit_layers_and_forced_tokens():
    entry = Registry.load(REGISTRY, "float32")[CODE]
    engine = LLMEngine(EngineConfig(model=str(entry.path), dtype="float32", num_layers=3, memory_budget=32 << 20,
                                    max_model_len=1024,
                                    exit=ExitConfig(threshold=0.5)))
    run = drive(EngineSystem(engine), requests(4, 8), concurrency=4)
    layers = [x for t in run.traces for x in t.exit_layers]
    assert len(layers) == 32 and set(layers) <= {1, 2, 3} and min(layers) < 3  # some leave early
    assert sum(t.forced for t in run.traces) == layers.count(3)  # 3 of 6 layers loaded: every exit at 3 is forced


def test_hf_generate_static_batches_match_helios_at_full_depth():
    model = str(ROOT / "models" / CODE)
    reqs = requests(5)
    system = HFGenerate(model, batch_size=2)
    run = system.drive(reqs, concurrency=5)
    expected = reference(model, reqs)
    assert run.max_batch == 2
    agree = sum(t.output_ids == expected[t.id] for t in run.traces)
    assert agree >= 4, "transformers and Helios at full depth should emit the same greedy tokens"
    for t in run.traces:
        assert len(t.token_times) == 6 and t.token_times == sorted(t.token_times) and t.finished >= t.token_times[-1]


def test_a_shared_system_prompt_is_prefilled_once_and_counted():
    """Every request behind the same 130-token system prompt: after the first wave, requests take its
    cached blocks (two full blocks of 64), and the outputs are those of an engine without reuse."""
    model = str(ROOT / "models" / CODE)
    reqs = with_system_prompt(requests(6), load_tokenizer(model), 130)
    assert all(r.prompt.startswith(reqs[0].prompt[:200]) for r in reqs)
    engine = LLMEngine(EngineConfig(model=model, dtype="float32", early_exit=False, max_model_len=1024))
    run = drive(EngineSystem(engine), reqs, concurrency=2)
    lookups, hits, saved = run.prefix
    assert hits >= 2 * 4 and saved == 64 * hits and lookups > hits  # the first two found nothing cached
    assert {t.id: t.output_ids for t in run.traces} == reference(model, reqs)


REQUIRED = {"output_tokens_per_s", "max_concurrent_batch", "weight_bytes", "kv_bytes", "ttft_p50_s", "tpot_p50_s",
            "accuracy", "perplexity", "agreement_with_full_depth"}


def test_cli_smoke_run_writes_results_table_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "helios_core.cli", "bench", "--quick", "--out", str(out), "--threads", "1",
           "--limit", "6", "--max-tokens", "6", "--loads", "closed:6", "poisson:20", "--warmup", "6",
           "--policy", '{"profile_requests": 2}',
           "--quality-tokens", "128", "--sweep", "--sweep-thresholds", "0.9", "--sweep-coverages", "0.6",
           "--sweep-depths", "8", "--sweep-exit-every", "4"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert set(report["systems"]) == {"helios", "helios_single", "ee_baseline", "full_depth", "hf_generate"}
    # helios_single runs the HELIOS loop over the baseline model alone: nothing else serves, or is ever started.
    single = report["systems"]["helios_single"]["served_by"]
    assert single and all(config.startswith(report["settings"]["baseline"] + "@") for config in single), single
    assert {e["model"] for e in report["loops"]["helios_single"]["timeline"]} == {report["settings"]["baseline"]}
    assert set(report["loops"]) == {"helios", "helios_single"}
    for name, r in report["systems"].items():
        assert REQUIRED <= set(r), name
        assert r["completed"] == 6 and r["errors"] == 0 and r["output_tokens"] == 36
        assert [x["load"] for x in r["loads"]] == ["closed:6", "poisson:20"]
    s = report["settings"]
    assert s["b0"] == 4 and s["workload"] == "mixed" and s["loads"] == ["closed:6", "poisson:20"]
    assert s["registry_models"] == Registry.load(REGISTRY, "float32").names() and s["budget_bytes"] > 0
    # The budget holds B0 = 4 sequences of max_model_len at full depth; paged, all 6 shorter ones run at once.
    assert report["systems"]["full_depth"]["max_concurrent_batch"] == 6
    assert report["systems"]["full_depth"]["agreement_with_full_depth"] == 1.0
    assert report["systems"]["hf_generate"]["accuracy"] == pytest.approx(report["systems"]["full_depth"]["accuracy"],
                                                                         abs=0.01)
    assert {p["system"] for p in report["sweep"]} == {"full_depth", "ee_baseline", "helios", "helios_single",
                                                      "fixed_depth"}
    assert {p["exit_every"] for p in report["sweep"] if p["system"] != "full_depth"} == {4}
    assert "full_depth" in report["matched_quality"]["points"]
    assert "| helios |" in (out / "results.md").read_text()
    for png in ("throughput_vs_load", "latency_cdfs", "exit_histograms", "timeline", "frontier"):
        assert (out / f"{png}.png").stat().st_size > 1000, png


def test_ratios_compare_each_helios_loop_with_its_baseline_and_serve_load_by_load():
    def system(tok_s, batch, loads=()):
        return {"output_tokens_per_s": tok_s, "max_concurrent_batch": batch, "accuracy": 0.5, "perplexity": 8.0,
                "loads": [{"load": spec, "output_tokens_per_s": v} for spec, v in loads]}

    results = {"helios": system(300.0, 30, [("closed:64", 300.0), ("poisson:2", 50.0)]),
               "helios_single": system(200.0, 20), "ee_baseline": system(100.0, 10), "full_depth": system(150.0, 10),
               "helios_serve": system(270.0, 28, [("closed:64", 270.0), ("poisson:2", 40.0)])}
    r = _ratios(results)
    assert r["helios_single_over_ee_baseline_throughput"] == 2.0 and r["helios_single_over_ee_baseline_batch"] == 2.0
    assert r["helios_over_helios_single_throughput"] == 1.5 and r["helios_over_full_depth_throughput"] == 2.0
    assert r["serve_over_in_process_throughput_closed:64"] == pytest.approx(0.9)
    assert r["serve_over_in_process_throughput_poisson:2"] == pytest.approx(0.8)
    del results["helios_single"], results["helios_serve"]
    r = _ratios(results)
    assert r["helios_single_over_ee_baseline_throughput"] is None
    assert not any(k.startswith("serve_over_in_process_throughput_") for k in r)


def test_sweep_exit_points_without_probes_are_refused_before_anything_runs(tmp_path, capsys):
    """A probe-measure model whose heads file has probes at depths 1-3 only: a sweep of exit points every
    4 layers would need one at depth 4. The bench refuses it at once, naming the model and the depth,
    instead of failing after the main run (which took 20 minutes on the real family)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from helios_core.cli import main

    demo = ROOT / "models" / CODE
    with safe_open(str(demo / "exit_probes.safetensors"), "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if int(k.split(".")[1]) <= 3}
        save_file(kept, str(tmp_path / "probes.safetensors"), metadata=f.metadata())
    registry = tmp_path / "registry.yaml"
    registry.write_text(json.dumps({"models": [{"name": "code", "path": str(demo), "exit_layers": [1, 2, 3],
                                                "exit_heads": "probes.safetensors", "measure": "probe"}]}))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--registry", str(registry), "--baseline", "code", "--out", str(out), "--sweep",
              "--sweep-exit-every", "1", "4"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "every 4 layer(s) on code" in err and "depth(s) [4]" in err, err
    assert not out.exists()
