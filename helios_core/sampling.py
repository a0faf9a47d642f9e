"""Per-request sampling parameters and a batched, seed-aware token sampler."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Temperatures below this are treated as greedy: dividing logits by ~0 overflows float32.
_GREEDY_EPS = 1e-5


def _check_int(name: str, value: object, minimum: int) -> None:
    # bool is a subclass of int; `max_tokens=True` is almost certainly a bug upstream.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 -> greedy
    top_k: int = 0  # 0 or -1 -> disabled
    top_p: float = 1.0  # (0, 1]
    seed: int | None = None
    stop: tuple[str, ...] = ()  # a list or a single str is normalized to a tuple
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    threshold: float | None = None  # early-exit confidence; None = model default; > 1 never exits
    early_exit: bool = True  # False = run every loaded layer for this request

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1)
        if _check_float("temperature", self.temperature) < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        _check_int("top_k", self.top_k, -1)
        if not 0 < _check_float("top_p", self.top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
            if self.seed >= 2**64:  # torch.Generator.manual_seed limit
                raise ValueError(f"seed must be < 2**64, got {self.seed!r}")
        if self.threshold is not None and _check_float("threshold", self.threshold) < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")
        for name in ("ignore_eos", "include_stop_str_in_output", "early_exit"):
            _check_bool(name, getattr(self, name))
        object.__setattr__(self, "stop", self._normalize_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", self._normalize_stop_token_ids(self.stop_token_ids))

    @staticmethod
    def _normalize_stop(stop: object) -> tuple[str, ...]:
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a str or a list of str, got {stop!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        return tuple(stop)

    @staticmethod
    def _normalize_stop_token_ids(ids: object) -> tuple[int, ...]:
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of int, got {ids!r}")
        for i in ids:
            _check_int("stop_token_ids entries", i, 0)
        return tuple(ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A per-request RNG on `device`, or None for unseeded requests (they share the global RNG)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then outside its top-p nucleus.

    top_k: (B,) int64 in [1, V] (V = disabled); top_p: (B,) float (> 1 = disabled, so
    rounding in the cumulative sum can never drop a token from a disabled row).
    """
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits.masked_fill_(ranks >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token once the mass strictly before it already reaches top_p; the top token
    # has zero mass before it, so it always survives.
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits.masked_fill_(mass_before >= top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def _exponential_noise(
    like: torch.Tensor, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Exp(1) noise; seeded rows draw only from their own generator, so their noise does not
    depend on which other rows share the batch."""
    noise = torch.empty_like(like)
    seeded = [(row, g) for row, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        noise.exponential_()
    for row, g in seeded:
        noise[row].exponential_(generator=g)
    # CPU exponential_ can return exactly 0, which would turn p/q into 0/0 = NaN for masked tokens.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


class Sampler:
    """Greedy / temperature / top-k / top-p sampling, vectorized over the batch."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """logits: (B, V) -> (B,) int64 token ids on logits.device."""
        if not len(params) == len(generators) == logits.shape[0]:
            raise ValueError(
                f"batch mismatch: logits {logits.shape[0]}, params {len(params)}, generators {len(generators)}"
            )
        greedy = [p.is_greedy for p in params]
        if all(greedy):
            return logits.argmax(dim=-1)

        device, vocab = logits.device, logits.shape[-1]
        temperature = torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)], device=device)
        scaled = logits.float() / temperature[:, None]  # out-of-place: never mutate the caller's logits

        # Only rows that actually filter pay for the sort.
        rows = [i for i, p in enumerate(params) if not greedy[i] and (p.top_k > 0 or p.top_p < 1)]
        if rows:
            top_k = [min(params[i].top_k, vocab) if params[i].top_k > 0 else vocab for i in rows]
            top_p = [params[i].top_p if params[i].top_p < 1 else 2.0 for i in rows]
            index = torch.tensor(rows, device=device)
            scaled[index] = _filter_top_k_top_p(
                scaled[index],
                torch.tensor(top_k, device=device),
                torch.tensor(top_p, device=device),
            )

        # Exponential race: argmax(p / q), q ~ Exp(1), is an exact sample from p.
        probs = scaled.softmax(dim=-1)
        sampled = probs.div_(_exponential_noise(probs, generators)).argmax(dim=-1)
        if not any(greedy):
            return sampled
        return torch.where(torch.tensor(greedy, device=device), logits.argmax(dim=-1), sampled)
