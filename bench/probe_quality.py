"""Quality vs speed of early exit with max_prob and with the exit probes, side by side in one process.

    python bench/probe_quality.py [--model helios-demo-mixed-16l] [--max-prob 0.5 0.8 0.9 0.95]
                                  [--probe 0.8 0.9 0.95 0.97] [--prompts bench/data/mixed.jsonl] [--text-tokens 4096]

Per (measure, threshold), every layer an exit point, the model fully loaded:
- generation (`helios eval --prompts`): greedy token agreement with full depth, perplexity of the
  outputs under the full model, mean exit layer, and tokens/s of the early-exit run next to the
  full-depth run of the same evaluation (their ratio is the speed-up; one process, batch = prompts);
- teacher-forced (`helios eval --text`) on the held-out stdlib and pydoc files (`--text-tokens` each):
  top-1 accuracy against the text and perplexity at each token's exit layer, vs the final layer's.
The probes are `exit_probes.safetensors` in the model's directory (`helios train-exits --probes`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helios_core.evaluate import evaluate, load_prompts  # noqa: E402
from helios_core.exits import ExitConfig  # noqa: E402
from helios_core.quality import evaluate_text  # noqa: E402


def row(model: Path, prompts, measure: str, threshold: float, text_tokens: int) -> str:
    heads = str(model / "exit_probes.safetensors") if measure == "probe" else None
    gen = evaluate(str(model), prompts, threshold, measure=measure, exit_heads=heads, device="cpu")
    acc, ppl, acc_full, ppl_full = [], [], [], []
    for source in ("stdlib", "pydoc"):
        text = evaluate_text(str(model), source, ExitConfig(threshold=threshold, measure=measure, heads_path=heads),
                             limit=text_tokens, device="cpu")
        acc.append(text.exit.accuracy)
        ppl.append(text.exit.perplexity)
        acc_full.append(text.depths[-1].accuracy)
        ppl_full.append(text.depths[-1].perplexity)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return (f"| {measure} | {threshold} | {gen.token_agreement:.1%} | {gen.perplexity_early:.3f} "
            f"({gen.perplexity_full:.3f}) | {gen.mean_exit_layer:.2f} | {gen.tokens_per_s_early:.0f} / "
            f"{gen.tokens_per_s_full:.0f} = {gen.tokens_per_s_early / gen.tokens_per_s_full:.2f}x | "
            f"{mean(acc):.1%} ({mean(acc_full):.1%}) | {mean(ppl):.2f} ({mean(ppl_full):.2f}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="helios-demo-mixed-16l")
    ap.add_argument("--max-prob", type=float, nargs="*", default=[0.5, 0.8, 0.9, 0.95])
    ap.add_argument("--probe", type=float, nargs="*", default=[0.8, 0.9, 0.95, 0.97])
    ap.add_argument("--prompts", default=str(ROOT / "bench/data/mixed.jsonl"))
    ap.add_argument("--limit", type=int, default=None, help="at most N prompts")
    ap.add_argument("--text-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = ROOT / "models" / args.model
    prompts = load_prompts(args.prompts)[: args.limit]
    evaluate(str(model), prompts[:2], 0.5, max_tokens=8, device="cpu")  # warm-up: first-call costs
    print(f"## {args.model}: early exit at every layer, {len(prompts)} prompts, {args.text_tokens} held-out "
          f"tokens of stdlib and of pydoc ({args.threads} thread(s))\n")
    print("| measure | threshold | token agreement | output ppl (full) | mean exit layer | tok/s early / full "
          "| text accuracy (final layer) | text ppl (final layer) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for measure, thresholds in (("max_prob", args.max_prob), ("probe", args.probe)):
        for t in thresholds:
            print(row(model, prompts, measure, t, args.text_tokens), flush=True)


if __name__ == "__main__":
    main()
