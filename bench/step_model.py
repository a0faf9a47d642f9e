"""Which step-time model the decode steps justify: the policy's fit, checked where it must extrapolate.

    python bench/step_model.py [--threads 1] [--tokens 20]

Each registry model (its registry exits) decodes `mixed` prompts at batches 1, 2, 4, 8 with L, L/2
and 2 layers loaded; every decode step is recorded (`StepRecord`). Two models are fitted on the
full-depth steps only (what profiling sees) and scored against the median step of each (depth,
batch) group: the median relative error of their predictions (at the group's mean layer-rows) at
full depth and at the partial depths. Group medians, because single steps on a shared CPU are noisy.
  helios   per_layer_s x depth + per_row_layer_s x layer-rows (`helios_core.policy.pht.fit_steps`)
  no depth a + b x layer-rows (least squares with an intercept)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helios_core.benchmark.workload import load_workload  # noqa: E402
from helios_core.engine import EngineConfig, LLMEngine  # noqa: E402
from helios_core.policy import Registry, fit_steps  # noqa: E402
from helios_core.policy.pht import sample  # noqa: E402
from helios_core.sampling import SamplingParams  # noqa: E402
from helios_core.telemetry import StepRecord  # noqa: E402


def record_steps(path: Path, exit_config, depths: list[int], tokens: int) -> list[StepRecord]:
    engine = LLMEngine(EngineConfig(model=str(path), memory_budget=256 << 20, max_model_len=512, exit=exit_config))
    prompts = [r.prompt for r in load_workload("mixed", 16)]
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warm-up: first-call costs
    engine.drain_steps()
    for depth in depths:
        engine.set_num_layers(depth)
        for batch in (1, 2, 4, 8):
            engine.generate(prompts[batch : 2 * batch], SamplingParams(max_tokens=tokens, temperature=0,
                                                                       ignore_eos=True))
    return [s for s in engine.drain_steps() if s.rows and not s.prefill_tokens]  # decode-only steps


def no_depth_fit(steps: list[StepRecord]):
    """a + b x layer-rows by least squares."""
    xs, ts = [s.layer_rows for s in steps], [s.seconds for s in steps]
    mx, mt = statistics.fmean(xs), statistics.fmean(ts)
    b = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / sum((x - mx) ** 2 for x in xs)
    return lambda s: mt - b * mx + b * s.layer_rows


def median_error(predict, steps: list[StepRecord]) -> float:
    groups: dict[tuple[int, int], list[StepRecord]] = {}
    for s in steps:
        groups.setdefault((s.depth, s.rows), []).append(s)
    errors = []
    for (depth, rows), group in groups.items():
        if len(group) >= 3:
            typical = StepRecord(statistics.median(s.seconds for s in group), rows, depth,
                                 round(statistics.fmean(s.layer_rows for s in group)))
            errors.append(abs(predict(typical) - typical.seconds) / typical.seconds)
    return statistics.median(errors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | fit on full depth | per layer ms | per row-layer ms | error at L | error at L/2 and 2 |")
    print("|---|---|---:|---:|---:|---:|")
    for entry in Registry.load(ROOT / "models" / "registry.yaml"):
        L = entry.num_layers
        steps = record_steps(entry.path, entry.exit_config(), [L, max(2, L // 2), 2], args.tokens)
        full, partial = [s for s in steps if s.depth == L], [s for s in steps if s.depth < L]
        fit = fit_steps([sample(s) for s in full])
        rows = [("helios", lambda s: fit.seconds(s.depth, s.layer_rows, s.check_rows, s.rows),
                 f"{fit.per_layer_s * 1e3:.3f} | {fit.per_row_layer_s * 1e3:.3f}"),
                ("no depth", no_depth_fit(full), "- | -")]
        for label, predict, coefficients in rows:
            print(f"| {entry.name} | {label} | {coefficients} | {median_error(predict, full):.0%} | "
                  f"{median_error(predict, partial):.0%} |", flush=True)


if __name__ == "__main__":
    main()
