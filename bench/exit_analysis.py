"""Exit analysis of the demo family on held-out code and prose, and the two HELIOS observations.

    python bench/exit_analysis.py [--limit 8000] [--json bench/exit_analysis.json] [--threads 1]

For each model of models/registry.yaml's demo family and each text source (code = `stdlib`,
prose = `pydoc`; only the held-out files, one in 50, see `helios_core.train.is_held_out`: 17 code
files, 9 prose files), `--limit` tokens are taken from all held-out files (the first c tokens of each,
c chosen so they add up to the limit), cut into 256-token chunks and read teacher-forced with
`helios_core.quality` (fp32, CPU):

- per depth: perplexity, top-1 accuracy, top-1 agreement with the final layer (every layer decoded
  through the shared final norm + LM head, the LayerSkip exits);
- the engine's exit decision (`simulate_exits`, max-prob confidence, every layer an exit point) at
  thresholds 0.5 (the demo registry's) and 0.8: the share of tokens exited by each depth.

The two HELIOS observations (arXiv 2504.10724):

(1) complementary exits. The three models share one tokenizer, so they see the same token sequence.
    A token exits *early* on a model when its exit depth is <= half the model's layers. For every
    ordered pair (A, B): among tokens that do not exit early on A, the share that do on B; and the
    share of tokens that exit early on at least one of the three ("together"), next to the best
    single model (the paper: 74% on one model, 92% together).
(2) forced exits usually equal the final token. Two measurements at shallow depths k (2, 3 and
    floor(L/3)):
    - low-confidence agreement (full pass): among tokens whose confidence at depth k is below a cut
      (0.8, 0.5, 0.2), the share whose depth-k top-1 equals the final layer's top-1; also pooled over
      every depth <= L/3;
    - forced exits (engine-simulated partial loading): only layers [0, k) loaded, tokens that do not
      reach the threshold by depth k are forced out at depth k (deeper positions' K/V come from the
      exit states, as in the engine); among forced tokens, the share whose top-1 equals the full
      model's final top-1 (the paper: 85%), also among forced tokens with confidence < 0.2.

Prints markdown tables; writes everything (incl. per-depth stats and histograms) to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

from helios_core.engine import load_tokenizer
from helios_core.exits import ExitConfig, ExitHeads
from helios_core.models import Transformer, load_model
from helios_core.quality import (
    TokenTable,
    batches,
    full_pass,
    chunk_tokens,
    cross_tab,
    exited_early,
    simulate_exits,
    summarize,
)
from helios_core.train import held_out_files

MODELS = ["helios-demo-code-6l", "helios-demo-prose-12l", "helios-demo-mixed-16l"]
SOURCES = {"code": "stdlib", "prose": "pydoc"}
THRESHOLDS = (0.5, 0.8)
CUTS = (0.8, 0.5, 0.2)  # confidence cuts for the low-confidence agreement
EARLY_FRACTION = 0.5
PAPER = {"single_model_early": 0.74, "together_early": 0.92, "forced_exit_agreement": 0.85}


def held_out_tokens(spec: str, tokenizer, limit: int | None) -> tuple[list[int], list[dict]]:
    """Token ids of every held-out file of a builtin source, each file cut to its first c tokens, with c
    the smallest cap that gives `limit` tokens in all (so every held-out file contributes, a long file
    does not fill the sample alone; `helios_core.quality.load_text_tokens` reads files in order instead).
    A file read whole ends with end-of-text."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    files = held_out_files(spec)
    texts = [tokenizer(f.read_text(encoding="utf-8", errors="replace")).input_ids + eos for f in files]
    cap = per_file_cap([len(t) for t in texts], limit)
    ids, used = [], []
    for f, t in zip(files, texts):
        ids += t[:cap]
        used.append({"file": f"{f.parent.name}/{f.name}", "tokens": min(len(t), cap), "file_tokens": len(t)})
    return ids[:limit], used


