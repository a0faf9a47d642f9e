"""Choosing a probe gate: quality and decode speed of max-prob exits behind an exit-probe gate.

    python bench/probe_gate.py [--models code-6l prose-12l mixed-16l] [--gates 0.2 0.3 0.4 0.5]
                               [--batch 8] [--text-tokens 4096]

Per demo model, at its registry threshold and exit points, with the probes of its
`exit_probes.safetensors`, for no gate and each gate:
- teacher-forced on the held-out stdlib and pydoc text (`--text-tokens` each): accuracy against the
  text, perplexity, agreement with the final layer, mean exit layer (means of the two sources);
- the decode step at `--batch` (the `mixed` prompts, 40 greedy tokens per sequence, prefill
  excluded): the gated engine's steps alternate with the ungated engine's in one process, and the
  figure is the median over step pairs of gated ÷ ungated time.
A gate can only delay exits (max_prob still decides), so quality moves towards the final layer's;
the speed-up is the LM-head rows it saves. Pick the largest gain whose quality you accept and write
it as the model's `probe_gate` in models/registry.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from decode_ab import alternate  # noqa: E402
from exit_cost import PROBES, prefilled  # noqa: E402

from helios_core.engine import EngineConfig, LLMEngine  # noqa: E402
from helios_core.exits import ExitConfig  # noqa: E402
from helios_core.policy import Registry  # noqa: E402
from helios_core.quality import evaluate_text  # noqa: E402
from helios_core.sampling import SamplingParams  # noqa: E402


def quality(model: Path, exit: ExitConfig, tokens: int) -> dict[str, float]:
    reports = [evaluate_text(str(model), source, exit, limit=tokens, device="cpu").exit for source in ("stdlib", "pydoc")]
    return {k: statistics.fmean(getattr(r, k) for r in reports)
            for k in ("accuracy", "perplexity", "agreement", "mean_exit_layer")}


def speed_ratio(model: Path, base: ExitConfig, gated: ExitConfig, batch: int) -> float:
    """Median over alternating step pairs of the gated step's time over the ungated one's."""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ungated, with_gate = (prefilled(LLMEngine(EngineConfig(model=str(model), exit=exit, memory_budget=256 << 20,
                                                            max_model_len=1024)), batch, params)
                          for exit in (base, gated))
    a, b = alternate(ungated, with_gate)
    return statistics.median(y / x for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["code-6l", "prose-12l", "mixed-16l"])
    ap.add_argument("--gates", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-tokens", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(1)
    registry = Registry.load(ROOT / "models" / "registry.yaml")
    print("| model | gate | accuracy | perplexity | agreement with final layer | mean exit layer "
          f"| step time ÷ no gate, batch {args.batch} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        entry = registry[f"helios-demo-{name}"]
        base = dataclasses.replace(entry.exit_config(), probe_gate=None, heads_path=str(entry.path / PROBES))
        for gate in (None, *args.gates):
            exit = dataclasses.replace(base, probe_gate=gate)
            q = quality(entry.path, exit, args.text_tokens)
            speed = "1" if gate is None else f"{speed_ratio(entry.path, base, exit, args.batch):.2f}"
            print(f"| {name} | {gate if gate is not None else 'none'} | {q['accuracy']:.3f} | {q['perplexity']:.2f} "
                  f"| {q['agreement']:.3f} | {q['mean_exit_layer']:.2f} | {speed} |", flush=True)


if __name__ == "__main__":
    main()
