"""Benchmark requests: prompts from the prompt sets of bench/data, and when each arrives."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


SYSTEM_PROMPT = (
    "You are a careful assistant for a team of Python developers. Answer with working code when code is "
    "asked for, keep explanations short and exact, follow the style of the standard library, name the "
    "modules and functions you use, and say so when something is not known. "
)


def with_system_prompt(requests: list[BenchRequest], tokenizer: Any, tokens: int) -> list[BenchRequest]:
    """Every request's prompt behind the same system prompt of `tokens` tokens (SYSTEM_PROMPT, repeated
    and cut to length): the shared prefix that consecutive chat requests have."""
    text = SYSTEM_PROMPT * (1 + tokens // 20)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < tokens:
        raise ValueError(f"the system prompt is {len(ids)} tokens, fewer than {tokens}")
    system = tokenizer.decode(ids[:tokens])
    return [dataclasses.replace(r, prompt=f"{system}\n\n{r.prompt}") for r in requests]


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> list[float]:
    """Arrival times (seconds from the start) of n requests at `rate` per second on average."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    rng, t, times = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    return times
