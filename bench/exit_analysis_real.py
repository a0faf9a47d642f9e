"""The two HELIOS observations on the real family, whose models have different tokenizers.

    python bench/exit_analysis_real.py [--registry models/registry-real.yaml] [--limit 2048] \\
        [--json bench/results-real/exit_analysis.json] [--threads 1]

As bench/exit_analysis.py (held-out code = `stdlib`, prose = `pydoc`, teacher-forced, fp32 CPU), but each
model is read as its registry entry serves it: its trained exit heads, its confidence measure (the probe)
and its exit points, at thresholds 0.8, 0.9 and 0.95.

Text: every held-out file is cut to the same characters for all models: its first c tokens on the first
model's tokenizer, c chosen so they add up to --limit. Each file is read in its own chunks and without an
end-of-text token (its id differs between the models and no character stands for it).

(1) complementary exits. The tokenizers differ, so tokens are compared at *aligned* positions: those
    predicting a token that starts at the same character on every model (`quality.aligned_positions`),
    where the models have read the same text. Among tokens not early on A, the share early on B, and the
    share early on at least one model ("together"). Early has two definitions: exit depth <= half the
    model's layers (as exit_analysis.py), and exited before the last layer (any exit at all: SmolLM2's
    first exit point is 16 of its 30 layers, so it can never leave by half).
(2) forced exits usually equal the final token:
    - low-confidence agreement (full pass): at each exit point, among tokens whose confidence (the probe)
      is below the threshold, the share whose head's top-1 equals the final layer's top-1; also pooled
      over every exit point;
    - forced exits with only k layers loaded, k each exit point (`simulate_exits(..., loaded_layers=k)`),
      as exit_analysis.py's (2b).

Prints markdown tables; writes everything to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch

from exit_analysis import (  # noqa: E402
    PAPER,
    SOURCES,
    _mean,
    complementary,
    forced_exit_agreement,
    low_confidence_agreement,
    measure,
    pct,
    per_file_cap,
    print_forced,
)
from helios_core.engine import load_tokenizer  # noqa: E402
from helios_core.exits import check_probes, load_exit_heads  # noqa: E402
from helios_core.models import load_model  # noqa: E402
from helios_core.policy import Registry  # noqa: E402
from helios_core.quality import aligned_positions, token_starts  # noqa: E402
from helios_core.train import held_out_files  # noqa: E402

THRESHOLDS = (0.8, 0.9, 0.95)
EARLY = {"half": 0.5, "before_last": None}  # definition -> cross_tab's early_fraction


def held_out_texts(spec: str, tokenizer, limit: int | None) -> list[dict]:
    """Every held-out file of a builtin source, cut to its first c tokens on `tokenizer` (c: the smallest cap
    giving `limit` tokens in all, as exit_analysis.held_out_tokens), as text, so each model reads the same."""
    files = held_out_files(spec)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    offsets = [tokenizer(t, add_special_tokens=False, return_offsets_mapping=True).offset_mapping for t in texts]
    cap = per_file_cap([len(o) for o in offsets], limit)
    return [{"file": f"{f.parent.name}/{f.name}", "text": t if len(o) <= cap else t[: o[cap][0]], "file_chars": len(t)}
            for f, t, o in zip(files, texts, offsets)]


def tokenize(texts: list[dict], tokenizer, chunk_len: int) -> tuple[list[list[int]], list[int]]:
    """Chunks of each text's ids (with the tokenizer's BOS, if any) and, per predicted position in chunk
    order, the character where its predicted token starts (texts laid end to end; -1: none)."""
    chunks, starts, base = [], [], 0
    for t in texts:
        enc = tokenizer(t["text"], return_offsets_mapping=True)
        ids, file_starts = enc.input_ids, [s + base if s >= 0 else -1 for s in token_starts(enc.offset_mapping)]
        for i in range(0, len(ids), chunk_len):
            chunks.append(ids[i : i + chunk_len])
            starts += file_starts[i + 1 : i + chunk_len]  # a chunk's first token is read, not predicted
        base += len(t["text"]) + 1  # +1: no token spans two files
    return chunks, starts


def exit_summary(r: dict, points: list[int]) -> dict:
    """Per exit point (full pass) and per threshold (exit pass): where tokens leave and how well."""
    layers, final = r["layers"], r["full"]["top1"][:, -1]
    depths = points + [layers]
    out = {"per_depth": {d: {"perplexity": float(r["full"]["nll"][:, i].double().mean().exp()),
                             "agreement": _mean(r["full"]["top1"][:, i] == final),
                             "mean_confidence": _mean(r["full"]["conf"][:, i])} for i, d in enumerate(depths)},
           "exit": {}}
    for t, e in r["exits"].items():
        out["exit"][t] = {"exit_share": {d: _mean(e["depth"] == d) for d in depths},
                          "mean_exit_layer": _mean(e["depth"]), "early_half_share": _mean(e["depth"] <= layers / 2),
                          "before_last_share": _mean(e["depth"] < layers), "agreement": _mean(e["top1"] == final),
                          "perplexity": float(e["nll"].double().mean().exp())}
    return out


# --- printing -------------------------------------------------------------------------------------
def print_exits(name: str, summaries: dict) -> None:
    depths = next(iter(summaries.values()))["per_depth"]
    print(f"\n### {name}: per exit point (full pass: the head's top-1 == the final layer's, perplexity, mean probe)\n")
    print("| depth |" + "".join(f" {s} agree | {s} ppl | {s} conf |" for s in summaries))
    print("|---:|" + "---:|" * 3 * len(summaries))
    for d in depths:
        print(f"| {d} |" + "".join(f" {pct(s['per_depth'][d]['agreement'])} | {s['per_depth'][d]['perplexity']:.2f} |"
                                   f" {s['per_depth'][d]['mean_confidence']:.3f} |" for s in summaries.values()))
    print(f"\nExit pass: share of tokens leaving at each depth ({', '.join(map(str, depths))})\n")
    print("| source | threshold | leave at | mean exit layer | by L/2 | before last | agreement with final | ppl |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for src, s in summaries.items():
        for t, e in s["exit"].items():
            shares = " / ".join(pct(x) for x in e["exit_share"].values())
            print(f"| {src} | {t} | {shares} | {e['mean_exit_layer']:.2f} | {pct(e['early_half_share'])} |"
                  f" {pct(e['before_last_share'])} | {pct(e['agreement'])} | {e['perplexity']:.2f} |")


def print_complementary(comp: dict, names: list[str]) -> None:
    a, b = names
    print(f"\n## (1) Complementary exits at aligned positions (A = {a}, B = {b})\n")
    print("| early = | source | threshold | aligned tokens | early on A | early on B | B if not A | A if not B | together |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for definition, by_src in comp.items():
        for src, by_t in by_src.items():
            for t, c in by_t.items():
                ab = next(p for p in c["pairs"] if p["a"] == a)
                print(f"| {definition} | {src} | {t} | {c['tokens']} | {pct(c['early_share'][a])} | {pct(c['early_share'][b])} |"
                      f" {pct(ab['b_early_given_a_late'])} | {pct(ab['a_early_given_b_late'])} | {pct(c['together_share'])} |")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", default=str(ROOT / "models" / "registry-real.yaml"))
    ap.add_argument("--limit", type=int, default=2048, help="held-out tokens per source on the first model's tokenizer")
    ap.add_argument("--chunk-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    entries = list(Registry.load(args.registry, "float32"))
    if len(entries) != 2:
        raise SystemExit(f"{args.registry}: complementary exits compare two models, found {len(entries)}")
    names = [e.name for e in entries]
    tokenizers = {e.name: load_tokenizer(e.path) for e in entries}
    points = {e.name: list(e.exit_config().exit_points(e.num_layers)) for e in entries}

    sources, results, starts, aligned = {}, {n: {} for n in names}, {n: {} for n in names}, {}
    for src, spec in SOURCES.items():
        texts = held_out_texts(spec, tokenizers[names[0]], args.limit)
        sources[src] = {"source": spec, "chars": sum(len(t["text"]) for t in texts), "tokens": {},
                        "files": [{"file": t["file"], "chars": len(t["text"]), "file_chars": t["file_chars"]} for t in texts]}
        for e in entries:
            chunks, starts[e.name][src] = tokenize(texts, tokenizers[e.name], args.chunk_len)
            config = e.exit_config()
            t0 = time.perf_counter()
            net = load_model(e.path, dtype="float32", device="cpu", max_len=max(len(c) for c in chunks))
            heads = load_exit_heads(config.heads_path, net)
            check_probes(heads, config)
            results[e.name][src] = measure(net, heads, chunks, args.batch_size, config, THRESHOLDS,
                                           ks=points[e.name], depths=points[e.name] + [e.num_layers])
            sources[src]["tokens"][e.name] = len(starts[e.name][src])
            print(f"{e.name} on {src} ({spec}): {len(starts[e.name][src])} tokens, {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
        aligned[src] = dict(zip(names, aligned_positions(starts[names[0]][src], starts[names[1]][src])))
        sources[src]["aligned_tokens"] = len(aligned[src][names[0]])

    out = {"command": "python bench/exit_analysis_real.py " + " ".join(sys.argv[1:]), "registry": args.registry,
           "limit": args.limit, "chunk_len": args.chunk_len, "threads": args.threads, "dtype": "float32",
           "device": "cpu", "cpu": cpu_name(), "torch": torch.__version__, "thresholds": THRESHOLDS,
           "paper": PAPER, "models": {}, "sources": sources, "complementary": {}, "forced_exits": {}}
    layers = {e.name: e.num_layers for e in entries}
    for definition, fraction in EARLY.items():
        comp = out["complementary"][definition] = {}
        for src in list(SOURCES) + ["all"]:
            srcs = list(SOURCES) if src == "all" else [src]
            comp[src] = {t: complementary({n: torch.cat([results[n][s]["exits"][t]["depth"][aligned[s][n]]
                                                         for s in srcs]) for n in names}, layers, t, fraction)
                         for t in THRESHOLDS}
    for e in entries:
        n, depths = e.name, points[e.name] + [e.num_layers]
        groups = [(f"{k}", [k]) for k in points[n]] + [(f"{points[n][0]}-{points[n][-1]} (pooled)", points[n])]
        out["models"][n] = {"layers": e.num_layers, "exit_points": points[n], "measure": e.measure,
                            "exit_heads": os.path.relpath(e.exit_heads, ROOT), "registry_threshold": e.threshold,
                            "by_source": {src: exit_summary(results[n][src], points[n]) for src in SOURCES}}
        out["forced_exits"][n] = {src: {"low_confidence": low_confidence_agreement(results[n][src], groups, THRESHOLDS, depths),
                                        "forced": forced_exit_agreement(results[n][src])} for src in SOURCES}
    out["elapsed_s"] = time.perf_counter() - started

    print(f"# Exit analysis of the real family ({out['command']})\n")
    print(f"{out['cpu']}, {args.threads} thread(s), float32, torch {torch.__version__}\n")
    for src, s in sources.items():
        print(f"- {src}: `{s['source']}` held-out files, {len(s['files'])} files cut to {s['chars']} characters; predicted tokens "
              + ", ".join(f"{n} {k}" for n, k in s["tokens"].items()) + f"; aligned {s['aligned_tokens']}")
    for n in names:
        print_exits(n, out["models"][n]["by_source"])
    print_complementary(out["complementary"], names)
    print_forced(out["forced_exits"], THRESHOLDS)
    print(f"\n{out['elapsed_s']:.0f} s on {args.threads} thread(s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
