"""The paged KV cache: the memory plan that sizes it, the block pool, and attention over block tables.

K/V live in blocks of `block_size` positions, in every *loaded* layer only: the layers a partially
loaded model does not hold get no cache, and that memory becomes more blocks. A sequence holds a
block table (its i-th block of positions -> a physical block), grown as it grows and freed when it
ends, so the pool holds the tokens sequences actually have, not `max_model_len` per sequence.
`plan_memory` solves

    weights + workspace_fixed + num_blocks * (kv_per_block + scratch_per_block)
            + min(max_num_seqs, num_blocks) * workspace_per_seq <= memory_budget

for the largest `num_blocks` (a running sequence holds at least one block, so no batch has more rows
than there are blocks). Capacity is a number of tokens; in sequences it depends on their length.

Decode attention reads the pool in place, *block-major*: every physical block below the highest one
the batch uses is multiplied by the query of the row that reads it (one batched matmul over blocks,
no copy of K/V), scores are masked and soft-maxed per row across its blocks, and the per-block
outputs are summed per row. Gathering each row's blocks into a contiguous tensor first costs a copy
of all K/V every layer, several times the attention itself on a CPU (bench/paged_attention.py
measures the options). Blocks are handed out lowest first, so the blocks in use stay at the bottom
of the pool and few unused ones are read. A block read by several rows (a shared prefix) is read in
place by one of them and gathered for the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .models.config import ModelConfig
from .models.transformer import attend, padded_rows, pads_shapes, per_layer


class MemoryBudgetError(ValueError):
    """The memory budget cannot hold the weights plus one sequence's KV cache and workspace."""


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    weight_bytes: int  # weights actually held (loaded layers, embeddings, head, exit heads)
    block_size: int  # positions per block
    kv_bytes_per_block: int  # K+V of one block across the loaded layers
    scratch_bytes_per_block: int  # decode attention's scores and partial outputs for one block
    workspace_fixed_bytes: int  # one prefill step's activations
    workspace_per_seq_bytes: int  # one decode row's activations and logits
    num_blocks: int
    max_num_seqs: int  # the configured cap on running sequences

    @property
    def max_seqs(self) -> int:
        """Running sequences the plan holds workspace for (each holds at least one block)."""
        return min(self.max_num_seqs, self.num_blocks)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def sequences(self, mean_len: float) -> int:
        """Sequences of `mean_len` tokens (prompt + output) the pool holds at once."""
        per_seq = blocks_for(max(1, round(mean_len)), self.block_size)
        return min(self.max_seqs, self.num_blocks // per_seq)

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.kv_bytes_per_block

    @property
    def workspace_bytes(self) -> int:
        return (self.workspace_fixed_bytes + self.num_blocks * self.scratch_bytes_per_block
                + self.max_seqs * self.workspace_per_seq_bytes)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.workspace_bytes

    def budget_for_blocks(self, num_blocks: int) -> int:
        """The memory budget whose plan (same weights and settings) has exactly `num_blocks` blocks."""
        seqs = min(self.max_num_seqs, num_blocks)
        return (self.weight_bytes + self.workspace_fixed_bytes + seqs * self.workspace_per_seq_bytes
                + num_blocks * (self.kv_bytes_per_block + self.scratch_bytes_per_block))


def plan_memory(
    config: ModelConfig,
    num_layers: int,
    weight_bytes: int,
    budget_bytes: int,
    max_len: int,
    element_size: int,
    max_num_seqs: int,
    prefill_chunk: int,
    block_size: int,
) -> MemoryPlan:
    c = config
    kv_block = num_layers * block_size * c.kv_bytes_per_token_per_layer(element_size)
    # Decode attention per block: fp32 scores and their exponentials (2 · heads · block_size), the
    # exponentials in the model dtype, and the block's partial output (heads · head_dim, fp32).
    scratch_block = c.num_heads * (8 * block_size + element_size * block_size + 4 * c.head_dim)
    # Peak live activations in eager PyTorch, per token row: residual + normed input + attention
    # output (3·D), QKV, the MLP's wide input and its activation (1.5 × its width); per decode row
    # also fp32 logits, probabilities and sampling scratch (3·V). A prefill step's tokens may
    # attend to up to max_len keys each (fp32 scores per head).
    mlp_width = (2 if c.gated_mlp else 1) * c.intermediate_size
    row = element_size * (3 * c.hidden_size + c.q_size + 2 * c.kv_size + mlp_width * 3 // 2)
    per_seq = row + 4 * 3 * c.vocab_size
    fixed = prefill_chunk * row + 4 * c.num_heads * prefill_chunk * max_len
    free = budget_bytes - weight_bytes - fixed
    per_block = kv_block + scratch_block
    num_blocks = max(free, 0) // (per_block + per_seq)
    if num_blocks >= max_num_seqs:  # workspace for max_num_seqs rows; the rest is blocks
        num_blocks = (free - max_num_seqs * per_seq) // per_block
    needed = blocks_for(max_len, block_size)
    if num_blocks < needed:
        need = weight_bytes + fixed + needed * per_block + min(needed, max_num_seqs) * per_seq
        raise MemoryBudgetError(
            f"memory_budget of {budget_bytes / 2**20:.1f} MiB cannot hold {num_layers} layers "
            f"({weight_bytes / 2**20:.1f} MiB of weights) plus one {max_len}-token sequence: "
            f"need at least {need / 2**20:.1f} MiB (lower max_model_len or load fewer layers)"
        )
    return MemoryPlan(budget_bytes, weight_bytes, block_size, kv_block, scratch_block, fixed, per_seq,
                      int(num_blocks), max_num_seqs)


class KVCache:
    """Per-layer K/V pools of shape (num_blocks, kv_heads, block_size, head_dim).

    Head-major within a block, so a block's keys for one head are one (block_size, head_dim) matrix
    that the decode's batched matmul reads without a copy.
    """

    def __init__(self, config: ModelConfig, num_layers: int, num_blocks: int, block_size: int, dtype, device):
        self.config, self.block_size, self.dtype, self.device = config, block_size, dtype, torch.device(device)
        self.num_blocks = num_blocks
        self.k = [self._new() for _ in range(num_layers)]
        self.v = [self._new() for _ in range(num_layers)]

    def _new(self) -> Tensor:
        # Zeros, not empty: decode attention multiplies unused blocks by zero weights, and 0 * NaN is NaN.
        c = self.config
        return torch.zeros(self.num_blocks, c.num_kv_heads, self.block_size, c.head_dim, dtype=self.dtype,
                           device=self.device)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def resize(self, num_layers: int, num_blocks: int, keep: dict[int, int]) -> None:
        """Re-shape the pool to `num_layers` layers and `num_blocks` blocks.

        keep: old block -> new block, for the blocks whose contents survive (in the layers both
        shapes have). Layers are rebuilt one at a time, so the transient overhead is one layer's pool.
        """
        old_k, old_v = self.k[:num_layers], self.v[:num_layers]
        self.k, self.v, self.num_blocks = [], [], num_blocks
        src = torch.tensor(list(keep), dtype=torch.long, device=self.device)
        dst = torch.tensor(list(keep.values()), dtype=torch.long, device=self.device)
        for pools, old in ((self.k, old_k), (self.v, old_v)):
            for i in range(num_layers):
                new = self._new()
                if i < len(old):
                    if keep:
                        new[dst] = old[i][src]
                    old[i] = None  # release before allocating the next layer
                pools.append(new)


def _token_slots(tables: list[list[int]], starts: list[int], ends: list[int], block_size: int,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """(physical block, offset in block) of every position in [start, end) of each table, concatenated."""
    blocks, offsets = [], []
    for table, start, end in zip(tables, starts, ends):
        for p in range(start, end):
            blocks.append(table[p // block_size])
            offsets.append(p % block_size)
    return torch.tensor(blocks, device=device), torch.tensor(offsets, device=device)


class DecodeKV:
    """KV access for a decode step: one new token per row, at `positions`, over the rows' block tables."""

    def __init__(self, cache: KVCache, positions: list[int], tables: list[list[int]]):
        bs, device = cache.block_size, cache.device
        self.cache = cache
        self.positions = torch.tensor(positions, device=device)
        block, offset = _token_slots(tables, positions, [p + 1 for p in positions], bs, device)
        # Row r's new K/V for head h lands in row (block * KV + h) * bs + offset of the pool seen as (-1, D):
        # one index_copy_, about half the time a call of indexing the pool by (block, :, offset) took.
        heads = torch.arange(cache.config.num_kv_heads, device=device)
        self.write_rows = ((block[:, None] * len(heads) + heads) * bs + offset[:, None]).flatten()

        # The (row, block) pairs the batch reads: a row reads its blocks 0 .. position // block_size.
        # The first reader of each physical block reads it in place; repeat readers get a gathered copy.
        owner: dict[int, tuple[int, int]] = {}  # physical block -> (row, logical index)
        extra: list[tuple[int, int, int]] = []  # (row, physical block, logical index)
        for row, (table, p) in enumerate(zip(tables, positions)):
            for j in range(p // bs + 1):
                if table[j] in owner:
                    extra.append((row, table[j], j))
                else:
                    owner[table[j]] = (row, j)
        self.hi = max(owner) + 1  # blocks [0, hi) are read in place; unread ones there are masked
        if pads_shapes(cache.dtype, device):  # few matmul shapes (see padded_rows)
            self.hi = min(padded_rows(self.hi), cache.num_blocks)
            if extra:
                extra += [(0, 0, -1)] * (padded_rows(len(extra)) - len(extra))  # masked: read by nobody
        row_of = [0] * self.hi
        logical = [-1] * self.hi  # -1: nobody reads this block
        for block, (row, j) in owner.items():
            row_of[block], logical[block] = row, j
        rows = row_of + [r for r, _, _ in extra]
        logical += [j for _, _, j in extra]
        self.pair_row = torch.tensor(rows, device=device)  # (P,) the row each pair belongs to
        self.extra_blocks = torch.tensor([b for _, b, _ in extra], dtype=torch.long, device=device)
        logical_t = torch.tensor(logical, device=device)
        key_pos = logical_t[:, None] * bs + torch.arange(bs, device=device)  # (P, bs)
        q_pos = self.positions[self.pair_row][:, None]
        read = (logical_t >= 0)[:, None] & (key_pos <= q_pos)

        def bias(window: int | None) -> tuple[Tensor, Tensor]:
            """(P, 1, 1, bs) bias: 0 = attend, -inf = not; and (P, 1, 1) True where a pair attends to no
            key at all (unread, or out of the window): its bias is 0 instead, so its softmax stays finite,
            and its weight is zeroed through its max."""
            allowed = read if window is None else read & (q_pos - key_pos < window)
            dead = ~allowed.any(-1)
            masked = ~allowed & ~dead[:, None]
            return (torch.zeros(allowed.shape, device=device).masked_fill_(masked, float("-inf"))[:, None, None, :],
                    dead[:, None, None])

        self.biases = per_layer(cache.config.layer_windows, bias)

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        # k, v: (N, 1, KV, D)
        d = k.shape[-1]
        self.cache.k[layer].view(-1, d).index_copy_(0, self.write_rows, k.reshape(-1, d))
        self.cache.v[layer].view(-1, d).index_copy_(0, self.write_rows, v.reshape(-1, d))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        """q: (N, 1, H, D) -> (N, 1, H*D)."""
        self.write(layer, k, v)
        n, _, h, d = q.shape
        kv_heads = k.shape[2]
        kp, vp = self.cache.k[layer], self.cache.v[layer]
        groups = (n, kv_heads, h // kv_heads)
        q = q.reshape(*groups, d) * (d**-0.5 if scale is None else scale)  # each KV head's queries as one matrix
        qp = q[self.pair_row]  # (P, KV, G, D)
        in_place = slice(0, self.hi)
        scores = torch.matmul(qp[in_place], kp[in_place].transpose(-1, -2))  # (hi, KV, G, bs)
        if self.extra_blocks.numel():
            shared = torch.matmul(qp[self.hi :], kp[self.extra_blocks].transpose(-1, -2))
            scores = torch.cat([scores, shared])
        bias, dead = self.biases[layer]
        scores = torch.add(scores, bias)  # fp32
        # Softmax per block (one fused kernel: its exponential is several times faster than exp_), then
        # each block reweighted to the row's softmax, flash-decoding style: a block with max m and
        # exponential sum s (1 / its largest probability) weighs exp(m - row max) * s / the row's total.
        block_max = scores.amax(-1).masked_fill_(dead, float("-inf"))  # (P, KV, G)
        probs = scores.softmax(-1)
        index = self.pair_row[:, None, None].expand_as(block_max)
        row_max = block_max.new_full(groups, float("-inf")).scatter_reduce_(0, index, block_max, "amax")
        mass = (block_max - row_max[self.pair_row]).exp_().div_(probs.amax(-1))
        total = mass.new_zeros(groups).index_add_(0, self.pair_row, mass)
        weights = torch.mul(probs, (mass / total[self.pair_row])[..., None], out=torch.empty_like(probs, dtype=vp.dtype))
        partial = torch.matmul(weights[in_place], vp[in_place])  # (hi, KV, G, D)
        if self.extra_blocks.numel():
            partial = torch.cat([partial, torch.matmul(weights[self.hi :], vp[self.extra_blocks])])
        out = torch.zeros(*groups, d, device=q.device).index_add_(0, self.pair_row, partial.float())
        return out.to(q.dtype).view(n, 1, h * d)


class PrefillKV:
    """KV access for prefill chunks of several sequences packed into one (1, T, ·) forward.

    chunks: (block table, start, end) per sequence, in packing order: positions [start, end) of each.
    Each sequence attends to its own cached positions and its chunk (a per-sequence causal mask); a
    chunk that starts at position 0 attends to its own K/V directly, with no read of the pool.
    """

    def __init__(self, cache: KVCache, chunks: list[tuple[list[int], int, int]]):
        self.cache, self.chunks = cache, chunks
        tables, starts, ends = zip(*chunks)
        self.block, self.offset = _token_slots(tables, starts, ends, cache.block_size, cache.device)
        self.lengths = [end - start for _, start, end in chunks]
        self.masks = [self._masks(start, end) for _, start, end in chunks]

    def _masks(self, start: int, end: int) -> tuple[Tensor, ...]:
        keys = end if start == 0 else blocks_for(end, self.cache.block_size) * self.cache.block_size
        q_pos = torch.arange(start, end, device=self.cache.device)[:, None]
        k_pos = torch.arange(keys, device=self.cache.device)[None, :]

        def mask(window: int | None) -> Tensor:  # (1, 1, t, keys)
            allowed = k_pos <= q_pos
            if window is not None:
                allowed &= q_pos - k_pos < window
            return allowed[None, None]

        return per_layer(self.cache.config.layer_windows, mask)

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        # k, v: (1, T, KV, D) with T the packed chunk tokens
        self.cache.k[layer][self.block, :, self.offset] = k[0]
        self.cache.v[layer][self.block, :, self.offset] = v[0]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        """q: (1, T, H, D) -> (1, T, H*D)."""
        self.write(layer, k, v)
        kp, vp = self.cache.k[layer], self.cache.v[layer]
        outs = []
        for (table, start, end), qi, ki, vi, masks in zip(self.chunks, q.split(self.lengths, 1),
                                                            k.split(self.lengths, 1), v.split(self.lengths, 1),
                                                            self.masks):
            if start == 0:
                keys, values = ki.transpose(1, 2), vi.transpose(1, 2)
            else:  # the cached context: this sequence's blocks, gathered into one (1, KV, S, D) tensor
                blocks = torch.tensor(table[: blocks_for(end, self.cache.block_size)], device=kp.device)
                keys = kp[blocks].transpose(0, 1).flatten(1, 2)[None]
                values = vp[blocks].transpose(0, 1).flatten(1, 2)[None]
            outs.append(attend(qi, keys, values, masks[layer], scale))
        return torch.cat(outs, dim=1)
