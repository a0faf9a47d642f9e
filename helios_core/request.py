"""Requests as the engine tracks them, and what it hands back after each step.

A sequence's tokens are prompt + output. `num_cached` counts the leading tokens whose K/V is in the
pool, in the blocks of its `block_table`; the last token is always fed by the next decode step, so a
sequence needs prefill while `num_cached < len(token_ids) - 1`. Setting `num_cached = 0` (preemption)
simply makes it prefill again.

When layers are loaded under a decoding sequence, its context has no K/V in the new layers yet. It
keeps decoding, exiting no deeper than `depth_cap` (the layers its context has), while its context
is *refilled*: positions [0, filled) have K/V in every loaded layer, recomputed chunk by chunk beside
the decodes; once `filled` reaches `num_cached` the cap is lifted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .detokenizer import TextStream
from .sampling import SamplingParams
from .telemetry import RequestSummary, TokenRecord


class RequestStatus(enum.IntEnum):
    WAITING = 0  # queued, holds no KV blocks
    RUNNING = 1  # holds KV blocks; prefilling or decoding
    FINISHED = 2


@dataclass(eq=False)  # identity semantics: queues look sequences up by object
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt + output
    num_prompt_tokens: int
    params: SamplingParams
    threshold: float  # resolved: the request's threshold or the model default
    arrival_time: float
    generator: torch.Generator | None = None
    text: TextStream | None = None
    status: RequestStatus = RequestStatus.WAITING
    block_table: list[int] = field(default_factory=list)  # physical KV block of positions [i·bs, (i+1)·bs)
    depth_cap: int | None = None  # while refilling: the deepest layer its whole context has K/V in
    filled: int = 0  # while refilling: leading positions with K/V in every loaded layer
    prefix_hashes: list[bytes] = field(default_factory=list)  # of the full blocks of prompt positions prefill fills
    num_cached: int = 0
    records: list[TokenRecord] = field(default_factory=list)
    first_token_time: float | None = None
    finish_reason: str | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def needs_prefill(self) -> bool:
        return self.num_cached < len(self.token_ids) - 1


@dataclass
class RequestOutput:
    """What one step produced for one request (streaming deltas)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_records: list[TokenRecord]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    summary: RequestSummary | None = None  # set when finished


@dataclass
class Completion:
    """A finished request, as `LLMEngine.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    records: list[TokenRecord]
    finish_reason: str
    summary: RequestSummary

    @property
    def exit_layers(self) -> list[int]:
        return [r.exit_layer for r in self.records]

    @property
    def forced(self) -> list[bool]:
        return [r.forced for r in self.records]
