"""Weight dtypes by name, and "auto": the fastest dtype this device runs natively.

Only the weights, activations and KV cache take the dtype; logits, softmax, exit confidences and
sampling run in fp32 whatever it is. "auto" is resolved where the weights live (the engine, a
replica for its own device), never on another host's behalf:

  cuda  bfloat16 where the GPU computes it natively (Ampere and later), else float32;
  cpu   bfloat16 only where the CPU has bf16 matmul units (AMX or AVX512-BF16 in /proc/cpuinfo) and
        a decode-shaped matmul, as the engine runs it, measures faster in bf16 than in fp32 (once per
        process); else float32.

float32 rather than float16 is the fallback: our reference numerics (the transformers oracle) are fp32.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger("helios")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what a benchmark reports
BF16_UNITS = {"avx512_bf16", "amx_bf16"}  # a CPU with neither emulates bf16 matmuls, slower than fp32
PROBE_SHAPE = (64, 576, 1536)  # (rows, hidden, intermediate): a decode batch through SmolLM2-135M's MLP


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name (or "auto", resolved for `device`) as a torch dtype; an unknown name is refused."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return resolve_auto_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def default_device() -> torch.device:
    """The device "auto" means: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_auto_dtype(device: str | torch.device) -> torch.dtype:
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_auto_dtype(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return torch.bfloat16 if BF16_UNITS & cpu_flags() and _cpu_bf16_is_faster() else torch.float32
    return torch.float32


@functools.cache
def _cuda_auto_dtype(index: int) -> torch.dtype:
    with torch.cuda.device(index):
        # including_emulation=False: a pre-Ampere GPU "supports" bf16 only by emulating it, slowly.
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native else torch.float32


@functools.cache
def _cpu_bf16_is_faster() -> bool:
    # The flags say the units exist; whether this torch build uses them (oneDNN) only a run can say.
    times = cpu_matmul_seconds()
    faster = times["bfloat16"] < times["float32"]
    logger.info("dtype auto on cpu: %s (%dx%d @ %dx%d matmul: bfloat16 %.0f us, float32 %.0f us)",
                "bfloat16" if faster else "float32", *PROBE_SHAPE[:2], *PROBE_SHAPE[1:],
                times["bfloat16"] * 1e6, times["float32"] * 1e6)
    return faster


@functools.cache
def cpu_matmul_seconds() -> dict[str, float]:
    """The best time of one decode-shaped matmul (PROBE_SHAPE) on the CPU, per dtype; measured once
    per process (a few ms each), with the torch threads in effect at the first call."""
    rows, hidden, inter = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)  # a private generator: the global RNG stream is left as it was
    x, w = torch.randn(rows, hidden, generator=gen), torch.randn(inter, hidden, generator=gen)
    return {name: matmul_seconds(x.to(dtype), w.to(dtype)) for name, dtype in
            (("float32", torch.float32), ("bfloat16", torch.bfloat16))}


def matmul_seconds(x: torch.Tensor, w: torch.Tensor, repeats: int = 5) -> float:
    """Best time of x @ w.T as the engine's linear layers compute it (w packed for oneDNN where the
    engine packs it, `Linear.pack`) over `repeats`, after a warm-up call."""
    from .models.transformer import linear, packed, packs_weights  # the models import this module

    if packs_weights(w.dtype, w.device):
        w = packed(w)
    linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        linear(x, w)
        best = min(best, time.perf_counter() - start)
    return best


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo-style text ("" and {} if absent)."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    path = Path("/proc/cpuinfo")  # Linux only; elsewhere no flags, so auto picks float32 on the CPU
    return parse_cpuinfo(path.read_text()) if path.is_file() else ("", frozenset())


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


def cpu_info() -> dict:
    """The CPU model and which of CPU_FLAGS it has, for benchmarks to print with their figures."""
    model, flags = _cpuinfo()
    return {"model": model or "unknown", "flags": {f: f in flags for f in CPU_FLAGS}}


__all__ = ["CPU_FLAGS", "DTYPES", "cpu_flags", "cpu_info", "cpu_matmul_seconds", "default_device", "dtype_name",
           "matmul_seconds", "parse_cpuinfo", "resolve_auto_dtype", "resolve_dtype"]
