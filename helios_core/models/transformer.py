"""A decoder-only transformer that covers Llama/Mistral/Qwen2, Gemma 3, OPT and GPT-2.

Read top to bottom: norms, RoPE, attention, MLP, block, the model. Weights are fused at load time
(Q/K/V into one matrix, gate/up into one) so a decode step runs few, larger matmuls.

Layers may differ in their attention: a *local* layer attends within a sliding window, a *global*
one to every earlier position (`config.layer_windows`), and Gemma 3's local layers rotate with their
own RoPE base. `Transformer.rope` returns the cos/sin tables of every RoPE variant once per forward,
each block picks its own (`Block.rope_index`), and each KV access hands a layer the mask of its window.

The model holds only the layers that are loaded: `layers` is the prefix [0, K) of the checkpoint's
layers. Embeddings, the final norm and the LM head are always present because every exit needs them.
The model owns no KV cache: each attention call gets a `KVAccess` that says where K/V go and how the
queries attend (a decode batch over the paged cache, packed prefill chunks, or no cache at all).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, RopeConfig
from .quantize import int8_linear, quantize_rows, scale_dtype


# --- linear layers -----------------------------------------------------------------------------
def padded_rows(rows: int) -> int:
    """The row count a oneDNN matmul on the CPU (half precision, or a packed weight) runs at: `rows` up
    to 16, then rounded up to eight steps per doubling (at most 12.5% more rows). oneDNN keeps a
    primitive (~0.4 MB) for every distinct shape it meets, so a server's memory would grow with every
    batch size it sees."""
    if rows <= 16:
        return rows
    step = 1 << ((rows - 1).bit_length() - 4)
    return -(-rows // step) * step


def pads_shapes(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether matmuls of this dtype on this device run at `padded_rows` (half precision on the CPU)."""
    return dtype != torch.float32 and device.type == "cpu"


def packs_weights(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether full-precision weights on this device are held packed for oneDNN (`Linear.pack`): on a
    CPU with oneDNN, in fp32, and in bf16 where oneDNN computes it."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, scale: Tensor | None = None,
           onednn: bool = False) -> Tensor:
    """F.linear, with x's rows padded to `padded_rows` where oneDNN would cache a primitive per row count.
    With `scale`, the weight is int8 with one scale per output row (models/quantize.py); a weight held
    in oneDNN's layout (`Linear.pack`), or a plain one with `onednn`, runs through oneDNN's linear."""
    if scale is not None:
        return int8_linear(x, weight, scale, bias)
    onednn = onednn or weight.is_mkldnn
    product = _onednn_linear if onednn else F.linear
    if onednn or pads_shapes(weight.dtype, weight.device):
        rows = x.numel() // x.shape[-1]
        padded = padded_rows(rows)
        if padded != rows:
            flat = x.reshape(rows, x.shape[-1])
            out = product(torch.cat([flat, flat.new_zeros(padded - rows, flat.shape[1])]), weight, bias)
            return out[:rows].view(*x.shape[:-1], weight.shape[0])
    return product(x, weight, bias)


