"""Global (the paper: one active model) vs per-request (every candidate live, routed by task) mode.

Same registry, same total memory budget, same prompts, both modes in one run, in process:

    python bench/policy_modes.py [--workloads mixed shift] [--limit 96] [--max-tokens 32] [--json out.json]

Reports output tokens/s, mean layers run per token, breach share, output perplexity (under the
exits that produced each token), loads and switches, and which model served each task.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from helios_core.orchestrator import Orchestrator, OrchestratorConfig  # noqa: E402
from helios_core.policy import PolicyConfig  # noqa: E402
from helios_core.sampling import SamplingParams  # noqa: E402
from prompts import load_prompts  # noqa: E402


def run(mode: str, workload: str, args) -> dict:
    prompts = load_prompts(workload)[: args.limit]
    orch = Orchestrator(OrchestratorConfig(registry=args.registry, memory_budget=args.budget << 20,
                                           max_model_len=1024, policy=PolicyConfig(slo=args.slo, mode=mode)))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    done = orch.generate([p["prompt"] for p in prompts], params, [p["task"] for p in prompts])
    seconds = time.perf_counter() - start
    records = [r for c in done for r in c.records]
    served = defaultdict(Counter)
    for p, c in zip(prompts, done):
        served[p["task"]][c.summary.model] += 1
    kinds = Counter(e.kind for e in orch.policy.events)
    return {
        "mode": mode, "workload": workload, "requests": len(done), "seconds": seconds,
        "output_tokens_per_s": len(records) / seconds,
        "mean_layers_per_token": sum(r.exit_layer for r in records) / len(records),
        "breach_share": sum(r.breach for r in records) / len(records),
        "perplexity": math.exp(-sum(r.logprob for r in records) / len(records)),
        "loads": kinds["load"], "switches": kinds["switch"], "profiles": kinds["profile"],
        "served_by_task": {t: dict(c) for t, c in served.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", default=str(ROOT / "models" / "registry.yaml"))
    ap.add_argument("--workloads", nargs="+", default=["mixed", "shift"])
    ap.add_argument("--limit", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--budget", type=int, default=96, help="total memory budget, MiB")
    ap.add_argument("--slo", default="throughput")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for workload in args.workloads:
        for mode in ("global", "per-request"):
            r = run(mode, workload, args)
            results.append(r)
            print(f"{workload:7} {mode:12} {r['output_tokens_per_s']:7.1f} tok/s  layers/token "
                  f"{r['mean_layers_per_token']:5.2f}  breaches {r['breach_share']:.2f}  ppl {r['perplexity']:.2f}  "
                  f"loads {r['loads']} switches {r['switches']}  {r['served_by_task']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "results": results},
                                        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
