"""The KV cache pool and the memory arithmetic that sizes it.

The pool holds K and V for `capacity` sequence slots of `max_len` positions each, in every *loaded*
layer only: the layers a partially loaded model does not hold get no cache, and that memory becomes
more slots. `plan_memory` solves

    weights + capacity * (kv_per_seq + workspace_per_seq) + workspace_fixed <= memory_budget

for the largest capacity. Slots are fixed-size (one per running sequence), so capacity is exactly
f(budget, loaded layers, max_model_len).

Decode rows live in slots [0, B) in row order (the engine keeps them there), so the attention of a
decode batch reads a view of the pool with no copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .models.config import ModelConfig
from .models.transformer import causal_masks, per_layer


class MemoryBudgetError(ValueError):
    """The memory budget cannot hold the weights plus one sequence's KV cache and workspace."""


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    weight_bytes: int  # weights actually held (loaded layers, embeddings, head, exit heads)
    kv_bytes_per_seq: int  # K+V of one max_len slot across the loaded layers
    workspace_fixed_bytes: int  # one prefill chunk's activations
    workspace_per_seq_bytes: int  # one decode row's activations and logits
    capacity: int  # batch capacity: sequence slots in the pool

    @property
    def kv_bytes(self) -> int:
        return self.capacity * self.kv_bytes_per_seq

    @property
    def workspace_bytes(self) -> int:
        return self.workspace_fixed_bytes + self.capacity * self.workspace_per_seq_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.workspace_bytes


def plan_memory(
    config: ModelConfig,
    num_layers: int,
    weight_bytes: int,
    budget_bytes: int,
    max_len: int,
    element_size: int,
    max_num_seqs: int,
    prefill_chunk: int,
) -> MemoryPlan:
    c = config
    kv_per_seq = num_layers * max_len * c.kv_bytes_per_token_per_layer(element_size)
    # Peak live activations in eager PyTorch, per token row: residual + normed input + attention
    # output (3·D), QKV, the MLP's wide input and its activation (1.5 × its width), attention scores
    # over max_len keys per head; plus fp32 logits, probabilities and sampling scratch (3·V).
    mlp_width = (2 if c.gated_mlp else 1) * c.intermediate_size
    row = element_size * (3 * c.hidden_size + c.q_size + 2 * c.kv_size + mlp_width * 3 // 2)
    per_seq = row + 4 * c.num_heads * max_len + 4 * 3 * c.vocab_size
    fixed = prefill_chunk * row + 4 * c.num_heads * prefill_chunk * max_len
    free = budget_bytes - weight_bytes - fixed
    capacity = min(max_num_seqs, max(free, 0) // (kv_per_seq + per_seq))
    if capacity < 1:
        need = weight_bytes + fixed + kv_per_seq + per_seq
        raise MemoryBudgetError(
            f"memory_budget of {budget_bytes / 2**20:.1f} MiB cannot hold {num_layers} layers "
            f"({weight_bytes / 2**20:.1f} MiB of weights) plus one {max_len}-token sequence: "
            f"need at least {need / 2**20:.1f} MiB (lower max_model_len or load fewer layers)"
        )
    return MemoryPlan(budget_bytes, weight_bytes, kv_per_seq, fixed, per_seq, int(capacity))


class KVCache:
    """Per-layer K/V tensors of shape (capacity, kv_heads, max_len, head_dim)."""

    def __init__(self, config: ModelConfig, num_layers: int, capacity: int, max_len: int, dtype, device):
        self.config, self.max_len, self.dtype, self.device = config, max_len, dtype, torch.device(device)
        self.capacity = capacity
        self.k = [self._new() for _ in range(num_layers)]
        self.v = [self._new() for _ in range(num_layers)]

    def _new(self) -> Tensor:
        # Zeros, not empty: stale NaNs in masked positions could leak through 0 * NaN.
        c = self.config
        return torch.zeros(self.capacity, c.num_kv_heads, self.max_len, c.head_dim, dtype=self.dtype, device=self.device)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        for cache in self.k + self.v:
            cache[dst, :, :length] = cache[src, :, :length]

    def swap_slots(self, a: int, b: int, length: int) -> None:
        for cache in self.k + self.v:
            tmp = cache[a, :, :length].clone()
            cache[a, :, :length] = cache[b, :, :length]
            cache[b, :, :length] = tmp

    def resize(self, num_layers: int, capacity: int, keep: dict[int, tuple[int, int]]) -> None:
        """Re-shape the pool to `num_layers` layers and `capacity` slots.

        keep: old slot -> (new slot, length) for the sequences whose cached positions survive.
        Layers are rebuilt one at a time, so the transient overhead is one layer's cache.
        """
        old_k, old_v = self.k[:num_layers], self.v[:num_layers]
        self.k, self.v, self.capacity = [], [], capacity
        for caches, old in ((self.k, old_k), (self.v, old_v)):
            for i in range(num_layers):
                new = self._new()
                if i < len(old):
                    for src, (dst, length) in keep.items():
                        new[dst, :, :length] = old[i][src, :, :length]
                    old[i] = None  # release before allocating the next layer
                caches.append(new)


class DecodeKV:
    """KV access for a decode step: one new token per row, row i in slot i. masks: one per layer."""

    def __init__(self, cache: KVCache, slots: Tensor, positions: Tensor, masks: tuple[Tensor, ...]):
        self.cache, self.slots, self.positions, self.masks = cache, slots, positions, masks
        self.length = masks[0].shape[-1]

    @staticmethod
    def for_rows(cache: KVCache, positions: Tensor, max_position: int) -> "DecodeKV":
        """Row i in slot i; `max_position` is positions.max() (known on the host, so no device sync here)."""
        slots = torch.arange(positions.shape[0], device=positions.device)
        length = max_position + 1
        k_pos = torch.arange(length, device=positions.device)[None, :]
        q_pos = positions[:, None]

        def mask(window: int | None) -> Tensor:  # (B, 1, 1, S)
            allowed = k_pos <= q_pos
            if window is not None:
                allowed &= q_pos - k_pos < window
            return allowed[:, None, None, :]

        return DecodeKV(cache, slots, positions, per_layer(cache.config.layer_windows, mask))

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        self.cache.k[layer][self.slots, :, self.positions] = k[:, 0]  # k: (N, 1, KV, D)
        self.cache.v[layer][self.slots, :, self.positions] = v[:, 0]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.write(layer, k, v)
        n = self.slots.shape[0]
        return self.cache.k[layer][:n, :, : self.length], self.cache.v[layer][:n, :, : self.length], self.masks[layer]


class PrefillKV:
    """KV access for a chunk of one sequence's prompt at positions [start, start + t)."""

    def __init__(self, cache: KVCache, slot: int, start: int, t: int):
        self.cache, self.slot, self.start, self.end = cache, slot, start, start + t
        self.masks = causal_masks(cache.config, t, self.end, start, cache.device)

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        self.cache.k[layer][self.slot, :, self.start : self.end] = k[0].transpose(0, 1)  # (KV, t, D)
        self.cache.v[layer][self.slot, :, self.start : self.end] = v[0].transpose(0, 1)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.write(layer, k, v)
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        s = self.slot
        return kc[s : s + 1, :, : self.end], vc[s : s + 1, :, : self.end], self.masks[layer]