def per_file_cap(lengths: list[int], limit: int | None) -> int:
    """The smallest cap c with sum(min(length, c)) >= limit (the longest length if all fit)."""
    cap = max(lengths)
    if limit is not None and sum(lengths) > limit:
        lo, hi = 1, cap
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(min(n, mid) for n in lengths) >= limit:
                hi = mid
            else:
                lo = mid + 1
        cap = lo
    return cap


def shallow_depths(layers: int) -> list[int]:
    return sorted({d for d in (2, 3) if d < layers} | {max(1, layers // 3)})


def _mean(x: torch.Tensor) -> float | None:
    return float(x.float().mean()) if x.numel() else None


@torch.inference_mode()
def measure(net: Transformer, heads: ExitHeads, chunks: list[list[int]], batch_size: int,
            exit_config: ExitConfig = ExitConfig(), thresholds: tuple[float, ...] = THRESHOLDS,
            ks: list[int] | None = None, depths: list[int] | None = None) -> dict:
    """Per-token results of one model on one source: full pass (at `depths`, default every depth), exits at
    each threshold (exit_config's other settings), forced exits with only k layers loaded (default
    `shallow_depths`)."""
    layers = net.config.num_layers
    ks = ks or shallow_depths(layers)
    full = {"targets": [], "nll": [], "top1": [], "conf": []}
    exits = {t: {"depth": [], "nll": [], "top1": [], "conf": [], "forced": []} for t in thresholds}
    forced = {(t, k): {"forced": [], "top1": [], "conf": []} for t in thresholds for k in ks}
    configs = {t: replace(exit_config, threshold=t) for t in thresholds}
    for batch in batches(chunks, batch_size):
        tokens = torch.tensor(batch)
        targets = tokens[:, 1:].reshape(-1)
        nll, top1, conf = full_pass(net, heads, tokens, exit_config, depths)
        for key, v in zip(("targets", "nll", "top1", "conf"), (targets, nll, top1, conf)):
            full[key].append(v)
        for t, config in configs.items():
            trace = simulate_exits(net, heads, tokens, config)
            logits = trace.logits[:, :-1].reshape(-1, trace.logits.shape[-1])
            e = exits[t]
            e["depth"].append(trace.depth[:, :-1].reshape(-1))
            e["nll"].append(F.cross_entropy(logits, targets, reduction="none"))
            e["top1"].append(logits.argmax(-1))
            e["conf"].append(trace.confidence[:, :-1].reshape(-1))
            e["forced"].append(trace.forced[:, :-1].reshape(-1))
            for k in ks:  # partial loading: layers [0, k) only, the rest forced out at depth k
                tr = simulate_exits(net, heads, tokens, config, loaded_layers=k)
                f = forced[(t, k)]
                f["forced"].append(tr.depth[:, :-1].reshape(-1) == k)
                f["top1"].append(tr.logits[:, :-1].reshape(-1, tr.logits.shape[-1]).argmax(-1))
                f["conf"].append(tr.confidence[:, :-1].reshape(-1))
    cat = lambda d: {k: torch.cat(v) for k, v in d.items()}
    return {"layers": layers, "params": sum(p.numel() for p in net.parameters()), "shallow": ks,
            "full": cat(full), "exits": {t: cat(e) for t, e in exits.items()},
            "forced": {key: cat(f) for key, f in forced.items()}}


def pool(parts: list[dict]) -> dict:
    """Concatenate per-token results of several sources (same model)."""
    first = parts[0]
    return {"layers": first["layers"], "params": first["params"], "shallow": first["shallow"],
            "full": {k: torch.cat([p["full"][k] for p in parts]) for k in first["full"]},
            "exits": {t: {k: torch.cat([p["exits"][t][k] for p in parts]) for k in first["exits"][t]}
                      for t in first["exits"]},
            "forced": {key: {k: torch.cat([p["forced"][key][k] for p in parts]) for k in first["forced"][key]}
                       for key in first["forced"]}}


def low_confidence_agreement(r: dict, groups: list[tuple[str, list[int]]], cuts: tuple[float, ...],
                             depths: list[int] | None = None) -> list[dict]:
    """(2a) among tokens with confidence at depth k below a cut: share with top-1 == final top-1, for each
    group of depths (pooled). depths: the full pass's columns (default: every depth); the last is final."""
    top1, conf = r["full"]["top1"], r["full"]["conf"]
    depths = depths or list(range(1, r["layers"] + 1))
    final = top1[:, -1]
    rows = []
    for label, group in groups:
        idx = [depths.index(d) for d in group]
        agree = (top1[:, idx] == final[:, None]).reshape(-1)
        c = conf[:, idx].reshape(-1)
        row = {"depth": label, "depths": group, "agreement_all": _mean(agree)}
        for cut in cuts:
            low = c < cut
            row[f"share_below_{cut}"] = _mean(low)
            row[f"agreement_below_{cut}"] = _mean(agree[low])
        rows.append(row)
    return rows


def forced_exit_agreement(r: dict) -> list[dict]:
    """(2b) engine-simulated partial loading to k layers: forced tokens whose top-1 == the full model's."""
    final = r["full"]["top1"][:, -1]
    rows = []
    for (t, k), f in r["forced"].items():
        forced, agree = f["forced"], f["top1"] == final
        very_low = forced & (f["conf"] < 0.2)
        rows.append({"threshold": t, "loaded_layers": k, "forced_share": _mean(forced),
                     "forced_agreement": _mean(agree[forced]), "forced_conf_below_0.2_share": _mean(very_low),
                     "forced_conf_below_0.2_agreement": _mean(agree[very_low]),
                     "agreement_all_tokens": _mean(agree)})
    return rows


def table_of(r: dict, t: float) -> TokenTable:
    f, e = r["full"], r["exits"][t]
    return TokenTable(targets=f["targets"], nll=f["nll"], top1=f["top1"], confidence=f["conf"],
                      exit_depth=e["depth"], exit_nll=e["nll"], exit_top1=e["top1"], exit_confidence=e["conf"],
                      forced=e["forced"])


def complementary(depth: dict[str, torch.Tensor], layers: dict[str, int], t: float,
                  early_fraction: float | None = EARLY_FRACTION) -> dict:
    """(1) for each ordered pair: P(early on B | not early on A); union of early exits over the models.
    depth: each model's exit depths of the same tokens; early_fraction None: early = before the last layer."""
    names = list(depth)
    early = {n: exited_early(depth[n], layers[n], early_fraction) for n in names}
    pairs = []
    for a in names:
        for b in names:
            if a != b:
                ct = cross_tab(depth[a], layers[a], depth[b], layers[b], early_fraction)
                pairs.append({"a": a, "b": b, **ct.to_dict()})
    union = torch.stack(list(early.values())).any(0)
    shares = {n: _mean(early[n]) for n in names}
    best = max(shares, key=shares.get)
    late_best = ~early[best]
    return {"threshold": t, "early_fraction": early_fraction, "tokens": int(union.numel()),
            "early_share": shares, "best_single": best, "best_single_share": shares[best],
            "together_share": _mean(union),
            "late_on_best_early_elsewhere": _mean(union[late_best]),
            "pairs": pairs}


# --- printing -------------------------------------------------------------------------------------
def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_model(name: str, per_source: dict[str, dict], summaries: dict) -> None:
    layers = next(iter(per_source.values()))["layers"]
    print(f"\n### {name} ({layers} layers): per depth, teacher-forced; 'exited by' = share exited at or before the depth\n")
    head = "| depth |"
    sep = "|---:|"
    for s in per_source:
        head += f" {s} ppl | {s} acc | {s} agree | {s} by@0.5 | {s} by@0.8 |"
        sep += "---:|" * 5
    print(head)
    print(sep)
    for d in range(1, layers + 1):
        row = f"| {d} |"
        for s in per_source:
            ds = summaries[s]["depths"][d - 1]
            row += (f" {ds['perplexity']:.2f} | {pct(ds['accuracy'])} | {pct(ds['agreement'])} |"
                    f" {pct(summaries[s]['exit'][0.5]['exit_share_within'][d])} |"
                    f" {pct(summaries[s]['exit'][0.8]['exit_share_within'][d])} |")
        print(row)
    print("\n| source | threshold | mean exit layer | exited before last | exited by L/2 | exit ppl | exit acc | agreement with final |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in per_source:
        for t in THRESHOLDS:
            e = summaries[s]["exit"][t]
            print(f"| {s} | {t} | {e['mean_exit_layer']:.2f} | {pct(e['early_share'])} | {pct(e['early_half_share'])} |"
                  f" {e['perplexity']:.2f} | {pct(e['accuracy'])} | {pct(e['agreement'])} |")


def print_complementary(comp: dict) -> None:
    print("\n## (1) Complementary exits (early = exit depth <= half the model's layers)\n")
    for src, by_t in comp.items():
        for t, c in by_t.items():
            names = list(c["early_share"])
            print(f"\n**{src}, threshold {t}** ({c['tokens']} tokens): rows A, columns B, cell = share of tokens "
                  f"not early on A that are early on B\n")
            print("| A \\ B | " + " | ".join(names) + " |")
            print("|---|" + "---:|" * len(names))
            for a in names:
                cells = []
                for b in names:
                    p = next((p for p in c["pairs"] if p["a"] == a and p["b"] == b), None)
                    cells.append("-" if p is None else pct(p["b_early_given_a_late"]))
                print(f"| {a} (early {pct(c['early_share'][a])}) | " + " | ".join(cells) + " |")
            print(f"\nbest single model {c['best_single']}: {pct(c['best_single_share'])} early; "
                  f"together (early on at least one of the three): {pct(c['together_share'])}; "
                  f"of the tokens not early on {c['best_single']}, {pct(c['late_on_best_early_elsewhere'])} are early on another "
                  f"(paper: 74% -> 92%)")


def print_forced(obs2: dict, cuts: tuple[float, ...] = CUTS) -> None:
    print("\n## (2a) Low-confidence agreement with the final layer (full pass)\n")
    print("| model | source | depth | agree (all) |"
          + "".join(f" share {'conf' if i == 0 else ''}<{c} | agree if <{c} |" for i, c in enumerate(cuts)))
    print("|---|---|---|---:|" + "---:|---:|" * len(cuts))
    for name, by_src in obs2.items():
        for src, o in by_src.items():
            for r in o["low_confidence"]:
                print(f"| {name} | {src} | {r['depth']} | {pct(r['agreement_all'])} |"
                      + "".join(f" {pct(r[f'share_below_{c}'])} | {pct(r[f'agreement_below_{c}'])} |" for c in cuts))
    print("\n## (2b) Forced exits under partial loading (engine-simulated): forced top-1 == full model's final top-1 (paper: 85%)\n")
    print("| model | source | threshold | loaded layers | forced share | agree if forced | forced conf<0.2 share | agree if forced & <0.2 | agree, all tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, by_src in obs2.items():
        for src, o in by_src.items():
            for r in o["forced"]:
                print(f"| {name} | {src} | {r['threshold']} | {r['loaded_layers']} | {pct(r['forced_share'])} |"
                      f" {pct(r['forced_agreement'])} | {pct(r['forced_conf_below_0.2_share'])} |"
                      f" {pct(r['forced_conf_below_0.2_agreement'])} | {pct(r['agreement_all_tokens'])} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=8000, help="held-out tokens per source (default 8000), spread over all held-out files")
    ap.add_argument("--chunk-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--models-dir", default=str(ROOT / "models"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here (e.g. bench/exit_analysis.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    models_dir = Path(args.models_dir)
    tokenizer = load_tokenizer(models_dir / MODELS[0])  # the family's shared tokenizer
    for name in MODELS[1:]:
        other = (models_dir / name / "tokenizer.json").read_bytes()
        if other != (models_dir / MODELS[0] / "tokenizer.json").read_bytes():
            raise SystemExit(f"{name} has a different tokenizer: the models must share one to compare token by token")

    sources, results = {}, {name: {} for name in MODELS}
    for src, spec in SOURCES.items():
        ids, files = held_out_tokens(spec, tokenizer, args.limit)
        chunks = chunk_tokens(ids, args.chunk_len)
        sources[src] = {"source": spec, "tokens_read": len(ids), "predicted_tokens": sum(len(c) - 1 for c in chunks if len(c) > 1),
                        "tokens_per_file_cap": max(f["tokens"] for f in files), "files": files}
        for name in MODELS:
            t0 = time.perf_counter()
            net = load_model(models_dir / name, dtype="float32", device="cpu", max_len=max(len(c) for c in chunks))
            results[name][src] = measure(net, ExitHeads(net), chunks, args.batch_size)
            print(f"{name} on {src} ({spec}): {sources[src]['predicted_tokens']} tokens, "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    for name in MODELS:
        results[name]["all"] = pool([results[name][s] for s in SOURCES])

    out = {"command": "python bench/exit_analysis.py " + " ".join(sys.argv[1:]), "limit": args.limit,
           "chunk_len": args.chunk_len, "threads": args.threads, "dtype": "float32", "device": "cpu",
           "measure": "max_prob", "early_fraction": EARLY_FRACTION, "paper": PAPER, "sources": sources,
           "models": {}, "complementary": {}, "forced_exits": {}}
    summaries = {}
    for name in MODELS:
        layers = results[name]["all"]["layers"]
        summaries[name] = {}
        for src in list(SOURCES) + ["all"]:
            r = results[name][src]
            depths, exit_by_t = None, {}
            for t in THRESHOLDS:
                rep = summarize(table_of(r, t), ExitConfig(threshold=t), layers, name).to_dict()
                depths = depths or rep["depths"]
                ex = rep["exit"]
                ex["early_half_share"] = _mean(r["exits"][t]["depth"] <= EARLY_FRACTION * layers)
                exit_by_t[t] = ex
            for d in depths:  # below-threshold fields are threshold-specific: keep the 0.5 ones, named so
                d["below_0.5"] = d.pop("below_threshold")
                d["below_0.5_agreement"] = d.pop("below_threshold_agreement")
                d.pop("below_half"), d.pop("below_half_agreement")
            summaries[name][src] = {"depths": depths, "exit": exit_by_t}
        out["models"][name] = {"layers": layers, "params": results[name]["all"]["params"],
                               "shallow_depths": results[name]["all"]["shallow"], "by_source": summaries[name]}
    for src in list(SOURCES) + ["all"]:
        layers = {n: results[n][src]["layers"] for n in MODELS}
        out["complementary"][src] = {t: complementary({n: results[n][src]["exits"][t]["depth"] for n in MODELS}, layers, t)
                                     for t in THRESHOLDS}
    for name in MODELS:
        third = max(1, results[name]["all"]["layers"] // 3)
        groups = [(f"{k}", [k]) for k in results[name]["all"]["shallow"]]
        groups.append((f"1-{third} (<= L/3, pooled)", list(range(1, third + 1))))
        out["forced_exits"][name] = {src: {"low_confidence": low_confidence_agreement(results[name][src], groups, CUTS),
                                           "forced": forced_exit_agreement(results[name][src])}
                                     for src in list(SOURCES) + ["all"]}
    out["elapsed_s"] = time.perf_counter() - started

    print(f"# Exit analysis of the demo family ({out['command']})\n")
    for src, s in sources.items():
        print(f"- {src}: `{s['source']}` held-out files, {s['predicted_tokens']} predicted tokens from {len(s['files'])} files "
              f"(at most {s['tokens_per_file_cap']} tokens of each)")
    for name in MODELS:
        print_model(name, {s: results[name][s] for s in SOURCES}, summaries[name])
    print_complementary(out["complementary"])
    print_forced(out["forced_exits"])
    print(f"\n{out['elapsed_s']:.0f} s on {args.threads} thread(s)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
