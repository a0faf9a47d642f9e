"""Decode attention over a paged KV cache: the options, one layer, side by side in one process.

    python bench/paged_attention.py --model ~/.cache/helios/models/smollm2-135m-instruct \
        [--batch 12 32 64] [--context 300] [--block-sizes 16 32 64 128] [--dtype float32] [--threads 2]

Per batch (every row `--context` positions long, its blocks scattered over the pool as a running
server leaves them), the time of one layer's decode attention (q of one token per row):
  contiguous    the keys of every row in one (B, KV, S, D) tensor, F.scaled_dot_product_attention
                (the slot cache before paging: a fixed max_model_len slot per sequence)
  gather+sdpa   each row's blocks gathered into that contiguous shape first, then the same SDPA
  block-major   Helios' DecodeKV.attend: every block read in place by one batched matmul
Each figure is the best of three interleaved medians. In isolation the contiguous keys of a small
batch stay in the CPU caches between repeats; in a model they are evicted by the layer's weights, so
bench/decode_ab.py's whole decode step is the figure that decides.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from helios_core.kv_cache import DecodeKV, KVCache, blocks_for  # noqa: E402
from helios_core.models.config import ModelConfig  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def case(config: ModelConfig, batch: int, context: int, block_size: int, dtype: torch.dtype,
         repeat: int) -> dict[str, float]:
    c = config
    n_blocks = batch * blocks_for(context, block_size)
    cache = KVCache(c, 1, n_blocks, block_size, dtype, "cpu")
    for pool in cache.k + cache.v:
        pool.normal_()
    order = list(range(n_blocks))
    random.Random(0).shuffle(order)
    per_row = blocks_for(context, block_size)
    tables = [order[i * per_row : (i + 1) * per_row] for i in range(batch)]
    positions = [context - 1] * batch
    q = torch.randn(batch, 1, c.num_heads, c.head_dim, dtype=dtype)
    k = torch.randn(batch, 1, c.num_kv_heads, c.head_dim, dtype=dtype)
    v = torch.randn_like(k)
    kv = DecodeKV(cache, positions, tables)
    slot_k = torch.randn(batch, c.num_kv_heads, context, c.head_dim, dtype=dtype)
    slot_v = torch.randn_like(slot_k)
    mask = torch.ones(batch, 1, 1, context, dtype=torch.bool)
    table = torch.tensor(tables)
    gather_mask = torch.arange(per_row * block_size)[None, None, None, :] < context
    qt = q.transpose(1, 2)

    def contiguous():
        F.scaled_dot_product_attention(qt, slot_k, slot_v, attn_mask=mask, enable_gqa=True)

    def gather_sdpa():
        keys = cache.k[0][table].transpose(1, 2).flatten(2, 3)
        values = cache.v[0][table].transpose(1, 2).flatten(2, 3)
        F.scaled_dot_product_attention(qt, keys, values, attn_mask=gather_mask, enable_gqa=True)

    def block_major():
        kv.attend(0, q, k, v, None)

    fns = {"contiguous": contiguous, "gather+sdpa": gather_sdpa, "block-major": block_major}
    out = {name: [] for name in fns}
    for _ in range(3):  # interleaved: each option sees the same machine
        for name, fn in fns.items():
            out[name].append(timed(fn, repeat))
    return {name: min(times) * 1e3 for name, times in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a checkpoint directory (its config.json is enough)")
    ap.add_argument("--batch", type=int, nargs="+", default=[12, 32, 64])
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = ModelConfig.from_pretrained(Path(args.model).expanduser())
    dtype = getattr(torch, args.dtype)
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}, {args.dtype}; "
          f"{Path(args.model).name}: {config.num_heads} heads / {config.num_kv_heads} KV, head_dim {config.head_dim}; "
          f"context {args.context}; ms per layer per decode step")
    print("| batch | block size | contiguous (slot cache) | gather + SDPA | block-major (Helios) | block-major / contiguous |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in args.batch:
        for bs in args.block_sizes:
            r = case(config, batch, args.context, bs, dtype, args.repeat)
            print(f"| {batch} | {bs} | {r['contiguous']:.3f} | {r['gather+sdpa']:.3f} | {r['block-major']:.3f} | "
                  f"{r['block-major'] / r['contiguous']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
