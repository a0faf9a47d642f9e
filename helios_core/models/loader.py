"""Build a `Transformer` from a Hugging Face directory with only layers [0, K) in memory.

Modules are created on the meta device (no memory) and then receive the checkpoint's tensors, so a
partially loaded model never allocates or reads the layers it does not hold.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..dtypes import resolve_dtype
from .checkpoint import Checkpoint, CheckpointError, global_sources, layer_sources, read_params
from .config import ModelConfig
from .low_rank import merge
from .quantize import check_quantization
from .transformer import (Block, MappedEmbedding, Transformer, pack_linears, packs_weights, quantize_lm_head,
                          quantize_linears)

def load_model(
    path: str | Path,
    num_layers: int | None = None,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_len: int | None = None,
    quantization: str | None = None,
) -> Transformer:
    """Load embeddings, final norm, LM head and the first `num_layers` blocks (all when None).

    `max_len` bounds the positions the model will see (RoPE tables are built for it); `dtype` may be
    "auto" (helios_core.dtypes), resolved for `device`. `quantization` "int8": the blocks' matrices
    and the LM head are stored as int8 as they load (models/quantize.py); a tied embedding is then read
    from the int8 LM head.
    """
    check_quantization(quantization)
    config = ModelConfig.from_pretrained(path)
    checkpoint = Checkpoint(path)
    num_layers = config.num_layers if num_layers is None else num_layers
    _check_depth(config, num_layers)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    has_lm_head = checkpoint.resolve("lm_head.weight") is not None
    if not has_lm_head and not config.tie_embeddings:
        raise CheckpointError(f"{path}: untied model without lm_head.weight")

    with torch.device("meta"):
        model = Transformer(config, num_layers=0)
    tie = config.tie_embeddings or not has_lm_head
    params = read_params(checkpoint, global_sources(config, has_lm_head and not tie), "", dtype, device)
    _assign(model, params, skip=("lm_head.weight",) if tie else ())
    if tie:
        model.lm_head.weight = model.embed.weight
    model.quantization = quantization
    model.packed = False  # `pack_weights`
    if quantization:
        quantize_lm_head(model, tie)
    model.checkpoint = checkpoint
    model.backbone_adapter = {}  # low-rank deltas merged into every layer loaded (low_rank.apply_backbone)
    model.setup_rope(max_len or min(config.max_position_embeddings, 4096))
    load_layers(model, num_layers)
    return model


def load_layers(model: Transformer, num_layers: int) -> int:
    """Grow the loaded prefix to `num_layers` blocks, reading only the new layers' tensors.

    Returns the bytes read from disk for them.
    """
    _check_depth(model.config, num_layers)
    checkpoint: Checkpoint = model.checkpoint
    before = checkpoint.bytes_read
    dtype, device = model.dtype, model.device
    blocks = []  # attached only once all are read, so a failed read leaves the model as it was
    for i in range(model.num_loaded_layers, num_layers):
        with torch.device("meta"):
            block = Block(model.config, i)
        _assign(block, read_params(checkpoint, layer_sources(model.config, i), "", dtype, device))
        merge(block, model.backbone_adapter.get(i, {}))
        if model.quantization:
            quantize_linears(block)
        if model.packed:
            pack_linears(block)
        blocks.append(block)
    model.layers.extend(blocks)
    return checkpoint.bytes_read - before


def pack_weights(model: Transformer) -> None:
    """Hold the full-precision matrices of the loaded blocks, of blocks loaded later and of the LM head
    in oneDNN's layout where that is faster (`Linear.pack`): the same bytes. Inference only; call it
    once any backbone adapter is merged. A tied LM head's table is the embedding's too, and a packed
    tensor cannot be indexed: the embedding is then read from the checkpoint's mapped file
    (`MappedEmbedding`), so packing the head costs no memory. Where the file cannot be mapped, the
    head stays plain (`pack_linears`)."""
    if not packs_weights(model.dtype, model.device):
        return
    model.packed = True
    table = getattr(model.embed, "weight", None)  # int8: no table (the embedding reads the int8 head)
    if table is not None and model.lm_head.weight is table:
        (name,), _ = global_sources(model.config, has_lm_head=False)["embed.weight"]
        mapped = model.checkpoint.mapped(name)
        if mapped is not None and mapped.shape == table.shape:
            model.embed = MappedEmbedding(mapped, model.dtype)
            table = None
    pack_linears(model, skip=table)


def unload_layers(model: Transformer, num_layers: int) -> None:
    """Keep only blocks [0, num_layers); the dropped blocks' memory is released."""
    _check_depth(model.config, num_layers)
    del model.layers[num_layers:]


def _check_depth(config: ModelConfig, num_layers: int) -> None:
    if not 1 <= num_layers <= config.num_layers:
        raise ValueError(f"num_layers must be in [1, {config.num_layers}] for this model, got {num_layers}")


def _assign(module: torch.nn.Module, params: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    expected = {name: p.shape for name, p in module.named_parameters() if name not in skip}
    for name, shape in expected.items():
        if name not in params:
            raise CheckpointError(f"checkpoint has no tensor for parameter {name}")
        if params[name].shape != shape:
            raise CheckpointError(
                f"tensor for {name} has shape {tuple(params[name].shape)}, the config implies {tuple(shape)}"
            )
    module.load_state_dict({k: v for k, v in params.items() if k in expected}, strict=False, assign=True)
