"""Weight-only int8: every block matrix and the LM head stored as int8, one scale per output row.

A decode step at a small batch reads every weight once per token and does little arithmetic with
it, so its time is the bytes it reads: int8 halves them against bf16 (a quarter of fp32). The
activations, norms, embeddings, K/V and logits stay in the model's dtype. Rows are quantized
symmetrically (scale = max |w| / 127), as gpt-fast and torchao's int8 weight-only do.

On the CPU the product runs in torch's int8-weight kernel (`aten._weight_int8pack_mm`), which
converts weights as it streams them. Its fp32 variant is scalar code (20x slower than its bf16 one at
a batch of 8 on an AVX512-BF16 CPU), so an fp32 model keeps its scales in bf16 (`scale_dtype`), its
activations enter the kernel rounded to bf16 and the output is widened back: a rounding of the same
order as the int8 weights' own. Elsewhere the weight is converted to the activations' dtype first
(correct everywhere, without the saving).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

QUANTIZATIONS = ("int8",)  # None: the checkpoint's weights in the model dtype


def check_quantization(quantization: str | None) -> None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {QUANTIZATIONS} or none")


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a model's int8 scales are kept in: its own, but bf16 for an fp32 model, whose products
    run in bf16 on the CPU. The kernel then takes the scale as stored, with no conversion per product
    (inductor's lowering of the kernel cannot take a converted one either)."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


def quantize_rows(weight: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(int8 weight, scale per output row in `dtype`, default the weight's): weight ≈ q * scale[:, None],
    q rounded against the scale as stored."""
    dtype = dtype or weight.dtype
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).to(dtype)
    scale = torch.where(scale == 0, 1, scale)  # an all-zero row (or one below the dtype's range) is q = 0
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    """q * scale[:, None] in fp32."""
    return q.float() * scale.float()[:, None]


def int8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ (q * scale[:, None]).T + bias, for x of any leading shape."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.device.type == "cpu":  # the activations meet the kernel in the scale's dtype (`scale_dtype`)
        out = torch.ops.aten._weight_int8pack_mm(flat.to(scale.dtype), q, scale).to(flat.dtype)
    else:
        out = F.linear(flat, q.to(flat.dtype)) * scale.to(flat.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], q.shape[0])
