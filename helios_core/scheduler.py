"""Continuous batching: who holds a slot, what gets prefilled, who decodes this step.

Requests join between steps (admitted FIFO while slots are free) and leave between steps (their
slot is freed). Long prompts are prefilled in chunks under a per-step token budget, so a long
prompt never stalls the decode of running requests for more than one chunk.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .request import RequestStatus, Sequence


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # first position to fill
    end: int  # one past the last


@dataclass
class StepPlan:
    prefills: list[PrefillChunk]  # run first, in order
    decodes: list[Sequence]  # then one decode step over these, row i in slot i


class Scheduler:
    def __init__(self, capacity: int, max_prefill_tokens: int):
        self.capacity = capacity
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.free_slots: set[int] = set(range(capacity))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = min(self.free_slots)
            self.free_slots.remove(seq.slot)
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)

        budget, prefills, decodes = self.max_prefill_tokens, [], []
        for seq in self.running:
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

    def finish(self, seq: Sequence) -> None:
        if seq.status == RequestStatus.RUNNING:
            self.running.remove(seq)
            self.free_slots.add(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.slot = None
        seq.status = RequestStatus.FINISHED

    def arrange_decode_slots(self, decodes: list[Sequence]) -> list[tuple[str, int, int, int]]:
        """Put the decode rows in slots [0, B) so attention reads the pool without a copy.

        Returns cache operations ("swap"|"move", a, b, length) to apply, then rows sort by slot.
        """
        n = len(decodes)
        decoding = {id(s) for s in decodes}
        owner = {s.slot: s for s in self.running}
        holes = [i for i in range(n) if i not in owner or id(owner[i]) not in decoding]
        misplaced = [s for s in decodes if s.slot >= n]
        ops = []
        for seq, hole in zip(misplaced, holes):
            other = owner.get(hole)
            if other is None:
                ops.append(("move", seq.slot, hole, seq.num_cached))
                self.free_slots.remove(hole)
                self.free_slots.add(seq.slot)
            else:
                ops.append(("swap", seq.slot, hole, max(seq.num_cached, other.num_cached)))
                other.slot = seq.slot
            seq.slot = hole
        decodes.sort(key=lambda s: s.slot)
        return ops

    def resize(self, capacity: int) -> tuple[dict[int, tuple[int, int]], list[Sequence]]:
        """Change the slot count. Sequences beyond it are preempted (newest first) back to the queue
        to be recomputed later; the rest keep their cache. Returns (old slot -> (new slot, length),
        preempted sequences)."""
        preempted = []
        while len(self.running) > capacity:
            seq = self.running.pop()
            seq.slot, seq.num_cached, seq.status = None, 0, RequestStatus.WAITING
            self.waiting.appendleft(seq)
            preempted.append(seq)
        used = {s.slot for s in self.running}
        free_low = iter(sorted(set(range(capacity)) - used))
        keep = {}
        for seq in self.running:
            old = seq.slot
            if old >= capacity:
                seq.slot = next(free_low)
            keep[old] = (seq.slot, seq.num_cached)
        self.capacity = capacity
        self.free_slots = set(range(capacity)) - {s.slot for s in self.running}
        return keep, preempted
