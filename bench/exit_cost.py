"""Where Helios' decode time goes on this machine: what exit checks cost, and what the policy measures.

    python bench/exit_cost.py [--model helios-demo-mixed-16l] [--batches 4 8] [--threads 1] [--repeat 1]
                              [--no-policy]

1. Decode step time of one model (`LLMEngine` directly, prefill excluded, greedy, 48 tokens per
   sequence from the `mixed` prompts) for: no exits; exit checks at every layer that nobody passes
   (threshold 2: the checks' cost alone); thresholds 0.5 and 0.9 at every layer; threshold 0.5 every
   4 layers; the same with the exit probes (`exit_probes.safetensors`, measure `probe`: nobody exits,
   0.9, 0.95); and 8 layers loaded (models deeper than 8), with and without exits. `--repeat N`
   runs the table N times (timings on a shared machine are noisy: compare rows of one run).
2. What the HELIOS policy measures while profiling each registry model (5 requests each, full
   depth) during the warm-up `helios bench` runs (24 `mixed` requests, all queued at once, the
   52 MiB budget of B0 = 4): the request-based TPOT, and the step-time fit's prediction for a step
   at batch 4 with the profiled exits; next to each model's decode step measured at batch 4 with its
   registry exits (what the fit predicts) and without exits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helios_core.benchmark.runner import BenchConfig, _build, _requests, baseline_budget  # noqa: E402
from helios_core.benchmark.systems import drive  # noqa: E402
from helios_core.benchmark.workload import load_workload  # noqa: E402
from helios_core.engine import EngineConfig, LLMEngine  # noqa: E402
from helios_core.exits import ExitConfig  # noqa: E402
from helios_core.models import ModelConfig  # noqa: E402
from helios_core.policy import Registry, exit_walk  # noqa: E402
from helios_core.sampling import SamplingParams  # noqa: E402

CASES = [  # (label, loaded layers, early exit, threshold, exit layers every K, measure)
    ("no exits", None, False, 0.5, None, "max_prob"),
    ("checks at every layer, nobody exits (threshold 2)", None, True, 2.0, None, "max_prob"),
    ("threshold 0.5, every layer", None, True, 0.5, None, "max_prob"),
    ("threshold 0.9, every layer", None, True, 0.9, None, "max_prob"),
    ("threshold 0.5, every 4 layers", None, True, 0.5, 4, "max_prob"),
    ("probe checks at every layer, nobody exits (threshold 2)", None, True, 2.0, None, "probe"),
    ("probe threshold 0.9, every layer", None, True, 0.9, None, "probe"),
    ("probe threshold 0.95, every layer", None, True, 0.95, None, "probe"),
    ("8 layers loaded, no exits", 8, False, 0.5, None, "max_prob"),
    ("8 layers loaded, threshold 0.5, every layer", 8, True, 0.5, None, "max_prob"),
]
PROBES = "exit_probes.safetensors"  # `helios train-exits --probes` output in each demo model's directory


def exits(model: Path, threshold: float, every: int | None, measure: str = "max_prob") -> ExitConfig:
    """Exit checks at `threshold` every `every` layers (None: at every layer); `probe` reads the model's probes."""
    num_layers = ModelConfig.from_pretrained(model).num_layers
    return ExitConfig(threshold=threshold, measure=measure,
                      exit_layers=tuple(range(every, num_layers, every)) if every else None,
                      heads_path=str(Path(model) / PROBES) if measure == "probe" else None)


def prefilled(engine, batch: int, params):
    """`engine` with the first `batch` `mixed` prompts queued and prefilled: the next steps decode them all.
    `params`: greedy SamplingParams (of the engine's own package, for bench/decode_ab.py)."""
    for r in load_workload("mixed", batch):
        engine.add_request(r.prompt, params)
    while engine.scheduler.waiting or any(s.needs_prefill for s in engine.scheduler.running):
        engine.step()
    return engine


def step_time(model: Path, batch: int, layers: int | None, early_exit: bool, exit: ExitConfig,
              tokens: int = 48) -> tuple[float, float]:
    """(seconds per decode step, mean exit layer) with `batch` sequences decoding together."""
    engine = prefilled(LLMEngine(EngineConfig(model=str(model), num_layers=layers, early_exit=early_exit,
                                              memory_budget=256 << 20, max_model_len=1024, exit=exit)),
                       batch, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    histogram = engine.stats.histogram
    mean_exit = sum(d * n for d, n in histogram.items()) / max(sum(histogram.values()), 1)
    return (time.perf_counter() - start) / steps, mean_exit


def profiled() -> dict[str, tuple[float | None, float | None]]:
    """model -> (TPOT, the step fit's batch-4 full-depth step) in the policy after the `helios bench` warm-up."""
    cfg = BenchConfig()
    registry = Registry.load(ROOT / cfg.registry)
    helios = _build("helios", cfg, registry, baseline_budget(registry, cfg.baseline, cfg.b0, cfg.max_model_len))
    drive(helios, _requests(load_workload(cfg.workload, cfg.warmup, 32), "warmup"), concurrency=cfg.warmup)
    pht = helios.orch.policy.pht
    out = {}
    for name, row in pht.rows.items():
        fit = pht.step_fit(name)
        L = row.num_layers
        points = registry[name].exit_config().exit_points(L)  # what profiling checked
        layers, checks = exit_walk(points, L, {d: n / row.tokens for d, n in row.histogram.items()})
        step = fit.seconds(L, 4 * layers, 4 * checks, 4) if fit else None
        out[name] = (row.time_per_token_s, step)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="helios-demo-mixed-16l")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="run the decode-step table N times")
    ap.add_argument("--no-policy", action="store_true", help="skip part 2 (what the policy measures while profiling)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = ROOT / "models" / args.model
    depth = ModelConfig.from_pretrained(model).num_layers
    cases = [c for c in CASES if c[1] is None or c[1] < depth]  # partial loading needs a deeper model
    step_time(model, 1, None, False, ExitConfig(), tokens=8)  # warm-up: first-call costs
    for run in range(1, args.repeat + 1):
        print(f"## Decode step of {args.model} ({args.threads} thread(s)), run {run} of {args.repeat}\n")
        print("| case | " + " | ".join(f"batch {b}: ms/step (mean exit layer)" for b in args.batches) + " |")
        print("|---|" + "---:|" * len(args.batches))
        for label, layers, early_exit, threshold, every, measure in cases:
            cells = [step_time(model, b, layers, early_exit, exits(model, threshold, every, measure))
                     for b in args.batches]
            print(f"| {label} | " + " | ".join(f"{s * 1e3:.1f} ({m:.2f})" for s, m in cells) + " |", flush=True)
        print()
    if args.no_policy:
        return
    print("\n## What the policy measured vs the decode step at batch 4\n")
    print("| model | layers | profiled TPOT ms | step fit, batch 4 ms | decode step, registry exits ms | "
          "decode step, no exits ms |")
    print("|---|---:|---:|---:|---:|---:|")
    registry = Registry.load(ROOT / "models" / "registry.yaml")
    for name, (tpot, fitted) in profiled().items():
        entry = registry[name]
        with_exits, _ = step_time(entry.path, 4, None, True, entry.exit_config())
        plain, _ = step_time(entry.path, 4, None, False, entry.exit_config())
        ms = lambda x: f"{x * 1e3:.1f}" if x is not None else "-"  # noqa: E731
        print(f"| {name} | {entry.num_layers} | {ms(tpot)} | {ms(fitted)} | {ms(with_exits)} | {ms(plain)} |",
              flush=True)


if __name__ == "__main__":
    main()
