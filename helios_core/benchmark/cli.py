"""`helios bench`: arguments, and what a run writes (results.json, results.md, PNG plots)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..policy import Registry
from .runner import SYSTEMS, BenchConfig, check_exit_points, nan_to_none, run_benchmark
from .sweep import matched, matched_ratios, run_sweep
from .traces import SLO

QUICK = {"limit": 32, "max_tokens": 32, "loads": ("closed:32", "poisson:4"), "warmup": 16, "quality_tokens": 1024,
         "systems": tuple(s for s in SYSTEMS if s != "helios_serve")}


def add_parser(sub) -> None:
    from ..memory_size import parse_bytes

    b = sub.add_parser("bench", help="benchmark Helios against its baselines (same load, same memory budget)")
    b.add_argument("--out", default="bench-results", help="output directory (results.json, results.md, plots)")
    b.add_argument("--quick", action="store_true",
                   help="a <3 minute run: 32 requests x 32 tokens, loads closed:32 and poisson:4, no helios_serve")
    b.add_argument("--registry", default="models/registry.yaml")
    b.add_argument("--baseline", default=BenchConfig.baseline, help="the model the baselines serve (sets the budget)")
    b.add_argument("--workload", default="mixed", help="prompt set (code, prose, summarize, mixed, shift) or a .jsonl")
    b.add_argument("--limit", type=int, default=None, help="requests per load (default 96)")
    b.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 64)")
    b.add_argument("--b0", type=int, default=BenchConfig.b0, help="sequences the baseline's budget holds (default 4)")
    b.add_argument("--budget", type=parse_bytes, default=None, help="memory budget; default: baseline + KV for B0")
    b.add_argument("--threshold", type=float, default=None, help="every model's exit threshold (default: registry)")
    b.add_argument("--exit-every", type=int, default=None,
                   help="exit points every K layers on every model (default: the registry's, usually every layer)")
    b.add_argument("--systems", nargs="+", choices=SYSTEMS, default=None)
    b.add_argument("--loads", nargs="+", default=None,
                   help="closed:CONCURRENCY and/or poisson:RATE; the first is the headline (default closed:64 "
                        "poisson:2 poisson:4 poisson:8)")
    b.add_argument("--warmup", type=int, default=None, help="untimed requests per system first (default 24)")
    b.add_argument("--policy", type=json.loads, default={}, help='PolicyConfig fields as JSON, e.g. \'{"coverage": 0.8}\'')
    b.add_argument("--quality-tokens", type=int, default=None, help="held-out text tokens per source (default 4096)")
    b.add_argument("--slo-ttft", type=float, default=SLO.ttft_s, help="goodput SLO: time to first token, s")
    b.add_argument("--slo-tpot", type=float, default=SLO.tpot_s, help="goodput SLO: time per output token, s")
    b.add_argument("--sweep", action="store_true",
                   help="also sweep thresholds x policy coverage x fixed depths at the headline load (the frontier)")
    b.add_argument("--sweep-thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    b.add_argument("--sweep-coverages", type=float, nargs="+", default=[0.6, 0.9],
                   help="the policy's coverage: share of tokens its depth rule must let exit (1 - breach limit)")
    b.add_argument("--sweep-depths", type=int, nargs="+", default=[8, 12],
                   help="fixed loaded depths of the baseline model (partial loading without the policy)")
    b.add_argument("--sweep-exit-every", type=int, nargs="+", default=[1, 4],
                   help="exit points every K layers (a check costs about a layer on the demo models)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--stream-max-hold", type=float, default=BenchConfig.stream_max_hold_s,
                   help="helios_serve: the longest a busy replica holds a stream's tokens, s")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    b.add_argument("--system-prompt-tokens", type=int, default=0,
                   help="put the same system prompt of this many tokens before every prompt (a shared prefix)")
    b.add_argument("--no-prefix-caching", action="store_true",
                   help="in-process systems recompute every prompt (for the prefix reuse A/B)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    fields = dict(QUICK) if args.quick else {}
    for name in ("limit", "max_tokens", "warmup", "quality_tokens"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.systems:
        fields["systems"] = tuple(args.systems)
    if args.loads:
        fields["loads"] = tuple(args.loads)
    return BenchConfig(registry=args.registry, baseline=args.baseline, workload=args.workload, b0=args.b0,
                       budget=args.budget, threshold=args.threshold, exit_every=args.exit_every, policy=args.policy,
                       slo=SLO(args.slo_ttft, args.slo_tpot), device=args.device,
                       stream_max_hold_s=args.stream_max_hold, system_prompt_tokens=args.system_prompt_tokens,
                       prefix_caching=not args.no_prefix_caching, **fields)


def main(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load would bury the benchmark's own
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    def log(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    every = [None if k == 1 else k for k in args.sweep_exit_every]
    if args.sweep:  # the sweep runs last: its settings are checked first
        check_exit_points(Registry.load(config.registry, config.dtype), every)
    report = run_benchmark(config, log=log)
    if args.sweep:
        points = run_sweep(config, args.sweep_thresholds, args.sweep_coverages, args.sweep_depths, every, log)
        best = matched(points)
        report |= {"sweep": points, "matched_quality": {"points": best, "ratios": matched_ratios(best)}}
    report = nan_to_none(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    table = markdown(report)
    (out / "results.md").write_text(table + "\n")
    print(table)
    try:
        from .plots import plot_all
    except ImportError:  # matplotlib is optional (pip install -e '.[bench]')
        print("[bench] matplotlib not installed: no plots", file=sys.stderr)
    else:
        for path in plot_all(report, out):
            print(f"[bench] wrote {path}", file=sys.stderr)
    print(f"[bench] wrote {out / 'results.json'} and {out / 'results.md'}", file=sys.stderr)
    return 0


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"Workload `{s['workload']}`: {s['limit']} requests x {s['max_tokens']} tokens; headline load "
        f"`{s['loads'][0]}`; budget {s['budget_bytes'] / 2**20:.1f} MiB = `{s['baseline']}` + KV for "
        f"B0 = {s['b0']}; thresholds {s['thresholds']}",
        "",
        "| system | output tok/s | req/s | max batch | weights MiB | KV MiB | TTFT p50 s | TPOT p50 ms "
        "| e2e p90 s | accuracy | perplexity | agreement | ROUGE-L | mean exit layer | served by |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in report["systems"].items():
        lines.append(
            f"| {name} | {_fmt(r['output_tokens_per_s'], '.1f')} | {_fmt(r['requests_per_s'], '.2f')} "
            f"| {r['max_concurrent_batch']} | {r['weight_bytes'] / 2**20:.1f} | {r['kv_bytes'] / 2**20:.1f} "
            f"| {_fmt(r['ttft_p50_s'], '.2f')} | {_fmt(r['tpot_p50_s'] and r['tpot_p50_s'] * 1e3, '.1f')} "
            f"| {_fmt(r['e2e_p90_s'], '.2f')} | {_fmt(r['accuracy'], '.3f')} | {_fmt(r['perplexity'], '.2f')} "
            f"| {_fmt(r['agreement_with_full_depth'], '.3f')} | {_fmt(r.get('rouge_l_vs_full_depth'), '.3f')} "
            f"| {_fmt(r['mean_exit_layer'], '.2f')} | {', '.join(f'{k}: {v}' for k, v in r['served_by'].items())} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v, '.3f')} |" for k, v in report["ratios"].items()]
    lines += ["", "Per load (output tok/s; TTFT p50 / p99 s):", "",
              "| system | " + " | ".join(s["loads"]) + " |", "|---|" + "---:|" * len(s["loads"])]
    for name, r in report["systems"].items():
        cells = [f"{_fmt(x['output_tokens_per_s'], '.1f')}; {_fmt(x['ttft_p50_s'], '.2f')} / "
                 f"{_fmt(x['ttft_p99_s'], '.2f')}" for x in r["loads"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "sweep" in report:
        lines += ["", "Frontier (headline load; accuracy / perplexity teacher-forced on held-out text):", "",
                  "| system | threshold | exits every | coverage / depth | output tok/s | max batch | accuracy "
                  "| perplexity | agreement | mean exit layer | served by |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for p in report["sweep"]:
            knob = p.get("coverage", p.get("depth", "-"))
            lines.append(
                f"| {p['system']} | {_fmt(p['threshold'], '')} | {p.get('exit_every', '-')} | {knob} "
                f"| {p['output_tokens_per_s']:.1f} "
                f"| {p['max_concurrent_batch']} | {_fmt(p['accuracy'], '.3f')} | {_fmt(p['perplexity'], '.2f')} "
                f"| {_fmt(p['agreement_with_full_depth'], '.3f')} | {_fmt(p['mean_exit_layer'], '.2f')} "
                f"| {', '.join(f'{k}: {v}' for k, v in p['served_by'].items())} |")
        m = report["matched_quality"]
        lines += ["", "At full-depth quality (accuracy within 1 point, perplexity within 5%), fastest point each:", ""]
        for name, p in m["points"].items():
            knob = p.get("coverage", p.get("depth", "-"))
            lines.append(f"- {name}: threshold {p['threshold']}, exits every {p.get('exit_every', '-')}, {knob}: "
                         f"{p['output_tokens_per_s']:.1f} tok/s, "
                         f"batch {p['max_concurrent_batch']}, accuracy {p['accuracy']:.3f}, ppl {p['perplexity']:.2f}")
        lines += [f"- {k}: {_fmt(v, '.2f')}" for k, v in m["ratios"].items()]
    return "\n".join(lines)
