"""Continuous batching over a paged KV cache: who runs, what gets prefilled, who decodes this step.

Requests join between steps, admitted first come first served while a batch row is free and the KV
pool has blocks for their tokens above a small watermark (headroom that lets running sequences grow
without preempting at once). A prompt whose leading blocks are cached (`blocks`: prefix reuse) takes
them and prefills only the rest. Running sequences take a new block whenever they cross a block
boundary; when none is free, the newest running sequence is preempted: its blocks are freed and it
goes back to the front of the queue to be recomputed later, its output so far kept (vLLM's
recompute preemption). Long prompts are prefilled in chunks under a per-step token budget, so a long
prompt never stalls the decode of running requests for more than one chunk.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .blocks import BlockAllocator, block_hashes
from .kv_cache import blocks_for
from .request import RequestStatus, Sequence

WATERMARK = 0.01  # of the pool's blocks kept free at admission


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # first position to fill
    end: int  # one past the last
    refill: bool = False  # recomputes cached positions for layers loaded since (the sequence decodes on)


@dataclass
class StepPlan:
    prefills: list[PrefillChunk]  # packed into one forward, before the decode
    decodes: list[Sequence]  # then one decode step over these, in admission order


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_seqs: int, max_prefill_tokens: int,
                 prefix_caching: bool = True):
        self.blocks = BlockAllocator(num_blocks, prefix_caching)
        self.block_size = block_size
        self.max_seqs = max_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.num_preempted = 0

    def add(self, seq: Sequence) -> None:
        if self.blocks.prefix_caching:
            # Full blocks of positions prefill fills from the prompt: the last prompt token is fed by
            # the decode step, whose K/V may come from an early exit, so its block is never shared.
            full = (seq.num_prompt_tokens - 1) // self.block_size
            seq.prefix_hashes = block_hashes(seq.token_ids, self.block_size, full)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def watermark(self) -> int:
        return int(WATERMARK * self.blocks.num_blocks)

    def schedule(self) -> StepPlan:
        self._grow_running()
        self._admit()
        budget, prefills, decodes = self.max_prefill_tokens, [], []
        for seq in self.running:
            if seq.depth_cap is not None and budget > 0:  # refill beside the decode, not instead of it
                end = min(seq.num_cached, seq.filled + budget)
                prefills.append(PrefillChunk(seq, seq.filled, end, refill=True))
                budget -= end - seq.filled
            target = len(seq.token_ids) - 1  # the last token is fed by the decode step
            if seq.num_cached < target:
                if budget == 0:
                    continue
                end = min(target, seq.num_cached + budget)
                prefills.append(PrefillChunk(seq, seq.num_cached, end))
                budget -= end - seq.num_cached
                if end < target:
                    continue
            decodes.append(seq)
        return StepPlan(prefills, decodes)

    def _needed(self, seq: Sequence) -> int:
        """Blocks for every position this step may write: up to the last token, fed by the decode."""
        return blocks_for(len(seq.token_ids), self.block_size)

    def _grow_running(self) -> None:
        """Give every running sequence the blocks of its next step, oldest first; preempt the newest
        while the pool has none left."""
        for seq in list(self.running):
            while seq.status == RequestStatus.RUNNING and len(seq.block_table) < self._needed(seq):
                if self.blocks.num_free == 0:
                    self._preempt(self.running[-1])
                else:
                    seq.block_table.append(self.blocks.allocate())

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            hit = self.blocks.match(seq.prefix_hashes)
            new = self._needed(seq) - len(hit)
            headroom = self.watermark if self.running else 0  # an idle engine admits into a full pool
            if new > self.blocks.num_free - self.blocks.num_reclaimable(hit) - headroom:
                break
            self.waiting.popleft()
            self.blocks.take(hit, len(seq.prefix_hashes), self.block_size)
            seq.block_table = hit + [self.blocks.allocate() for _ in range(new)]
            seq.num_cached = len(hit) * self.block_size
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)

    def prefilled(self, chunk: PrefillChunk) -> None:
        """`chunk` is in the cache: register the prompt blocks it completes; a refill that has caught
        up lifts the sequence's depth cap."""
        seq = chunk.seq
        done = min(chunk.end // self.block_size, len(seq.prefix_hashes))
        for i in range(chunk.start // self.block_size, done):
            self.blocks.register(seq.block_table[i], seq.prefix_hashes[i])
        if not chunk.refill:
            seq.num_cached = chunk.end
        elif chunk.end == seq.num_cached:
            seq.depth_cap, seq.filled = None, 0
        else:
            seq.filled = chunk.end

    def refill(self, depth: int) -> None:
        """Layers beyond `depth` were loaded: decoding sequences keep decoding no deeper than the layers
        their context has while it is refilled; sequences still in their prompt prefill start it over."""
        for seq in self.running:
            if seq.num_cached < len(seq.token_ids) - 1:
                seq.num_cached, seq.depth_cap = 0, None
            else:
                seq.depth_cap = depth if seq.depth_cap is None else min(seq.depth_cap, depth)
                seq.filled = 0

    def unload(self, depth: int) -> None:
        """Layers beyond `depth` were unloaded: a refill those layers needed is no longer needed."""
        for seq in self.running:
            if seq.depth_cap is not None and seq.depth_cap >= depth:
                seq.depth_cap, seq.filled = None, 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_cached, seq.depth_cap, seq.filled, seq.status = 0, None, 0, RequestStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preempted += 1

    def _release(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.blocks.free(block)
        seq.block_table = []

    def finish(self, seq: Sequence) -> None:
        if seq.status == RequestStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = RequestStatus.FINISHED

    @property
    def used_tokens(self) -> int:
        """Positions the running sequences hold blocks for."""
        return self.blocks.num_used * self.block_size

    def resize(self, num_blocks: int, max_seqs: int) -> tuple[dict[int, int], list[Sequence]]:
        """Change the pool to `num_blocks` blocks and at most `max_seqs` running sequences. The newest
        sequences are preempted until the rest fit (recomputed later, never dropped); the others keep
        their blocks, renumbered into the new pool. Returns (old block -> new block for the blocks
        whose contents survive, preempted)."""
        preempted = []
        while self.running and (len(self.running) > max_seqs or self.blocks.num_used > num_blocks):
            preempted.append(self.running[-1])
            self._preempt(self.running[-1])
        self.max_seqs = max_seqs
        moves = self.blocks.resize(num_blocks, [s.block_table for s in self.running])
        return moves, preempted
