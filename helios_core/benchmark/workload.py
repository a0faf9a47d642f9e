"""Benchmark requests: prompts from the prompt sets of bench/data, and when each arrives."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..evaluate import load_prompts

DATA = Path(__file__).resolve().parents[2] / "bench" / "data"
SETS = ("code", "prose", "summarize", "mixed", "shift")


@dataclass(frozen=True)
class BenchRequest:
    id: str
    prompt: str
    task: str | None
    max_tokens: int


def load_workload(name_or_path: str, limit: int | None = None, max_tokens: int | None = None) -> list[BenchRequest]:
    """A prompt set by name (bench/data/NAME.jsonl) or any prompt file, in file order (the shift set's
    order is the shift); `max_tokens` overrides every prompt's own (default 64)."""
    path = DATA / f"{name_or_path}.jsonl" if name_or_path in SETS else Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"no workload {name_or_path!r}: a set name ({', '.join(SETS)}) or a prompt file")
    prompts = load_prompts(path)[:limit]
    return [BenchRequest(f"{path.stem}-{i}", p.text, p.task, max_tokens or p.max_tokens or 64)
            for i, p in enumerate(prompts)]


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> list[float]:
    """Arrival times (seconds from the start) of n requests at `rate` per second on average."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    rng, t, times = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    return times
