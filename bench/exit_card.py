"""The tables of an exit-heads model card: held-out quality of shipped exits at several thresholds.

Teacher-forced on the held-out files of each source (`helios_core.quality`: the engine's exit decision,
exited tokens' K/V propagated as the engine writes them), once per threshold, against the same model
at full depth. Prints markdown; `--json` writes every report.

    python bench/exit_card.py --model ~/.cache/helios/models/smollm2-135m-instruct \
        --heads models/exits/smollm2-135m-instruct.safetensors --measure probe \
        --thresholds 0.5 0.7 0.8 0.9 0.95 --sources stdlib pydoc --limit 4096
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from helios_core.engine import load_tokenizer
from helios_core.exits import ExitConfig, load_exit_heads
from helios_core.models import load_model
from helios_core.quality import QualityReport, analyze, chunk_tokens, load_text_tokens


def reports(model_dir: str, heads_path: str, measure: str, exit_layers: tuple[int, ...] | None,
            thresholds: list[float], sources: list[str], limit: int, chunk_len: int) -> dict[str, list[QualityReport]]:
    """source -> one report per threshold (the model and heads are loaded once)."""
    model = load_model(model_dir, max_len=chunk_len)
    heads = load_exit_heads(heads_path, model)
    tokenizer = load_tokenizer(model_dir)
    out = {}
    for source in sources:
        chunks = chunk_tokens(load_text_tokens(source, tokenizer, limit)[0], chunk_len)
        out[source] = []
        for t in thresholds:
            config = ExitConfig(threshold=t, measure=measure, exit_layers=exit_layers, heads_path=heads_path)
            report = analyze(model, heads, chunks, config, name=Path(model_dir).name)
            report.source = source
            out[source].append(report)
    return out


def threshold_table(by_source: dict[str, list[QualityReport]]) -> str:
    lines = ["| source | threshold | exited early | mean exit layer | accuracy (full depth) | "
             "perplexity (full depth) | agreement with the final layer |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for source, reps in by_source.items():
        for r in reps:
            e, full = r.exit, r.depths[-1]
            lines.append(f"| {source} | {e.threshold} | {e.early_share:.1%} | {e.mean_exit_layer:.2f} / {r.num_layers} "
                         f"| {e.accuracy:.1%} ({full.accuracy:.1%}) | {e.perplexity:.2f} ({full.perplexity:.2f}) "
                         f"| {e.agreement:.1%} |")
    return "\n".join(lines)


def exit_point_table(report: QualityReport, exit_layers: tuple[int, ...]) -> str:
    """Per exit point at one threshold: what leaves there, and its head's quality on every token."""
    e = report.exit
    lines = [f"{report.source}, threshold {e.threshold} ({e.measure}), {report.tokens} tokens:", "",
             "| depth | tokens exiting here | head agreement with the final layer | head accuracy | head perplexity |",
             "|---:|---:|---:|---:|---:|"]
    for d in (*exit_layers, report.num_layers):
        s = report.depths[d - 1]
        lines.append(f"| {d} | {e.histogram.get(d, 0) / report.tokens:.1%} | {s.agreement:.1%} | {s.accuracy:.1%} "
                     f"| {s.perplexity:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--heads", required=True, help="exit heads (and probes) file")
    parser.add_argument("--measure", default="probe")
    parser.add_argument("--exit-layers", default=None, help="e.g. 16,20,24 (default: the heads' depths)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--sources", nargs="+", default=["stdlib", "pydoc"])
    parser.add_argument("--limit", type=int, default=4096, help="held-out tokens per source")
    parser.add_argument("--chunk-len", type=int, default=256)
    parser.add_argument("--detail-threshold", type=float, default=None, help="per-exit-point table at this one")
    parser.add_argument("--json", default=None, help="write the reports here")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.exit_layers:
        exit_layers = tuple(int(d) for d in args.exit_layers.split(","))
    else:
        heads = load_exit_heads(args.heads, load_model(args.model, 1))
        exit_layers = heads.probe_depths() or tuple(sorted(int(d) for d in heads.trained))
    started = time.perf_counter()
    by_source = reports(args.model, args.heads, args.measure, exit_layers, args.thresholds, args.sources,
                        args.limit, args.chunk_len)
    print(threshold_table(by_source))
    detail = args.detail_threshold if args.detail_threshold is not None else args.thresholds[0]
    for reps in by_source.values():
        print()
        print(exit_point_table(next(r for r in reps if r.exit.threshold == detail), exit_layers))
    print(f"\n({time.perf_counter() - started:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    if args.json:
        Path(args.json).write_text(json.dumps({s: [r.to_dict() for r in reps] for s, reps in by_source.items()},
                                              indent=1))


if __name__ == "__main__":
    main()
