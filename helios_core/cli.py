"""`helios` command line: `helios generate` runs the early-exit engine in-process."""

from __future__ import annotations

import argparse
import json
import re
import sys

MEMORY_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
                "g": 2**30, "gb": 10**9, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'512MiB', '2GB', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in MEMORY_UNITS:
        raise argparse.ArgumentTypeError(f"invalid memory size {text!r} (examples: 512MiB, 2GiB, 1000000)")
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2).lower()])


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
    gen.add_argument("--measure", choices=("max_prob", "margin", "cosine"), default="max_prob")
    gen.add_argument("--exit-layers", type=_exit_layers, default=None, help="exit depths, e.g. 2,4,6 (default: all)")
    gen.add_argument("--exit-heads", default=None, help="trained exit heads (.safetensors adapter)")
    gen.add_argument("--layers", type=int, default=None, help="load only the first K layers (greedy exit at K)")
    gen.add_argument("--no-early-exit", action="store_true", help="run every loaded layer for every token")
    gen.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    gen.add_argument("--device", default="auto")
    gen.add_argument("--memory-budget", type=parse_bytes, default=None, help="bytes for weights + KV, e.g. 256MiB")
    gen.add_argument("--max-model-len", type=int, default=None)
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
    )
    engine = LLMEngine(EngineConfig(
        model=args.model, num_layers=args.layers, dtype=args.dtype, device=args.device,
        memory_budget=args.memory_budget, max_model_len=args.max_model_len, exit=exit_config,
        early_exit=not args.no_early_exit,
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
                      f"layers loaded, batch capacity {engine.capacity}]", file=sys.stderr)
        return 0
    [done] = engine.generate([args.prompt], params)
    print(json.dumps({
        "model": engine.name,
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
        "batch_capacity": engine.capacity,
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return generate(args)
        if args.command == "train":
            return train(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # Every bad-input path raises one of these with a message that names the problem.
        parser.exit(2, f"helios: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
