"""The quality/throughput frontier: Helios and the EE baseline over exit thresholds, the policy's
coverage (how many breaches its depth rule accepts) and fixed loaded depths, at the headline load.

Speed and quality trade against each other, so one operating point proves little: the honest
comparison is the best throughput each system reaches at a given quality. `matched` picks, for
each system, its fastest point whose accuracy is within `max_accuracy_drop` of full depth and whose
perplexity is within `max_perplexity_rise` of it.
"""

from __future__ import annotations

import dataclasses
import sys

from tqdm import tqdm

from ..engine import EngineConfig, LLMEngine
from ..policy import Registry
from .quality import NO_EXIT, QualityOracle
from .runner import HELIOS_LOOPS, BenchConfig, _build, _requests, _run, baseline_budget, parse_load, quality_oracle, with_exits
from .systems import EngineSystem
from .traces import served_configs, summarize
from .workload import load_workload


def _point(system, cfg: BenchConfig, oracle: QualityOracle, thresholds: dict, /, exit_layers: dict | None = None,
           **labels) -> dict:
    load = parse_load(cfg.loads[0])
    base = load_workload(cfg.workload, cfg.limit, cfg.max_tokens)
    with tqdm(total=cfg.warmup + len(base), leave=False, file=sys.stderr, desc=str(labels)) as bar:
        if cfg.warmup:
            warm = _requests(load_workload(cfg.workload, cfg.warmup, cfg.max_tokens), "warmup")
            _run(system, warm, ("closed", len(warm)), cfg.seed, bar)
        run = _run(system, _requests(base, "sweep"), load, cfg.seed, bar)
    served = served_configs(run.traces)
    summary = summarize(run.traces, run.seconds, cfg.slo)
    return {**labels, "output_tokens_per_s": summary["output_tokens_per_s"], "max_concurrent_batch": run.max_batch,
            "mean_exit_layer": summary["mean_exit_layer"], "served_by": summary["served_by"],
            **oracle.mixture(served, thresholds, exit_layers)}


def run_sweep(cfg: BenchConfig, thresholds: list[float], coverages: list[float], depths: list[int],
              exit_every: list[int | None] = (None,), log=print) -> list[dict]:
    """One point per (system, threshold, knob); each on fresh systems with their own warm-up."""
    registry = Registry.load(cfg.registry, cfg.dtype)
    budget = cfg.budget or baseline_budget(registry, cfg.baseline, cfg.b0, cfg.max_model_len)
    oracle = quality_oracle(cfg, registry)
    points = [_point(_build("full_depth", cfg, registry, budget), cfg, oracle,
                     {m: NO_EXIT for m in registry.names()}, system="full_depth", threshold=None)]
    for every in exit_every:
        for threshold in thresholds:
            points += _frontier_points(cfg, registry, budget, oracle, threshold, every, coverages, depths, log)
    return points


def _frontier_points(cfg, registry, budget, oracle, threshold, every, coverages, depths, log) -> list[dict]:
    reg = with_exits(registry, threshold, every)
    per_model = {e.name: threshold for e in reg}
    knobs = {"threshold": threshold, "exit_every": every or 1, "exit_layers": {e.name: e.exit_layers for e in reg}}
    log(f"sweep: {knobs}")
    c = dataclasses.replace(cfg, threshold=threshold, exit_every=every)
    points = [_point(_build("ee_baseline", c, reg, budget), c, oracle, per_model, system="ee_baseline", **knobs)]
    for coverage in coverages:
        cc = dataclasses.replace(c, policy={**cfg.policy, "coverage": coverage})
        for loop in HELIOS_LOOPS:
            points.append(_point(_build(loop, cc, reg, budget), cc, oracle, per_model, system=loop,
                                 coverage=coverage, **knobs))
    entry = reg[cfg.baseline]
    for depth in depths:  # partial loading alone: the baseline model at a fixed depth, same budget
        engine = LLMEngine(EngineConfig(model=str(entry.path), name=cfg.baseline, num_layers=depth,
                                        memory_budget=budget, max_model_len=cfg.max_model_len,
                                        exit=entry.exit_config(), device=cfg.device, **entry.engine_options()))
        points.append(_point(EngineSystem(engine), c, oracle, per_model, system="fixed_depth", depth=depth,
                             **knobs))
    return points


def matched(points: list[dict], max_accuracy_drop: float = 0.01, max_perplexity_rise: float = 0.05) -> dict:
    """Per system, its fastest point at full-depth quality (None if it never gets there)."""
    full = next(p for p in points if p["system"] == "full_depth")
    best: dict = {"full_depth": full}
    for p in points:
        ok = (p["accuracy"] >= full["accuracy"] - max_accuracy_drop
              and p["perplexity"] <= full["perplexity"] * (1 + max_perplexity_rise))
        if ok and p["output_tokens_per_s"] > best.get(p["system"], {}).get("output_tokens_per_s", 0):
            best[p["system"]] = p
    return best


def matched_ratios(best: dict) -> dict:
    """Throughput and batch ratios between the systems' fastest full-quality points."""
    def ratio(a: str, b: str, key: str) -> float | None:
        return best[a][key] / best[b][key] if a in best and b in best else None

    return {"helios_over_ee_baseline_throughput": ratio("helios", "ee_baseline", "output_tokens_per_s"),
            "helios_over_full_depth_throughput": ratio("helios", "full_depth", "output_tokens_per_s"),
            "helios_over_ee_baseline_batch": ratio("helios", "ee_baseline", "max_concurrent_batch"),
            "helios_single_over_ee_baseline_throughput": ratio("helios_single", "ee_baseline", "output_tokens_per_s"),
            "helios_single_over_ee_baseline_batch": ratio("helios_single", "ee_baseline", "max_concurrent_batch")}
