"""Decode step time of this checkout against another git revision, side by side in one process.

    python bench/decode_ab.py --rev 0461053 [--repeat 3] [--cases code-6l:7 mixed-16l:8]
    python bench/decode_ab.py --rev 02ea9b2 --cases ~/.cache/helios/models/smollm2-135m-instruct:32 --no-exits

The other revision's `helios_core` is extracted (`git archive`) and imported under another name, so
both engines live in one process. Per case, both decode the same `mixed` prompts at the same batch
(40 greedy tokens per sequence, prefill excluded) and their steps alternate A, B, A, B: each pair of
steps sees the same machine, which on a shared VM matters more than anything (identical runs a few
seconds apart differ by ±25%). The figure is the median over step pairs of B's time ÷ A's, with
each side's median step time. Cases: no exits; checks at every layer that nobody passes (threshold
2); thresholds 0.5 and 0.9 at every layer; and both every 4 layers (`--no-exits`: the first only, for
a model without trained exits). A case's model is a demo model's suffix or a checkpoint directory.
`--dtype` sets both engines' dtype (`--config` only B's fields).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from exit_cost import prefilled  # noqa: E402

CASES = [(False, 0.5, None), (True, 2.0, None), (True, 0.5, None), (True, 0.9, None), (True, 0.5, 4), (True, 0.9, 4)]


def import_revision(rev: str, into: Path):
    """The package `helios_core` as of `rev`, importable as `helios_rev`."""
    archive = subprocess.run(["git", "archive", rev, "helios_core"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "helios_core").rename(into / "helios_rev")
    sys.path.insert(0, str(into))
    return importlib.import_module("helios_rev")


def engine(pkg, model: Path, batch: int, early_exit: bool, threshold: float, every: int | None, **extra):
    engine_mod = importlib.import_module(f"{pkg.__name__}.engine")
    exits = importlib.import_module(f"{pkg.__name__}.exits")
    sampling = importlib.import_module(f"{pkg.__name__}.sampling")
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    exit = exits.ExitConfig(threshold=threshold, exit_layers=tuple(range(every, layers, every)) if every else None)
    # The default budget: room for 32 sequences of max_model_len at full depth, on either revision.
    e = engine_mod.LLMEngine(engine_mod.EngineConfig(model=str(model), early_exit=early_exit, exit=exit,
                                                     max_model_len=1024, **extra))
    return prefilled(e, batch, sampling.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))


def timed(e) -> float:
    start = time.perf_counter()
    e.step()
    return time.perf_counter() - start


def alternate(a, b) -> tuple[list[float], list[float]]:
    """Step two prefilled engines in turn until one finishes: each one's step times (first calls untimed)."""
    timed(a), timed(b)
    a_times, b_times = [], []
    while a.has_unfinished() and b.has_unfinished():
        a_times.append(timed(a))
        b_times.append(timed(b))
    return a_times, b_times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the git revision to compare against (A); B is this checkout")
    ap.add_argument("--repeat", type=int, default=3, help="fresh engine pairs per case")
    ap.add_argument("--cases", nargs="+", default=["code-6l:7", "mixed-16l:8"],
                    help="MODEL:BATCH (MODEL: a demo model's suffix or a checkpoint directory)")
    ap.add_argument("--no-exits", action="store_true", help="only the case without exits")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--config", type=json.loads, default={},
                    help='EngineConfig fields for B only, as JSON, e.g. \'{"block_size": 32}\'')
    ap.add_argument("--dtype", default="auto", help="both engines' dtype (auto: what each revision picks)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import helios_core as current

    with tempfile.TemporaryDirectory() as tmp:
        other = import_revision(args.rev, Path(tmp))
        print(f"| model | batch | exits | A {args.rev} ms/step | B working tree ms/step | B/A (median of pairs) "
              f"| mean exit A / B |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for spec in args.cases:
            name, batch = spec.rsplit(":", 1)
            model = Path(name).expanduser() if "/" in name else ROOT / "models" / f"helios-demo-{name}"
            name = model.name
            for early_exit, threshold, every in CASES[:1] if args.no_exits else CASES:
                a_times, b_times, ratios = [], [], []
                for _ in range(args.repeat):
                    a = engine(other, model, int(batch), early_exit, threshold, every, dtype=args.dtype)
                    b = engine(current, model, int(batch), early_exit, threshold, every,
                               **{"dtype": args.dtype, **args.config})
                    ta, tb = alternate(a, b)
                    a_times += ta
                    b_times += tb
                    ratios += [y / x for x, y in zip(ta, tb)]
                mean_exit = [sum(d * n for d, n in e.stats.histogram.items()) / sum(e.stats.histogram.values())
                             for e in (a, b)]
                label = "none" if not early_exit else f"{threshold} every {every or 1}"
                print(f"| {name} | {batch} | {label} | {statistics.median(a_times) * 1e3:.2f} | "
                      f"{statistics.median(b_times) * 1e3:.2f} | {statistics.median(ratios):.2f} | "
                      f"{mean_exit[0]:.2f} / {mean_exit[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