def packed(weight: Tensor) -> Tensor:
    """The weight of a linear layer in oneDNN's blocked layout, for any row count (`Linear.pack`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """oneDNN's linear, over a packed weight or a plain one (read in place: no copy). No autograd."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear through `linear`: a bounded number of matmul shapes in half precision on the CPU, and
    optionally an int8 weight (`quantize`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("scale", None)  # per output row, once quantized
        self.onednn = False  # a plain weight multiplied by oneDNN (`pack_linears`' tied head in fp32)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.scale, self.onednn)

    def quantize(self) -> None:
        """Store the weight as int8 with a scale per output row; a tied weight is untied."""
        q, self.scale = quantize_rows(self.weight, scale_dtype(self.weight.dtype))
        self.weight = nn.Parameter(q, requires_grad=False)

    def pack(self) -> None:
        """Hold the weight in oneDNN's blocked layout. A plain weight is re-laid out inside every
        product; packed once, SmolLM2's products at 1-64 rows measured 1.3-2x faster in bf16 and
        2.3-3x in fp32 (2-core AMD EPYC, where fp32 otherwise takes a slower BLAS path). Inference
        only: the packed weight has no autograd, and cannot be sliced or looked up."""
        self.weight = nn.Parameter(packed(self.weight), requires_grad=False)

    def unpacked_weight(self) -> Tensor:
        """The weight in plain layout (a copy where it is packed)."""
        return self.weight.to_dense() if self.weight.is_mkldnn else self.weight


def quantize_linears(module: nn.Module) -> None:
    """Weight-only int8 for every `Linear` in `module` (models/quantize.py)."""
    for m in module.modules():
        if isinstance(m, Linear) and m.scale is None:
            m.quantize()


def pack_linears(module: nn.Module, skip: Tensor | None = None) -> None:
    """`Linear.pack` every full-precision `Linear` in `module` but one whose weight is `skip` (a tied
    weight packed is untied). That one, in fp32, is multiplied by oneDNN in its plain layout: PyTorch's
    fp32 F.linear takes a BLAS path that can be far slower (SmolLM2's tied head at 32 rows on a 2-core
    AMD EPYC: 16 ms against 7.0; packed 5.4). In bf16, F.linear is oneDNN's already."""
    for m in module.modules():
        if not isinstance(m, Linear) or m.scale is not None or m.weight.is_mkldnn:
            continue
        if m.weight is not skip:
            m.pack()
        else:
            m.onednn = m.weight.dtype == torch.float32


class MappedEmbedding(nn.Module):
    """The embedding table of a model whose tied LM head is held packed (`loader.pack_weights`), read
    from the checkpoint's memory-mapped file (`Checkpoint.mapped`) in the file's dtype and converted
    row by row as tokens are looked up: a packed head cannot be indexed, and a second table in memory
    would cost vocab x hidden bytes."""

    def __init__(self, table: Tensor, dtype: torch.dtype):
        super().__init__()
        self.table = table  # not a parameter: the file's pages, not the model's memory
        self.dtype = dtype

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.table).to(self.dtype)


class TiedInt8Embedding(nn.Module):
    """The embedding of a model whose LM head is tied to it, read from the int8 LM head (a row per
    token, dequantized as it is looked up): the full-precision table is not kept beside it."""

    def __init__(self, lm_head: Linear, dtype: torch.dtype):
        super().__init__()
        self.lm_head = [lm_head]  # a reference, not a submodule: its weights are counted once, as the head's
        self.dtype = dtype  # the model's (the scales may be kept in another, `scale_dtype`)

    def forward(self, tokens: Tensor) -> Tensor:
        head = self.lm_head[0]
        return F.embedding(tokens, head.weight).to(self.dtype) * head.scale[tokens].to(self.dtype).unsqueeze(-1)


def quantize_lm_head(model: "Transformer", tied: bool) -> None:
    """An int8 LM head; a tied embedding is then read from it (`TiedInt8Embedding`)."""
    quantize_linears(model.lm_head)
    if tied:
        model.embed = TiedInt8Embedding(model.lm_head, model.dtype)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's weights: parameters and quantization scales, tied tensors counted once."""
    seen, total = set(), 0
    scales = (m.scale for m in module.modules() if isinstance(m, Linear) and m.scale is not None)
    for t in (*module.parameters(), *scales):
        key = id(t) if t.device.type == "meta" or t.is_mkldnn else t.data_ptr()  # these have no storage
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# --- norms -------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one fused op on the hot fp32 path
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        # Half precision: like the reference implementation, normalise in fp32, round, then scale in the
        # model dtype. rms_norm computes in fp32 and rounds once, so it needs no fp32 copies of x; with the
        # weight inside it, the scaling would skip that rounding and drift from transformers by an ulp.
        return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is stored as an offset from 1 (zeros = identity), and the scaling is
    done in fp32 before the cast back to the model dtype (Llama's scales in the model dtype)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    """The family's norm over `dim` features (default hidden_size)."""
    dim = dim or config.hidden_size
    if config.norm == "rms":
        return RMSNorm(dim, config.norm_eps)
    if config.norm == "gemma_rms":
        return GemmaRMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


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
    """cos/sin of shape (max_len, head_dim), halves duplicated (the rotate-half convention), the sine's
    first half negated: rotate_half(x) * sin is then the swap of x's halves times this table."""
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(rope, head_dim))
    return torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-freqs.sin(), freqs.sin()], dim=-1)


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    # x: (N, T, heads, D); rope: cos, signed sin of shape (N, T, 1, D) in x's dtype (see Transformer.rope).
    # The same products and sum as transformers' x * cos + rotate_half(x) * sin (-a * b == a * -b exactly),
    # one op fewer.
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([x2, x1], dim=-1) * sin


