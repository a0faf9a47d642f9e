"""Where a decode step's time goes: torch.profiler over 20 steps, full depth vs early exit.

    python bench/decode_profile.py [--model helios-demo-mixed-16l] [--batch 8] [--threshold 0.9]

One engine per case (`LLMEngine` directly, 1 thread, the `mixed` prompts, prefill done before the
profile starts); prints each case's operator table sorted by self CPU time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from exit_cost import exits, prefilled  # noqa: E402

from helios_core.engine import EngineConfig, LLMEngine  # noqa: E402
from helios_core.sampling import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="helios-demo-mixed-16l")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = ROOT / "models" / args.model
    for label, early_exit in (("full depth", False), (f"threshold {args.threshold}, every layer", True)):
        engine = prefilled(LLMEngine(EngineConfig(model=str(model), memory_budget=256 << 20, max_model_len=1024,
                                                  early_exit=early_exit, exit=exits(model, args.threshold, None))),
                           args.batch, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        for _ in range(3):  # warm-up: first-call costs
            engine.step()
        with torch.profiler.profile() as prof:
            for _ in range(20):
                engine.step()
        print(f"## {args.model}, batch {args.batch}, {label}\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), flush=True)


if __name__ == "__main__":
    main()
