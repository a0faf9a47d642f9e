"""A decoder-only transformer that covers Llama/Mistral/Qwen2, OPT and GPT-2.

Read top to bottom: norms, RoPE, attention, MLP, block, the model. Weights are fused at load time
(Q/K/V into one matrix, gate/up into one) so a decode step runs few, larger matmuls.

The model holds only the layers that are loaded: `layers` is the prefix [0, K) of the checkpoint's
layers. Embeddings, the final norm and the LM head are always present because every exit needs them.
The model owns no KV cache: each attention call gets a `KVAccess` that says where K/V go and which
keys to attend to (a cached decode batch, a prefill chunk of one sequence, or no cache at all).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, RopeConfig


# --- norms -------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one fused op on the hot fp32 path
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        # Half precision: normalise in fp32 like the reference implementation, scale in the model dtype.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rms":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


ACTIVATION_FNS = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


# --- rotary position embedding -----------------------------------------------------------------
def rope_inv_freq(rope: RopeConfig, head_dim: int) -> Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope.scaling == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.scaling == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, blended, inv_freq)
    return inv_freq.float()


def rope_tables(rope: RopeConfig, head_dim: int, max_len: int) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (max_len, head_dim), halves duplicated (the rotate-half convention)."""
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(rope, head_dim))
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (N, T, heads, D); cos/sin: (N, T, 1, D) in x's dtype (see Transformer.rope)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# --- attention ---------------------------------------------------------------------------------
class KVAccess(Protocol):
    """Where one attention call writes its new K/V and what it attends to."""

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store k, v (N, T, KV, D)."""
        ...

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store k, v; return keys, values (N, KV, S, D) and a bool mask (N, 1, T, S), True = attend."""
        ...


def attend(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """q: (N, T, H, D); keys/values: (N, KV, S, D); mask: bool (N, 1, T, S), True = attend.

    Returns (N, T, H*D). Grouped-query attention needs no repeated K/V (enable_gqa).
    """
    n, t, h, d = q.shape
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=keys.shape[1] != h
    )  # (N, H, T, D)
    return out.transpose(1, 2).reshape(n, t, h * d)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wqkv = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.qkv_bias)
        self.wo = nn.Linear(config.q_size, config.hidden_size, bias=config.out_bias)

    def project_kv(self, x: Tensor, cos: Tensor | None, sin: Tensor | None) -> tuple[Tensor, Tensor]:
        """K/V only (no Q): used to fill the cache for tokens that exited below this layer."""
        c = self.config
        w = self.wqkv.weight[c.q_size :]
        b = self.wqkv.bias[c.q_size :] if self.wqkv.bias is not None else None
        k, v = F.linear(x, w, b).split([c.kv_size, c.kv_size], dim=-1)
        k = k.view(*x.shape[:2], c.num_kv_heads, c.head_dim)
        v = v.view(*x.shape[:2], c.num_kv_heads, c.head_dim)
        if cos is not None:
            k = apply_rope(k, cos, sin)
        return k, v

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, kv: KVAccess, layer: int) -> Tensor:
        c = self.config
        n, t, _ = x.shape
        qk, v = self.wqkv(x).split([c.q_size + c.kv_size, c.kv_size], dim=-1)
        qk = qk.reshape(n, t, c.num_heads + c.num_kv_heads, c.head_dim)
        if cos is not None:
            qk = apply_rope(qk, cos, sin)  # Q and K heads rotated in one pass
        q, k = qk.split([c.num_heads, c.num_kv_heads], dim=2)
        v = v.view(n, t, c.num_kv_heads, c.head_dim)
        keys, values, mask = kv.update(layer, k, v)
        return self.wo(attend(q, keys, values, mask))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.gated_mlp
        width = 2 * config.intermediate_size if self.gated else config.intermediate_size
        self.w_in = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.w_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACTIVATION_FNS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        h = self.w_in(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.w_out(self.act(gate) * up)
        return self.w_out(self.act(h))


class Block(nn.Module):
    """Pre-norm residual block; every family we support is pre-norm."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, kv: KVAccess,
                rows: Tensor | None = None) -> Tensor:
        """rows: indices of the rows that advance (None = all). The others are exited tokens: they
        still write this layer's K/V from their frozen state, and come back unchanged."""
        a = self.attn(self.attn_norm(x), cos, sin, kv, self.index)
        if rows is None:
            x = x + a
            return x + self.mlp(self.mlp_norm(x))
        h = x[rows] + a[rows]
        return x.index_copy(0, rows, h + self.mlp(self.mlp_norm(h)))

    def fill_kv(self, h: Tensor, cos: Tensor | None, sin: Tensor | None, kv: KVAccess) -> None:
        """Write this layer's K/V for hidden states that skip it (an exited token's frozen state)."""
        k, v = self.attn.project_kv(self.attn_norm(h), cos, sin)
        kv.write(self.index, k, v)


# --- the model ---------------------------------------------------------------------------------
class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, num_layers: int):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.positions == "learned":
            self.pos_embed = nn.Embedding(config.max_position_embeddings + config.position_offset, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(num_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def num_loaded_layers(self) -> int:
        return len(self.layers)

    def setup_rope(self, max_len: int) -> None:
        if self.config.positions == "rope":
            cos, sin = rope_tables(self.config.rope, self.config.head_dim, max_len)
            # Tables in the model dtype with a head axis, so applying RoPE costs no casts or reshapes.
            w = self.embed.weight
            self.register_buffer("rope_cos", cos[:, None].to(w.device, w.dtype), persistent=False)
            self.register_buffer("rope_sin", sin[:, None].to(w.device, w.dtype), persistent=False)

    def rope(self, positions: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """cos/sin for positions (N, T), shaped (N, T, 1, D) to broadcast over heads."""
        if self.config.positions != "rope":
            return None, None
        return self.rope_cos[positions], self.rope_sin[positions]

    def embed_tokens(self, tokens: Tensor, positions: Tensor) -> Tensor:
        x = self.embed(tokens)
        if self.config.positions == "learned":
            x = x + self.pos_embed(positions + self.config.position_offset)
        return x

    def weight_bytes(self) -> int:
        """Bytes of all parameters held, tied tensors counted once."""
        seen, total = set(), 0
        for p in self.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total

    @torch.inference_mode()
    def forward(self, tokens: Tensor, output_hidden_states: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Full-sequence forward without a cache (reference path for tests and evaluation).

        tokens: (N, T). Returns logits (N, T, V) from the last loaded layer, and optionally the hidden
        state after every loaded layer (before the final norm).
        """
        tokens = tokens.to(self.embed.weight.device)  # callers may build token ids on the CPU
        n, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(n, t)
        x = self.embed_tokens(tokens, positions)
        cos, sin = self.rope(positions)
        kv = NoCache(causal_mask(t, t, 0, self.config.sliding_window, x.device))
        hidden = []
        for layer in self.layers:
            x = layer(x, cos, sin, kv)
            hidden.append(x)
        logits = self.lm_head(self.norm(x))
        return (logits, hidden) if output_hidden_states else logits


def causal_mask(t: int, s: int, start: int, window: int | None, device: torch.device) -> Tensor:
    """Bool (1, 1, t, s) mask for queries at positions start..start+t over keys 0..s."""
    q_pos = torch.arange(start, start + t, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed[None, None]


class NoCache:
    """Attend within the given tokens only (full-sequence forward)."""

    def __init__(self, mask: Tensor):
        self.mask = mask

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        pass  # nothing persists between calls

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return k.transpose(1, 2), v.transpose(1, 2), self.mask
