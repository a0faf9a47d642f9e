"""What a layer load costs the requests that keep running: inter-token gaps around `set_num_layers`.

    python bench/load_stall.py --model ~/.cache/helios/models/smollm2-135m-instruct \
        [--rev 02ea9b2] [--batch 8] [--from-layers 20] [--threads 2]

An engine at `--from-layers` decodes `--batch` `mixed` prompts; after a few tokens it loads every
layer, and decoding goes on. Per request: the longest wait between two of its tokens after the load,
and the steps until every request is back at full depth. With `--rev`, the same run on another git
revision (imported as in bench/decode_ab.py) first, for a before/after in one process. fp32.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from decode_ab import import_revision  # noqa: E402
from helios_core.benchmark.workload import load_workload  # noqa: E402


def run(pkg, model: Path, batch: int, from_layers: int) -> dict:
    engine_mod = importlib.import_module(f"{pkg.__name__}.engine")
    sampling = importlib.import_module(f"{pkg.__name__}.sampling")
    engine = engine_mod.LLMEngine(engine_mod.EngineConfig(model=str(model), num_layers=from_layers, dtype="float32",
                                                          early_exit=False, max_model_len=1024))
    params = sampling.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ids = [engine.add_request(r.prompt, params) for r in load_workload("mixed", batch)]
    last = {}  # request -> time of its latest token
    gaps = {i: [] for i in ids}
    depth_of = {}

    def step() -> None:
        for out in engine.step():
            now = time.perf_counter()
            if out.new_token_ids:
                if out.request_id in last:
                    gaps[out.request_id].append(now - last[out.request_id])
                last[out.request_id] = now
                depth_of[out.request_id] = out.new_records[-1].exit_layer

    while len(last) < batch or min(len(g) for g in gaps.values()) < 4:
        step()
    before = statistics.median(g for v in gaps.values() for g in v)
    for v in gaps.values():
        v.clear()
    full = engine.model_config.num_layers
    start = time.perf_counter()
    engine.set_num_layers(full)
    load_s = time.perf_counter() - start
    steps = 0
    while engine.has_unfinished() and any(depth_of.get(i) != full for i in ids if i in engine._requests):
        step()
        steps += 1
    worst = max(max(v) for v in gaps.values() if v)
    return {"median_gap_before_s": before, "load_s": load_s, "worst_gap_after_s": worst,
            "steps_to_full_depth": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rev", default=None, help="another git revision to run first (before/after)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--from-layers", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = Path(args.model).expanduser()
    import helios_core as current

    print(f"{model.name}: {args.batch} requests decoding at {args.from_layers} layers, then every layer loaded")
    print("| revision | median token gap before (s) | load (s) | worst token gap after (s) | steps to full depth |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, pkg in ([(args.rev, import_revision(args.rev, Path(tmp)))] if args.rev else []) + [("working tree", current)]:
            r = run(pkg, model, args.batch, args.from_layers)
            print(f"| {name} | {r['median_gap_before_s']:.3f} | {r['load_s']:.2f} | {r['worst_gap_after_s']:.3f} | "
                  f"{r['steps_to_full_depth']} |", flush=True)


if __name__ == "__main__":
    main()
