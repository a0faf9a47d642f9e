"""Low-rank adapters of a model's block matrices: LayerSkip-style backbone adaptation.

Frozen-backbone exits can only read what a pretrained model happens to compute at shallow depths.
LayerSkip trains the backbone itself with an early-exit loss so that shallow layers predict better;
here the backbone stays frozen and a small low-rank delta per block matrix (W + b @ a) is trained
instead, so the result ships as a file of a few MB next to the exit heads.

Training runs the deltas as forward hooks on the frozen model (`BackboneAdapter.attached`, the
original model is one `disabled()` away for distillation); serving merges them into the weights at
load (`apply_backbone`, and `load_layers` for layers loaded later), so an adapted model decodes
exactly as fast as the original.

Tensors (in the exit-heads file, see `exits.py`), per adapted layer i and matrix NAME in `ADAPTED`:
  backbone.{i}.{NAME}.a   (R, in)    backbone.{i}.{NAME}.b   (out, R)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantize import dequantize_rows, quantize_rows

ADAPTED = ("attn.wqkv", "attn.wo", "mlp.w_in", "mlp.w_out")  # every matrix of a block (Q/K/V and gate/up fused)
PREFIX = "backbone."


class LowRank(nn.Module):
    """x -> b(a(x)); b starts at zero, so an untrained adapter changes nothing."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, linear.in_features) / math.sqrt(linear.in_features))
        self.b = nn.Parameter(torch.zeros(linear.out_features, rank))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.a), self.b)


class BackboneAdapter(nn.Module):
    """Trainable low-rank deltas for the `ADAPTED` matrices of `layers` of `model` (not registered as a submodule)."""

    def __init__(self, model: nn.Module, rank: int, layers: range | list[int]):
        super().__init__()
        if rank < 1:
            raise ValueError(f"backbone adapter rank must be >= 1, got {rank}")
        self.model = [model]
        self.deltas = nn.ModuleDict({
            str(i): nn.ModuleDict({_key(n): LowRank(model.layers[i].get_submodule(n), rank) for n in ADAPTED})
            for i in layers
        })
        self.enabled = True

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Run the model with the deltas added to its matrices' outputs."""
        def hook(delta: LowRank):
            return lambda module, inputs, output: output + delta(inputs[0]) if self.enabled else None

        handles = [self.model[0].layers[int(i)].get_submodule(_name(k)).register_forward_hook(hook(delta))
                   for i, layer in self.deltas.items() for k, delta in layer.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The original model, while attached."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def tensors(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        return {f"{PREFIX}{i}.{_name(k)}.{p}": getattr(delta, p).detach().to(dtype or delta.a.dtype).contiguous().cpu()
                for i, layer in self.deltas.items() for k, delta in layer.items() for p in ("a", "b")}


def _key(name: str) -> str:
    return name.replace(".", "_")  # module names may not contain dots


def _name(key: str) -> str:
    return key.replace("_", ".", 1)


def parse_backbone(tensors: dict[str, Tensor], model: nn.Module, source: str) -> dict[int, dict[str, tuple[Tensor, Tensor]]]:
    """`backbone.*` tensors -> {layer: {matrix: (a, b)}}, checked against the model's shapes."""
    config = model.config
    out: dict[int, dict[str, tuple[Tensor, Tensor]]] = {}
    for key in tensors:
        parts = key[len(PREFIX):].rsplit(".", 1)
        layer, _, name = parts[0].partition(".")
        if len(parts) != 2 or parts[1] not in ("a", "b") or not layer.isdigit() or name not in ADAPTED \
                or not 0 <= int(layer) < config.num_layers:
            raise ValueError(f"{source}: tensor {key!r} is not {PREFIX}{{layer}}.<matrix>.a|b with a layer in "
                             f"0..{config.num_layers - 1} and a matrix among {', '.join(ADAPTED)}")
        out.setdefault(int(layer), {})[name] = None
    with torch.device("meta"):
        shapes = {n: tuple(_block(config).get_submodule(n).weight.shape) for n in ADAPTED}
    for i, layer in out.items():
        for name in layer:
            a, b = tensors.get(f"{PREFIX}{i}.{name}.a"), tensors.get(f"{PREFIX}{i}.{name}.b")
            out_features, in_features = shapes[name]
            if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] \
                    or a.shape[1] != in_features or b.shape[0] != out_features:
                raise ValueError(f"{source}: backbone adapter of layer {i} {name}: a {_shape(a)} and b {_shape(b)} "
                                 f"do not make a low-rank delta of the model's ({out_features}, {in_features}) matrix")
            layer[name] = (a, b)
    return out


def _shape(t: Tensor | None) -> str:
    return "missing" if t is None else str(tuple(t.shape))


def _block(config) -> nn.Module:
    from .transformer import Block

    return Block(config, 0)


def apply_backbone(model: nn.Module, adapter: dict[int, dict[str, tuple[Tensor, Tensor]]]) -> None:
    """Merge a parsed adapter into the loaded layers and keep it for layers loaded later (`load_layers`)."""
    if model.backbone_adapter:
        raise ValueError("this model already has a backbone adapter merged into its weights")
    model.backbone_adapter = adapter
    for block in model.layers:
        merge(block, adapter.get(block.index, {}))


@torch.no_grad()
def merge(block: nn.Module, deltas: dict[str, tuple[Tensor, Tensor]]) -> None:
    """W + b @ a, computed in fp32 and rounded once to the weight's dtype; a new tensor, so storage the
    checkpoint reader may share is never written. An int8 weight (models/quantize.py) is merged in
    fp32 and quantized again."""
    for name, (a, b) in deltas.items():
        linear = block.get_submodule(name)
        weight = linear.weight
        delta = b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
        if getattr(linear, "scale", None) is None:
            weight.data = (weight.float() + delta).to(weight.dtype)
        else:
            weight.data, linear.scale = quantize_rows(dequantize_rows(weight, linear.scale) + delta, linear.scale.dtype)
