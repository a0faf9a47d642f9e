"""Weight-only int8: every block matrix and the LM head stored as int8, one scale per output row.

A decode step at a small batch reads every weight once per token and does little arithmetic with
it, so its time is the bytes it reads: int8 halves them against bf16 (a quarter of fp32). The
activations, norms, embeddings, K/V and logits stay in the model's dtype. Rows are quantized
symmetrically (scale = max |w| / 127), as gpt-fast and torchao's int8 weight-only do.

On the CPU the product runs in torch's int8-weight kernel (`aten._weight_int8pack_mm`), which
converts weights as it streams them. Its fp32 variant is scalar code (20x slower than its bf16 one at
a batch of 8 on an AVX512-BF16 CPU), so fp32 activations enter it rounded to bf16 and its output is
widened back: a rounding of the same order as the int8 weights' own. Elsewhere the weight is
converted to the activations' dtype first (correct everywhere, without the saving).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

QUANTIZATIONS = ("int8",)  # None: the checkpoint's weights in the model dtype


def check_quantization(quantization: str | None) -> None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {QUANTIZATIONS} or none")


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 weight, scale per output row in the weight's dtype): weight ≈ q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(weight.dtype)


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.to(scale.dtype) * scale[:, None]


@torch.library.custom_op("helios::int8_mm", mutates_args=())
def _int8_mm(act: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """The CPU kernel as an opaque op for torch.compile: inductor's own lowering of it rejects an input
    that is a fused elementwise result (torch 2.13)."""
    return torch.ops.aten._weight_int8pack_mm(act, q, scale)


@_int8_mm.register_fake
def _(act: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    return act.new_empty(act.shape[0], q.shape[0])


def int8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ (q * scale[:, None]).T + bias, for x of any leading shape."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.device.type == "cpu":
        act = flat if flat.dtype in (torch.bfloat16, torch.float16) else flat.to(torch.bfloat16)
        mm = _int8_mm if torch.compiler.is_compiling() else torch.ops.aten._weight_int8pack_mm  # eager: no wrapper
        out = mm(act, q, scale.to(act.dtype)).to(flat.dtype)
    else:
        out = F.linear(flat, q.to(flat.dtype)) * scale.to(flat.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], q.shape[0])
