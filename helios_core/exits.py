"""Exit points, exit heads and confidence measures.

Depths are 1-based: a token that exits at depth d ran through layers 0..d-1. A token may leave at any
configured exit point where its confidence reaches the threshold; at the last loaded layer every
remaining token leaves (greedy exit).

Exit heads turn a hidden state at depth d into logits:
- shared (LayerSkip style): the model's final norm and LM head, for every depth;
- trained (EE-LLM style): per-depth heads from an adapter file, in the format below.

Adapter format (`*.safetensors`, written by `save_exit_heads`):
  metadata: format="helios-exit-heads", version="1", hidden_size, vocab_size, norm ("rms"|"layer")
  tensors per exit depth d (any subset of depths):
    exit.{d}.norm.weight       (D,)     required: the head's own norm
    exit.{d}.norm.bias         (D,)     layer norm only
    exit.{d}.proj.weight       (D, D)   optional residual adapter: h + proj(h) before the norm
    exit.{d}.lm_head.weight    (V, D)   optional; the model's LM head is shared when absent
Depths without a trained head use the shared head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .models.transformer import Transformer, make_norm

ADAPTER_FORMAT = "helios-exit-heads"
MEASURES = ("max_prob", "margin", "cosine")


@dataclass(frozen=True)
class ExitConfig:
    """How tokens may leave early. Defaults: every layer is an exit point, max-softmax confidence."""

    threshold: float = 0.8
    measure: str = "max_prob"  # max_prob | margin | cosine
    exit_layers: tuple[int, ...] | None = None  # depths (1-based); None = every layer
    heads_path: str | None = None  # trained exit heads adapter; None = shared final norm + LM head

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise ValueError(f"unknown confidence measure {self.measure!r}; use one of {', '.join(MEASURES)}")
        if not self.threshold >= 0:
            raise ValueError(f"exit threshold must be >= 0, got {self.threshold}")
        if self.exit_layers is not None:
            object.__setattr__(self, "exit_layers", tuple(sorted(set(int(d) for d in self.exit_layers))))
            if any(d < 1 for d in self.exit_layers):
                raise ValueError(f"exit layers are 1-based depths, got {self.exit_layers}")

    def exit_points(self, num_loaded: int) -> tuple[int, ...]:
        """Depths where a token may leave before the last loaded layer (which always exits)."""
        depths = range(1, num_loaded) if self.exit_layers is None else self.exit_layers
        return tuple(d for d in depths if d < num_loaded)


class ExitHead(nn.Module):
    """A trained head at one depth: optional residual projection, its own norm, optional LM head."""

    def __init__(self, model: Transformer, proj: bool, lm_head: bool):
        super().__init__()
        c = model.config
        self.proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False) if proj else None
        self.norm = make_norm(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False) if lm_head else None

    def forward(self, h: Tensor, shared_lm_head: nn.Linear) -> Tensor:
        if self.proj is not None:
            h = h + self.proj(h)
        return (self.lm_head or shared_lm_head)(self.norm(h))


class ExitHeads(nn.Module):
    """Logits at any depth: a trained head where one exists, else the model's final norm + LM head."""

    def __init__(self, model: Transformer, trained: dict[int, ExitHead] | None = None):
        super().__init__()
        self.model = [model]  # a list, so the model is not registered as a submodule of the heads
        self.trained = nn.ModuleDict({str(d): head for d, head in (trained or {}).items()})

    def logits(self, depth: int, h: Tensor) -> Tensor:
        model = self.model[0]
        head = self.trained[str(depth)] if str(depth) in self.trained else None
        if head is None or depth == model.config.num_layers:
            return model.lm_head(model.norm(h))
        return head(h, model.lm_head)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.trained.parameters())


def load_exit_heads(path: str | Path, model: Transformer) -> ExitHeads:
    """Read an adapter file (format in the module docstring); shapes are checked against the model."""
    c = model.config
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"exit heads must be a .safetensors file, got {path.name}")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"{path} is not a Helios exit-heads file (metadata format={meta.get('format')!r})")
        if int(meta.get("hidden_size", -1)) != c.hidden_size or int(meta.get("vocab_size", -1)) != c.vocab_size:
            raise ValueError(
                f"{path} was trained for hidden_size={meta.get('hidden_size')} vocab_size={meta.get('vocab_size')}, "
                f"the model has {c.hidden_size} and {c.vocab_size}"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    depths = sorted({int(k.split(".")[1]) for k in tensors})
    dtype, device = model.embed.weight.dtype, model.embed.weight.device
    trained = {}
    for d in depths:
        prefix = f"exit.{d}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        head = ExitHead(model, proj="proj.weight" in own, lm_head="lm_head.weight" in own)
        missing, unexpected = head.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: exit head at depth {d}: missing {missing}, unexpected {unexpected}")
        trained[d] = head.to(device=device, dtype=dtype)
    return ExitHeads(model, trained)


def save_exit_heads(path: str | Path, heads: ExitHeads) -> None:
    model = heads.model[0]
    tensors = {
        f"exit.{d}.{name}": p.detach().contiguous().cpu()
        for d, head in heads.trained.items()
        for name, p in head.state_dict().items()
    }
    meta = {
        "format": ADAPTER_FORMAT,
        "version": "1",
        "hidden_size": str(model.config.hidden_size),
        "vocab_size": str(model.config.vocab_size),
        "norm": model.config.norm,
    }
    save_file(tensors, str(path), metadata=meta)


# --- confidence measures ----------------------------------------------------------------------------
def confidence_from_logits(logits: Tensor, measure: str) -> Tensor:
    """(N, V) logits -> (N,) confidence in [0, 1]."""
    probs = torch.softmax(logits.float(), dim=-1)
    if measure == "max_prob":
        return probs.max(dim=-1).values
    top2 = probs.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def cosine_saturation(h: Tensor, previous: Tensor) -> Tensor:
    """Similarity of the hidden state to the one at the previous exit point: near 1 = saturated."""
    return F.cosine_similarity(h.float(), previous.float(), dim=-1).clamp(min=0.0)
