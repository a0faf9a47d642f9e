"""Read Hugging Face safetensors checkpoints into our `Transformer`, one layer at a time.

Only the tensors that are asked for are read (safetensors memory-maps the file and copies just those
byte ranges), so loading layers [0, K) never touches the bytes of layers K and above. Pickled
checkpoints (`*.bin`, `*.pt`) are refused: unpickling runs arbitrary code.

Each family has a key table from our parameter names to the checkpoint's names. A parameter built
from several tensors (fused Q/K/V, fused gate/up) lists them in order and they are concatenated.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from .config import ModelConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAPPABLE = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # safetensors dtype names
# Prefixes that different exports put before the same names ("model.layers.0..." vs "layers.0...").
_PREFIXES = ("model.decoder.", "model.", "decoder.", "transformer.", "")


class CheckpointError(ValueError):
    """The model directory is missing files or tensors, or holds a format we refuse to load."""

ADAPTER_FORMAT = "helios-exit-heads"  # metadata "format" of exit-head adapters (helios_core/exits.py)


class Checkpoint:
    """Index of the tensors in a directory of `*.safetensors` files (single file or sharded)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"model path {str(path)!r} is not a directory")
        self.bytes_read = 0
        self._file_of = self._index()
        self._handles: dict[Path, object] = {}

    def _index(self) -> dict[str, Path]:
        index_file = self.path / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{self.path} holds only pickled weights ({', '.join(pickles)}); Helios loads safetensors "
                    "only because unpickling can run arbitrary code. Convert the checkpoint to safetensors."
                )
            raise CheckpointError(f"no *.safetensors weights in {self.path}")
        file_of = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                if (f.metadata() or {}).get("format") == ADAPTER_FORMAT:
                    continue  # exit heads or probes shipped beside the weights are not weights
                file_of.update({name: file for name in f.keys()})
        return file_of

    def resolve(self, name: str) -> str | None:
        """Full checkpoint key for a prefix-free name, or None if absent."""
        for prefix in _PREFIXES:
            if prefix + name in self._file_of:
                return prefix + name
        return None

    def read(self, name: str) -> Tensor:
        key = self.resolve(name)
        if key is None:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {name!r}")
        file = self._file_of[key]
        if not file.is_file():
            raise CheckpointError(f"checkpoint shard {file.name} listed in the index is missing from {self.path}")
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        tensor = self._handles[file].get_tensor(key)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def mapped(self, name: str) -> Tensor | None:
        """Tensor `name` as a view of its file, memory-mapped copy-on-write: its pages are the page
        cache's, read as they are touched and shared with every process that maps the file, not this
        process's memory. None where the file's layout does not allow a view (an offset not a multiple
        of the element size, a dtype other than fp32/bf16/fp16)."""
        key = self.resolve(name)
        if key is None:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {name!r}")
        file = self._file_of[key]
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            entry = json.loads(f.read(header_len))[key]
        dtype = _MAPPABLE.get(entry["dtype"])
        start, end = (8 + header_len + offset for offset in entry["data_offsets"])
        size = file.stat().st_size
        if dtype is None or start % dtype.itemsize or not start <= end <= size:
            return None
        shape = tuple(entry["shape"])
        if (end - start) != dtype.itemsize * (torch.Size(shape).numel()):
            raise CheckpointError(f"{file.name}: tensor {key!r} has {end - start} bytes for shape {shape}")
        storage = torch.UntypedStorage.from_file(str(file), shared=False, nbytes=size)  # mapped, not read
        return torch.empty(0, dtype=dtype).set_(storage, start // dtype.itemsize, shape)


# --- key tables: our parameter name -> (checkpoint names to concatenate, transpose?) -----------------
Sources = tuple[tuple[str, ...], bool]


def _norm(ours: str, theirs: str, config: ModelConfig) -> dict[str, Sources]:
    table = {f"{ours}.weight": ((f"{theirs}.weight",), False)}
    if config.norm == "layer":
        table[f"{ours}.bias"] = ((f"{theirs}.bias",), False)
    return table


def _linear(ours: str, theirs: list[str], bias: bool, transpose: bool = False) -> dict[str, Sources]:
    table = {f"{ours}.weight": (tuple(f"{t}.weight" for t in theirs), transpose)}
    if bias:
        table[f"{ours}.bias"] = (tuple(f"{t}.bias" for t in theirs), False)
    return table


def layer_sources(config: ModelConfig, i: int) -> dict[str, Sources]:
    """Our names (relative to `layers.{i}`) for one block."""
    c = config
    if c.model_type == "gpt2":
        p = f"h.{i}."
        # GPT-2 stores Conv1D weights as (in, out): transpose to nn.Linear's (out, in).
        return {
            **_norm("attn_norm", p + "ln_1", c),
            **_linear("attn.wqkv", [p + "attn.c_attn"], True, transpose=True),
            **_linear("attn.wo", [p + "attn.c_proj"], True, transpose=True),
            **_norm("mlp_norm", p + "ln_2", c),
            **_linear("mlp.w_in", [p + "mlp.c_fc"], True, transpose=True),
            **_linear("mlp.w_out", [p + "mlp.c_proj"], True, transpose=True),
        }
    p = f"layers.{i}."
    if c.model_type == "opt":
        a = p + "self_attn."
        return {
            **_norm("attn_norm", p + "self_attn_layer_norm", c),
            **_linear("attn.wqkv", [a + "q_proj", a + "k_proj", a + "v_proj"], c.qkv_bias),
            **_linear("attn.wo", [a + "out_proj"], c.out_bias),
            **_norm("mlp_norm", p + "final_layer_norm", c),
            **_linear("mlp.w_in", [p + "fc1"], c.mlp_bias),
            **_linear("mlp.w_out", [p + "fc2"], c.mlp_bias),
        }
    a, m = p + "self_attn.", p + "mlp."
    table = {
        **_norm("attn_norm", p + "input_layernorm", c),
        **_linear("attn.wqkv", [a + "q_proj", a + "k_proj", a + "v_proj"], c.qkv_bias),
        **_linear("attn.wo", [a + "o_proj"], c.out_bias),
        **_linear("mlp.w_in", [m + "gate_proj", m + "up_proj"], c.mlp_bias),
        **_linear("mlp.w_out", [m + "down_proj"], c.mlp_bias),
    }
    if c.qk_norm:
        table.update(_norm("attn.q_norm", a + "q_norm", c))
        table.update(_norm("attn.k_norm", a + "k_norm", c))
    if c.sandwich_norms:  # Gemma: post_attention_layernorm normalises the attention output, not the MLP input
        table.update(_norm("post_attn_norm", p + "post_attention_layernorm", c))
        table.update(_norm("mlp_norm", p + "pre_feedforward_layernorm", c))
        table.update(_norm("post_mlp_norm", p + "post_feedforward_layernorm", c))
    else:
        table.update(_norm("mlp_norm", p + "post_attention_layernorm", c))
    return table


def global_sources(config: ModelConfig, has_lm_head: bool) -> dict[str, Sources]:
    """Embeddings, final norm and LM head (always loaded: every exit uses them)."""
    c = config
    if c.model_type == "gpt2":
        table = {"embed.weight": (("wte.weight",), False), "pos_embed.weight": (("wpe.weight",), False)}
        table.update(_norm("norm", "ln_f", c))
    else:
        table = {"embed.weight": (("embed_tokens.weight",), False)}
        if c.model_type == "opt":
            table["pos_embed.weight"] = (("embed_positions.weight",), False)
            table.update(_norm("norm", "final_layer_norm", c))
        else:
            table.update(_norm("norm", "norm", c))
    if has_lm_head:
        table["lm_head.weight"] = (("lm_head.weight",), False)
    return table


def read_params(
    ckpt: Checkpoint, sources: dict[str, Sources], prefix: str, dtype: torch.dtype, device: torch.device
) -> dict[str, Tensor]:
    params = {}
    for ours, (names, transpose) in sources.items():
        parts = [ckpt.read(name) for name in names]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if transpose:
            tensor = tensor.t()
        params[prefix + ours] = tensor.to(device=device, dtype=dtype).contiguous()
    return params
