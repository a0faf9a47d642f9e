"""One benchmark run: every system on the same requests, loads and memory budget; then quality.

The budget has the paper's shape: the baseline model at full depth plus the KV cache of B0
sequences (and the engine's workspace), computed with the engine's own memory plan. Systems are
measured load by load, side by side (load 1 on every system, then load 2, ...), so machine noise
hits them alike. Each system first serves `warmup` requests untimed (Helios profiles its candidates
then, as it would in its first minutes of service).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..engine import load_tokenizer
from ..evaluate import rouge_l
from ..exits import require_probes, stored_probe_depths
from ..kv_cache import blocks_for
from ..orchestrator import Orchestrator, OrchestratorConfig
from ..policy import PolicyConfig, Registry
from .quality import NO_EXIT, QualityOracle
from .systems import HFGenerate, HeliosSystem, RunResult, drive, engine_system, greedy
from .traces import SLO, served_configs, summarize
from .workload import BenchRequest, load_workload, poisson_arrivals, with_system_prompt

SYSTEMS = ("helios", "helios_single", "ee_baseline", "full_depth", "hf_generate", "helios_serve")
HELIOS_LOOPS = ("helios", "helios_single")  # the systems the orchestrator runs
QUALITY_SOURCES = {"code": ["stdlib"], "prose": ["pydoc"], "summarize": ["pydoc"]}  # else both


@dataclass
class BenchConfig:
    registry: str = "models/registry.yaml"
    baseline: str = "helios-demo-mixed-16l"  # the model the baselines serve; sets the budget
    workload: str = "mixed"
    limit: int | None = 96
    max_tokens: int = 64
    b0: int = 4  # sequences the baseline's budget holds at full depth
    budget: int | None = None  # bytes; None = the baseline's weights + KV for B0 sequences
    max_model_len: int = 1024
    threshold: float | None = None  # every model's exit threshold; None = the registry's
    exit_every: int | None = None  # exit points every k layers on every model; None = the registry's
    systems: tuple[str, ...] = ("helios", "helios_single", "ee_baseline", "full_depth", "hf_generate", "helios_serve")
    loads: tuple[str, ...] = ("closed:64", "poisson:2", "poisson:4", "poisson:8")
    warmup: int = 24
    policy: dict = field(default_factory=dict)  # PolicyConfig fields
    quality_tokens: int = 4096  # held-out text tokens per source for the teacher-forced quality
    slo: SLO = field(default_factory=SLO)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # every system's, as hf_generate's: Helios' own default (auto) would not compare
    stream_max_hold_s: float = 0.1  # helios_serve: build_app's stream_max_hold_s
    system_prompt_tokens: int = 0  # a shared system prompt of this many tokens before every prompt
    prefix_caching: bool = True  # reuse cached prompt-prefix KV blocks (in-process systems)


def parse_load(spec: str) -> tuple[str, float]:
    """'closed:64' (64 in flight) or 'poisson:4' (4 requests/s on average)."""
    kind, _, value = spec.partition(":")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if kind not in ("closed", "poisson") or number <= 0:
        raise ValueError(f"invalid load {spec!r}: use closed:CONCURRENCY or poisson:RATE (e.g. closed:64, poisson:4)")
    return kind, number


def baseline_budget(registry: Registry, model: str, b0: int, max_model_len: int) -> int:
    """The smallest budget whose full-depth plan for `model` holds b0 sequences of max_model_len tokens
    (the paper's baseline: B0 × max_model_len positions of KV; paging fits more, shorter, sequences)."""
    entry = registry[model]
    plan = entry.plan(entry.num_layers, 1 << 40, max_model_len)
    budget = plan.budget_for_blocks(b0 * blocks_for(max_model_len, plan.block_size))
    assert entry.plan(entry.num_layers, budget, max_model_len).sequences(max_model_len) == b0
    return budget


def quality_oracle(cfg: BenchConfig, registry: Registry) -> QualityOracle:
    """Teacher-forced quality on the held-out text that matches the workload, cut in the baseline's tokens."""
    return QualityOracle(registry, QUALITY_SOURCES.get(cfg.workload, ["stdlib", "pydoc"]), cfg.quality_tokens,
                         device=cfg.device, reference=cfg.baseline)


def with_exits(registry: Registry, threshold: float | None, exit_every: int | None = None) -> Registry:
    """The registry with every model's threshold and/or exit points (every k layers) replaced."""
    def change(e):
        if threshold is not None:
            e = dataclasses.replace(e, threshold=threshold)
        if exit_every is not None:
            e = dataclasses.replace(e, exit_layers=tuple(range(exit_every, e.num_layers, exit_every)))
        return e

    return Registry([change(e) for e in registry], registry.path)


def check_exit_points(registry: Registry, exit_every: list[int | None]) -> None:
    """Refuse, before anything runs, exit points (every k layers) that a model's probe measure has no
    probes for: the engine would refuse them only when its system is built, after earlier systems ran."""
    for every in exit_every:
        for e in with_exits(registry, None, every):
            probes = stored_probe_depths(e.exit_heads) if e.exit_heads else ()
            try:
                require_probes(e.exit_config(), e.num_layers, probes)
            except ValueError as err:
                raise ValueError(f"exit points every {every or 1} layer(s) on {e.name}: {err}") from None


def _requests(base: list[BenchRequest], prefix: str) -> list[BenchRequest]:
    return [dataclasses.replace(r, id=f"{prefix}-{r.id}") for r in base]


def _build(name: str, cfg: BenchConfig, registry: Registry, budget: int):
    entry = registry[cfg.baseline]
    if name in HELIOS_LOOPS:
        # helios_single: the same loop over the baseline model alone (exits, partial loading, freed
        # memory -> batch; nothing to switch to), so switching's share of the gain reads off the table.
        models = registry if name == "helios" else Registry([entry], registry.path)
        return HeliosSystem(Orchestrator(OrchestratorConfig(
            registry=models, memory_budget=budget, max_model_len=cfg.max_model_len, device=cfg.device,
            enable_prefix_caching=cfg.prefix_caching, policy=PolicyConfig(**cfg.policy))))
    if name in ("ee_baseline", "full_depth"):
        return engine_system(str(entry.path), cfg.baseline, budget, cfg.max_model_len, entry.exit_config(),
                             early_exit=name == "ee_baseline", device=cfg.device, prefix_caching=cfg.prefix_caching,
                             **entry.engine_options())
    if name == "hf_generate":
        return HFGenerate(str(entry.path), cfg.b0, cfg.device)
    raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")


def _run(system, requests: list[BenchRequest], load: tuple[str, float], seed: int, bar) -> RunResult:
    kind, value = load
    arrivals = poisson_arrivals(value, len(requests), seed) if kind == "poisson" else None
    concurrency = None if kind == "poisson" else int(value)
    run = system.drive if isinstance(system, HFGenerate) else (lambda *a, **k: drive(system, *a, **k))
    return run(requests, arrivals=arrivals, concurrency=concurrency, progress=bar.update)


def run_benchmark(cfg: BenchConfig, log=print) -> dict:
    started = time.time()
    registry = with_exits(Registry.load(cfg.registry, cfg.dtype), cfg.threshold, cfg.exit_every)
    check_exit_points(registry, [None])
    budget = cfg.budget or baseline_budget(registry, cfg.baseline, cfg.b0, cfg.max_model_len)
    base = load_workload(cfg.workload, cfg.limit, cfg.max_tokens)
    warm = _requests(load_workload(cfg.workload, cfg.warmup, cfg.max_tokens), "warmup") if cfg.warmup else []
    if cfg.system_prompt_tokens:
        tokenizer = load_tokenizer(registry[cfg.baseline].path)
        base, warm = (with_system_prompt(r, tokenizer, cfg.system_prompt_tokens) for r in (base, warm))
    loads = [parse_load(s) for s in cfg.loads]
    names = [s for s in cfg.systems if s != "helios_serve"]
    log(f"budget {budget / 2**20:.1f} MiB ({cfg.baseline} + KV for B0={cfg.b0}); systems {', '.join(cfg.systems)}")

    systems = {name: _build(name, cfg, registry, budget) for name in names}
    runs: dict[str, list[tuple[str, RunResult]]] = {name: [] for name in cfg.systems}
    total = len(warm) * len(names) + len(base) * len(loads) * len(names)
    with tqdm(total=total, desc="in-process systems", unit="req", file=sys.stderr) as bar:
        for name, system in systems.items():
            if warm:
                _run(system, warm, ("closed", len(warm)), cfg.seed, bar)
        for spec, load in zip(cfg.loads, loads):
            for name, system in systems.items():
                runs[name].append((spec, _run(system, _requests(base, spec), load, cfg.seed, bar)))
    serve_policy: dict = {}  # the Serve router's policy snapshot (its own, apart from `helios`'s)
    if "helios_serve" in cfg.systems:
        from .http import run_serve  # starts Ray: only when asked for

        runs["helios_serve"], serve_policy = run_serve(cfg, budget, base, warm, loads, log)

    log("quality: teacher-forced on held-out text")
    oracle = quality_oracle(cfg, registry)
    thresholds = {e.name: e.threshold for e in registry}
    results = {}
    for name, system_runs in runs.items():
        if not system_runs:
            continue
        entry = _system_entry(name, cfg, system_runs, systems.get(name), budget, registry, oracle, thresholds)
        results[name] = entry
    _add_rouge(results, runs, registry, budget, cfg)
    report = {
        "settings": {**dataclasses.asdict(cfg), "budget_bytes": budget, "registry_models": registry.names(),
                     "quality_sources": oracle.sources, "quality_tokens": oracle.tokens,
                     "thresholds": thresholds, "exit_layers": {e.name: e.exit_layers for e in registry}},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "systems": results,
        "ratios": _ratios(results),
        # Per HELIOS loop: its starts, loads and switches, the policy's decisions, and what it measured.
        "loops": {name: {"timeline": systems[name].orch.timeline,
                         "policy_events": [dataclasses.asdict(e) for e in systems[name].orch.policy.events],
                         "pht": systems[name].orch.policy.pht.to_dict()}
                  for name in HELIOS_LOOPS if name in systems},
        "serve_policy_events": serve_policy.get("events", []),
        "serve_pht": serve_policy.get("pht", {}),
        "seconds": time.time() - started,
    }
    return report


def _system_entry(name, cfg, system_runs, system, budget, registry, oracle, thresholds) -> dict:
    headline = system_runs[0][1]  # the first load is the headline (saturation) figure
    summary = summarize(headline.traces, headline.seconds, cfg.slo)
    served = served_configs(headline.traces)
    if name == "full_depth" or name == "hf_generate":
        quality = (oracle.transformers(cfg.baseline) if name == "hf_generate"
                   else oracle.mixture(served, {m: NO_EXIT for m in thresholds}))
    else:
        quality = oracle.mixture(served, thresholds, {e.name: e.exit_layers for e in registry})
    kv = headline.peak_kv_bytes
    if name == "hf_generate":  # its cache grows per batch; charge it what the budget reserves for B0
        entry = registry[cfg.baseline]
        kv = entry.plan(entry.num_layers, budget, cfg.max_model_len).kv_bytes
    return {
        **summary,
        "max_concurrent_batch": headline.max_batch,
        **_prefix(headline),
        "weight_bytes": headline.peak_weight_bytes, "kv_bytes": kv, "memory_budget_bytes": budget,
        **quality,
        "loads": [{"load": spec, "max_concurrent_batch": r.max_batch, **_prefix(r),
                   **summarize(r.traces, r.seconds, cfg.slo)} for spec, r in system_runs],
    }


def _prefix(run: RunResult) -> dict:
    lookups, hits, saved = run.prefix
    return {"prefix_hit_rate": hits / lookups if lookups else 0.0, "prefill_tokens_saved": saved}


def _add_rouge(results: dict, runs: dict, registry: Registry, budget: int, cfg: BenchConfig) -> None:
    """ROUGE-L of each system's free-running outputs (headline load) against the same model at full
    depth on the same prompts (greedy); full-depth references are generated here, untimed."""
    from ..engine import EngineConfig, LLMEngine

    prompts = {r.id: r for r in load_workload(cfg.workload, cfg.limit, cfg.max_tokens)}
    references: dict[str, dict[str, list[int]]] = {}

    def reference(model: str) -> dict[str, list[int]]:
        if model not in references:
            entry = registry[model]
            engine = LLMEngine(EngineConfig(model=str(entry.path), early_exit=False, max_model_len=cfg.max_model_len,
                                            device=cfg.device, **entry.engine_options()))
            done = engine.generate([p.prompt for p in prompts.values()], [greedy(p) for p in prompts.values()])
            references[model] = {rid: c.token_ids for rid, c in zip(prompts, done)}
        return references[model]

    for name, system_runs in runs.items():
        if name not in results:
            continue
        spec, run = system_runs[0]
        scores = []
        for t in run.traces:
            model = t.served_by.most_common(1)[0][0][0] if t.served_by else cfg.baseline
            scores.append(rouge_l(t.output_ids, reference(model)[t.id.removeprefix(f"{spec}-")]))
        results[name]["rouge_l_vs_full_depth"] = sum(scores) / len(scores) if scores else None


def _ratios(results: dict) -> dict:
    def ratio(a: str, b: str, key: str) -> float | None:
        if a in results and b in results and results[b].get(key):
            return results[a][key] / results[b][key]
        return None

    return {
        "helios_over_ee_baseline_throughput": ratio("helios", "ee_baseline", "output_tokens_per_s"),
        "helios_over_full_depth_throughput": ratio("helios", "full_depth", "output_tokens_per_s"),
        "helios_over_ee_baseline_batch": ratio("helios", "ee_baseline", "max_concurrent_batch"),
        "helios_single_over_ee_baseline_throughput": ratio("helios_single", "ee_baseline", "output_tokens_per_s"),
        "helios_single_over_ee_baseline_batch": ratio("helios_single", "ee_baseline", "max_concurrent_batch"),
        "helios_over_helios_single_throughput": ratio("helios", "helios_single", "output_tokens_per_s"),
        "serve_over_in_process_throughput": ratio("helios_serve", "helios", "output_tokens_per_s"),
        "helios_accuracy_minus_full_depth": (results["helios"]["accuracy"] - results["full_depth"]["accuracy"])
        if "helios" in results and "full_depth" in results else None,
        "helios_perplexity_over_full_depth": ratio("helios", "full_depth", "perplexity"),
        **{f"serve_over_in_process_throughput_{mine['load']}": _per_load(mine, theirs)
           for mine, theirs in zip(results.get("helios_serve", {}).get("loads", []),
                                   results.get("helios", {}).get("loads", []))},
    }


def _per_load(mine: dict, theirs: dict) -> float | None:
    return mine["output_tokens_per_s"] / theirs["output_tokens_per_s"] if theirs["output_tokens_per_s"] else None


def nan_to_none(x):
    """JSON has no NaN/inf: None instead (recursively)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    return x