# cos/sin per RoPE variant (Transformer.rope); None for models with learned positions.
RopeTables = tuple[tuple[Tensor, Tensor], ...] | None


# --- attention ---------------------------------------------------------------------------------
class KVAccess(Protocol):
    """Where one attention call writes its new K/V and which keys its queries attend to."""

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store k, v (N, T, KV, D)."""
        ...

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        """Store k, v; return the attention output (N, T, H*D) of q (N, T, H, D) over the keys this access
        holds (causal, and within the layer's window, `config.layer_windows[layer]`)."""
        ...


def attend(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """q: (N, T, H, D); keys/values: (N, KV, S, D); mask: bool (N, 1, T, S), True = attend.
    scale: of q·k, None = D ** -0.5.

    Returns (N, T, H*D). Grouped-query attention needs no repeated K/V (enable_gqa).
    """
    n, t, h, d = q.shape
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=mask, scale=scale, enable_gqa=keys.shape[1] != h
    )  # (N, H, T, D)
    return out.transpose(1, 2).reshape(n, t, h * d)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wqkv = Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.qkv_bias)
        self.wo = Linear(config.q_size, config.hidden_size, bias=config.out_bias)
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else None

    def project_kv(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """K/V only (no Q): used to fill the cache for tokens that exited below this layer."""
        c = self.config
        if self.wqkv.weight.is_mkldnn:  # a packed weight cannot be sliced: the Q columns are dropped after
            k, v = self.wqkv(x)[..., c.q_size :].split([c.kv_size, c.kv_size], dim=-1)
        else:
            w, b, scale = (None if t is None else t[c.q_size :]
                           for t in (self.wqkv.weight, self.wqkv.bias, self.wqkv.scale))
            k, v = linear(x, w, b, scale).split([c.kv_size, c.kv_size], dim=-1)
        k = k.view(*x.shape[:2], c.num_kv_heads, c.head_dim)
        v = v.view(*x.shape[:2], c.num_kv_heads, c.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if rope is not None:
            k = apply_rope(k, rope)
        return k, v

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, kv: KVAccess, layer: int) -> Tensor:
        c = self.config
        n, t, _ = x.shape
        qk, v = self.wqkv(x).split([c.q_size + c.kv_size, c.kv_size], dim=-1)
        qk = qk.reshape(n, t, c.num_heads + c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = qk.split([c.num_heads, c.num_kv_heads], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        if rope is not None:
            qk = apply_rope(qk, rope)  # Q and K heads rotated in one pass
        q, k = qk.split([c.num_heads, c.num_kv_heads], dim=2)
        v = v.view(n, t, c.num_kv_heads, c.head_dim)
        return self.wo(kv.attend(layer, q, k, v, c.attn_scale))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.gated_mlp
        width = 2 * config.intermediate_size if self.gated else config.intermediate_size
        self.w_in = Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.w_out = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACTIVATION_FNS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        h = self.w_in(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.w_out(self.act(gate) * up)
        return self.w_out(self.act(h))


class Block(nn.Module):
    """Pre-norm residual block; every family we support is pre-norm. With sandwich norms (Gemma) the
    attention and MLP outputs are normalised as well before they are added to the residual."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.rope_index = config.rope_index(index)
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.post_attn_norm = make_norm(config) if config.sandwich_norms else None
        self.post_mlp_norm = make_norm(config) if config.sandwich_norms else None

    def forward(self, x: Tensor, rope: RopeTables, kv: KVAccess, rows: Tensor | None = None) -> Tensor:
        """rows: indices of the rows that advance (None = all). The others are exited tokens: they
        still write this layer's K/V from their frozen state, and come back unchanged."""
        a = self.attn(self.attn_norm(x), self.own_rope(rope), kv, self.index)
        if rows is None:
            return self._residuals(x, a)
        return x.index_copy(0, rows, self._residuals(x[rows], a[rows]))

    def own_rope(self, rope: RopeTables) -> tuple[Tensor, Tensor] | None:
        """This layer's cos/sin among the model's RoPE variants."""
        return None if rope is None else rope[self.rope_index]

    def _residuals(self, x: Tensor, a: Tensor) -> Tensor:
        """Add the attention output `a` to the residual stream x, then the MLP's output."""
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        h = x + a
        m = self.mlp(self.mlp_norm(h))
        if self.post_mlp_norm is not None:
            m = self.post_mlp_norm(m)
        return h + m

    def fill_kv(self, h: Tensor, rope: RopeTables, kv: KVAccess) -> None:
        """Write this layer's K/V for hidden states that skip it (an exited token's frozen state)."""
        k, v = self.attn.project_kv(self.attn_norm(h), self.own_rope(rope))
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
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def num_loaded_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype: activations, K/V and every weight that is not quantized."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def setup_rope(self, max_len: int) -> None:
        c = self.config
        if c.positions == "rope":
            ropes = [c.rope] if c.local_rope is None else [c.rope, c.local_rope]  # indexed by config.rope_index
            tables = [rope_tables(rope, c.head_dim, max_len) for rope in ropes]
            # Tables in the model dtype with a head axis, so applying RoPE costs no casts or reshapes.
            for name, part in (("rope_cos", 0), ("rope_sin", 1)):
                stacked = torch.stack([table[part] for table in tables])[:, :, None]  # (variants, max_len, 1, D)
                self.register_buffer(name, stacked.to(self.device, self.dtype), persistent=False)

    def rope(self, positions: Tensor) -> RopeTables:
        """cos/sin of every RoPE variant for positions (N, T), each shaped (N, T, 1, D) to broadcast over
        heads; block i uses variant `config.rope_index(i)`. None with learned positions."""
        if self.config.positions != "rope":
            return None
        return tuple(zip(self.rope_cos[:, positions].unbind(0), self.rope_sin[:, positions].unbind(0)))

    def embed_tokens(self, tokens: Tensor, positions: Tensor) -> Tensor:
        x = self.embed(tokens)
        if self.config.embed_scale != 1.0:
            x = x * _in_dtype(self.config.embed_scale, x.dtype)
        if self.config.positions == "learned":
            x = x + self.pos_embed(positions + self.config.position_offset)
        return x

    def weight_bytes(self) -> int:
        """Bytes of all weights held (`weight_bytes`), tied tensors counted once."""
        return weight_bytes(self)

    @torch.inference_mode()
    def forward(self, tokens: Tensor, output_hidden_states: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Full-sequence forward without a cache (reference path for tests and evaluation).

        tokens: (N, T). Returns logits (N, T, V) from the last loaded layer, and optionally the hidden
        state after every loaded layer (before the final norm).
        """
        return self.forward_with_grad(tokens, output_hidden_states)

    def forward_with_grad(self, tokens: Tensor, output_hidden_states: bool = False):
        """`forward` outside inference mode, for training adapters of the (frozen) model."""
        tokens = tokens.to(self.device)  # callers may build token ids on the CPU
        n, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(n, t)
        x = self.embed_tokens(tokens, positions)
        rope = self.rope(positions)
        kv = NoCache(causal_masks(self.config, t, t, 0, x.device))
        hidden = []
        for layer in self.layers:
            x = layer(x, rope, kv)
            hidden.append(x)
        logits = self.lm_head(self.norm(x))
        return (logits, hidden) if output_hidden_states else logits


@lru_cache(maxsize=None)
def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype` (via fp32), as transformers rounds Gemma's embedding scale."""
    return torch.tensor(value).to(dtype).item()


def causal_mask(t: int, s: int, start: int, window: int | None, device: torch.device) -> Tensor:
    """Bool (1, 1, t, s) mask for queries at positions start..start+t over keys 0..s."""
    q_pos = torch.arange(start, start + t, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed[None, None]


def per_layer(windows: tuple[int | None, ...], mask: Callable[[int | None], Tensor]) -> tuple[Tensor, ...]:
    """The mask of every layer, given the layers' windows: built once per distinct window."""
    built = {window: mask(window) for window in set(windows)}
    return tuple(built[window] for window in windows)


def causal_masks(config: ModelConfig, t: int, s: int, start: int, device: torch.device) -> tuple[Tensor, ...]:
    """`causal_mask` for every layer of the model."""
    return per_layer(config.layer_windows, lambda window: causal_mask(t, s, start, window, device))


class NoCache:
    """Attend within the given tokens only (full-sequence forward). masks: one per layer."""

    def __init__(self, masks: tuple[Tensor, ...]):
        self.masks = masks

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        pass  # nothing persists between calls

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        return attend(q, k.transpose(1, 2), v.transpose(1, 2), self.masks[layer], scale)
