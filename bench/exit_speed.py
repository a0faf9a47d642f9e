"""What a model's exits buy in the engine: the same prompts with exits on and off, one process.

    python bench/exit_speed.py --model ~/.cache/helios/models/smollm2-135m-instruct \
        --heads models/exits/smollm2-135m-instruct.safetensors --measure probe --threshold 0.95 \
        --exit-layers 16,20,24,26,28

Greedy, `--prompts` prompts of `bench/data/mixed.jsonl` in one batch, `--max-tokens` each; the two
engines alternate `--repeats` times and the best run of each is reported (tok/s includes prefill).
`--profile` then runs each engine once more under torch.profiler and prints where its decode steps
spend their time (bench/decode_speed.py's categories), prefill excluded.
"""

from __future__ import annotations

import argparse
import time

import torch

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.evaluate import load_prompts
from helios_core.exits import ExitConfig
from helios_core.sampling import SamplingParams

from decode_speed import category_table  # bench/ is the script's directory, so on sys.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--heads", default=None)
    parser.add_argument("--measure", default="probe")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--exit-layers", default=None, help="e.g. 16,20,24 (default: every layer)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help="both engines' dtype (auto, float32, bfloat16)")
    parser.add_argument("--profile", action="store_true", help="also profile each engine's decode steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [p.text for p in load_prompts("bench/data/mixed.jsonl")][: args.prompts]
    layers = tuple(int(d) for d in args.exit_layers.split(",")) if args.exit_layers else None
    exits = ExitConfig(threshold=args.threshold, measure=args.measure, exit_layers=layers, heads_path=args.heads)
    common = dict(model=args.model, max_model_len=1024, memory_budget=2 << 30, dtype=args.dtype)
    engines = {"full depth": LLMEngine(EngineConfig(**common, early_exit=False)),
               f"exits ({args.measure} {args.threshold})": LLMEngine(EngineConfig(**common, exit=exits))}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    for engine in engines.values():
        engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm up
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            started = time.perf_counter()
            depths = [d for out in engine.generate(prompts, params) for d in out.exit_layers]
            seconds = time.perf_counter() - started
            deepest = engine.model_config.num_layers
            runs[name].append((len(depths) / seconds, sum(depths) / len(depths),
                               sum(d < deepest for d in depths) / len(depths)))
    print(f"{args.model}: {len(prompts)} prompts x {args.max_tokens} tokens, batch {len(prompts)}, "
          f"{args.threads} threads, {next(iter(engines.values())).model.dtype}")
    for name, results in runs.items():
        tok_s, layers_per_token, early = max(results)
        print(f"{name}: best of {args.repeats} {tok_s:.1f} tok/s (all: {', '.join(f'{r[0]:.1f}' for r in results)}), "
              f"{layers_per_token:.2f} layers per token, {early:.1%} left early")
    if args.profile:
        for name, engine in engines.items():
            print(f"\n### {name}: decode steps at batch {len(prompts)}\n\n{profile_decode(engine, prompts, params)}")


def profile_decode(engine: LLMEngine, prompts: list[str], params: SamplingParams) -> str:
    """Category table of the engine's steps once every prompt is prefilled (all steps are decode steps)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for prompt in prompts:
        engine.add_request(prompt, params)
    while engine.scheduler.waiting or any(not seq.output_ids for seq in engine.scheduler.running):
        engine.step()
    steps = 0
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        while engine.has_unfinished():
            with record_function("engine.step"):
                engine.step()
            steps += 1
    return category_table(prof.key_averages(group_by_input_shape=True), steps)


if __name__ == "__main__":
    main()
