"""Exit points, exit heads and confidence measures.

Depths are 1-based: a token that exits at depth d ran through layers 0..d-1. A token may leave at any
configured exit point where its confidence reaches the threshold; at the last loaded layer every
remaining token leaves (greedy exit).

Exit heads turn a hidden state at depth d into logits:
- shared (LayerSkip style): the model's final norm and LM head, for every depth;
- trained (EE-LLM style): per-depth heads from an adapter file, in the format below.

Exit probes (CALM's early-exit classifier) decide whether to leave without the LM head: at depth d,
sigmoid(probe(final_norm(h))) estimates the probability that the exit's top-1 token equals the full
model's. The `probe` measure computes logits only for the rows that leave, so a check costs a norm
and a dot product per row instead of the LM head and a softmax over the vocabulary. A probe can
also *gate* max_prob or margin (`probe_gate`): only the rows whose probe reaches the gate pay for
the LM head, and the logit measure still makes the decision, so a gate only ever delays an exit.

Adapter format (`*.safetensors`, written by `save_exit_heads`):
  metadata: format="helios-exit-heads", version="3", hidden_size, vocab_size, norm ("rms"|"gemma_rms"|"layer")
  tensors per exit depth d (any subset of depths):
    exit.{d}.norm.weight       (D,)     the head's own norm; required when the depth has a trained head
    exit.{d}.norm.bias         (D,)     layer norm only
    exit.{d}.proj.weight       (D, D)   optional residual adapter: h + proj(h) before the norm
    exit.{d}.down.weight       (R, D)   optional low-rank residual adapter (version 3): h + up(down(h))
    exit.{d}.up.weight         (D, R)   with down.weight
    exit.{d}.lm_head.weight    (V, D)   optional; the model's LM head is shared when absent
    exit.{d}.probe.weight      (1, D)   optional exit probe (version 2), on the model's final norm of h
    exit.{d}.probe.bias        (1,)     with probe.weight
  optional (version 4): a low-rank adapter of the backbone the heads were trained with (LayerSkip
  variant), `backbone.{layer}.{matrix}.a|b` (see `models/low_rank.py`); loading the file merges it
  into the model's weights, so such heads always run on the backbone they were trained for.
Depths without a trained head use the shared head; a file may hold probes only. Older versions
load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .models.checkpoint import ADAPTER_FORMAT
from .models.low_rank import PREFIX as BACKBONE, apply_backbone, parse_backbone
from .models.transformer import Linear, Transformer, make_norm

ADAPTER_VERSIONS = ("1", "2", "3", "4")  # 2 added exit probes, 3 low-rank heads, 4 a backbone adapter
MEASURES = ("max_prob", "margin", "cosine", "probe")
LOGIT_FREE = ("cosine", "probe")  # measures that decide without the LM head


@dataclass(frozen=True)
class ExitConfig:
    """How tokens may leave early. Defaults: every layer is an exit point, max-softmax confidence."""

    threshold: float = 0.8
    measure: str = "max_prob"  # max_prob | margin | cosine | probe (needs probes in heads_path)
    exit_layers: tuple[int, ...] | None = None  # depths (1-based); None = every layer
    heads_path: str | None = None  # trained exit heads adapter; None = shared final norm + LM head
    probe_gate: float | None = None  # max_prob/margin: the LM head only for rows whose probe reaches this

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise ValueError(f"unknown confidence measure {self.measure!r}; use one of {', '.join(MEASURES)}")
        if not self.threshold >= 0:
            raise ValueError(f"exit threshold must be >= 0, got {self.threshold}")
        if self.probe_gate is not None:
            if not 0 <= self.probe_gate <= 1:
                raise ValueError(f"probe_gate is a probability in [0, 1], got {self.probe_gate}")
            if self.measure in LOGIT_FREE:
                raise ValueError(f"probe_gate saves LM-head checks of max_prob or margin; {self.measure!r} has none")
        if self.exit_layers is not None:
            object.__setattr__(self, "exit_layers", tuple(sorted(set(int(d) for d in self.exit_layers))))
            if any(d < 1 for d in self.exit_layers):
                raise ValueError(f"exit layers are 1-based depths, got {self.exit_layers}")

    def exit_points(self, num_loaded: int) -> tuple[int, ...]:
        """Depths where a token may leave before the last loaded layer (which always exits)."""
        depths = range(1, num_loaded) if self.exit_layers is None else self.exit_layers
        return tuple(d for d in depths if d < num_loaded)


class ExitHead(nn.Module):
    """A trained head at one depth: optional residual adapter (full-rank `proj`, or low-rank `down` and
    `up` of rank `rank`), its own norm, optional LM head."""

    def __init__(self, model: Transformer, proj: bool, lm_head: bool, rank: int | None = None):
        super().__init__()
        c = model.config
        if proj and rank:
            raise ValueError("an exit head's adapter is full-rank (proj) or low-rank (rank), not both")
        self.proj = Linear(c.hidden_size, c.hidden_size, bias=False) if proj else None
        self.down = Linear(c.hidden_size, rank, bias=False) if rank else None
        self.up = Linear(rank, c.hidden_size, bias=False) if rank else None
        self.norm = make_norm(c)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False) if lm_head else None

    def features(self, h: Tensor) -> Tensor:
        """What the LM head reads: the normed (and adapted) hidden state."""
        if self.proj is not None:
            h = h + self.proj(h)
        elif self.down is not None:
            h = h + self.up(self.down(h))
        return self.norm(h)

    def forward(self, h: Tensor, shared_lm_head: nn.Linear) -> Tensor:
        return (self.lm_head or shared_lm_head)(self.features(h))


def make_probe(model: Transformer) -> nn.Linear:
    return nn.Linear(model.config.hidden_size, 1)


class ExitHeads(nn.Module):
    """Logits at any depth: a trained head where one exists, else the model's final norm + LM head.
    Also the exit probes, where trained, and the backbone adapter's tensors (merged into the model)."""

    def __init__(self, model: Transformer, trained: dict[int, ExitHead] | None = None,
                 probes: dict[int, nn.Linear] | None = None, backbone: dict[str, Tensor] | None = None):
        super().__init__()
        self.model = [model]  # a list, so the model is not registered as a submodule of the heads
        self.trained = nn.ModuleDict({str(d): head for d, head in (trained or {}).items()})
        self.probes = nn.ModuleDict({str(d): probe for d, probe in (probes or {}).items()})
        self.backbone = backbone or {}  # kept to be saved again with new probes; not parameters

    def probe_depths(self) -> tuple[int, ...]:
        return tuple(sorted(int(d) for d in self.probes))

    def probe_logit(self, depth: int, h: Tensor) -> Tensor:
        """(N, D) hidden state -> (N,) probe logit. The final norm makes the features scale-free across depths."""
        model = self.model[0]
        return self.probes[str(depth)](model.norm(h).float())[..., 0]  # probes stay fp32: tiny, and decide exits

    def _head(self, depth: int) -> ExitHead | None:
        if depth == self.model[0].config.num_layers:
            return None  # the model's own last layer always uses the model's own head
        return self.trained[str(depth)] if str(depth) in self.trained else None

    def logits(self, depth: int, h: Tensor) -> Tensor:
        model, head = self.model[0], self._head(depth)
        return model.lm_head(model.norm(h)) if head is None else head(h, model.lm_head)

    def features(self, depth: int, h: Tensor) -> tuple[Tensor, Linear]:
        """(features, LM head) at `depth`: logits = lm_head(features). Lets the engine defer the LM head
        of leaving rows, and training score a few candidate tokens (lm_head.weight) per position."""
        model, head = self.model[0], self._head(depth)
        if head is None:
            return model.norm(h), model.lm_head
        return head.features(h), head.lm_head or model.lm_head

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


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
        if meta.get("version") not in ADAPTER_VERSIONS:
            raise ValueError(f"{path}: exit-heads version {meta.get('version')!r} is not supported "
                             f"(this Helios reads {', '.join(ADAPTER_VERSIONS)})")
        if int(meta.get("hidden_size", -1)) != c.hidden_size or int(meta.get("vocab_size", -1)) != c.vocab_size:
            raise ValueError(
                f"{path} was trained for hidden_size={meta.get('hidden_size')} vocab_size={meta.get('vocab_size')}, "
                f"the model has {c.hidden_size} and {c.vocab_size}"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    backbone = {k: tensors.pop(k) for k in list(tensors) if k.startswith(BACKBONE)}
    if backbone:
        apply_backbone(model, parse_backbone(backbone, model, str(path)))
    depths = sorted({_depth(path, k, c.num_layers) for k in tensors})
    dtype, device = model.dtype, model.device
    trained, probes = {}, {}
    for d in depths:
        prefix = f"exit.{d}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        probe = {k[len("probe.") :]: own.pop(k) for k in list(own) if k.startswith("probe.")}
        if probe:
            probes[d] = _load_module(path, f"exit probe at depth {d}", make_probe(model), probe).to(device)
        if own:
            rank = own["down.weight"].shape[0] if "down.weight" in own else None
            head = ExitHead(model, proj="proj.weight" in own, lm_head="lm_head.weight" in own, rank=rank)
            trained[d] = _load_module(path, f"exit head at depth {d}", head, own).to(device=device, dtype=dtype)
    return ExitHeads(model, trained, probes, backbone)


def _depth(path: Path, key: str, num_layers: int) -> int:
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "exit" or not parts[1].isdigit() or not 1 <= int(parts[1]) < num_layers:
        raise ValueError(f"{path}: tensor {key!r} is not exit.{{depth}}.<name> with depth in 1..{num_layers - 1}")
    return int(parts[1])


def _load_module(path: Path, what: str, module: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """load_state_dict with the file and depth in the error, shapes included."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: {what}: missing {missing}, unexpected {unexpected}")
    wrong = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if v.shape != expected[k].shape}
    if wrong:
        raise ValueError(f"{path}: {what}: wrong shapes (file, model) {wrong}")
    module.load_state_dict(state)
    return module


def save_exit_heads(path: str | Path, heads: ExitHeads, dtype: torch.dtype | None = None) -> None:
    """dtype: store the trained heads and the backbone adapter in it (e.g. bfloat16 to halve the file);
    probes stay fp32."""
    model = heads.model[0]
    tensors = {
        f"exit.{d}.{prefix}{name}": p.detach().to(dtype if dtype and prefix == "" else p.dtype).contiguous().cpu()
        for prefix, modules in (("", heads.trained), ("probe.", heads.probes))
        for d, module in modules.items()
        for name, p in module.state_dict().items()
    } | {k: v.to(dtype or v.dtype).contiguous().cpu() for k, v in heads.backbone.items()}
    meta = {
        "format": ADAPTER_FORMAT,
        "version": "4" if heads.backbone else "3",  # readable by older Helios where it can be
        "hidden_size": str(model.config.hidden_size),
        "vocab_size": str(model.config.vocab_size),
        "norm": model.config.norm,
    }
    save_file(tensors, str(path), metadata=meta)


# --- confidence measures ----------------------------------------------------------------------------
def check_probes(heads: ExitHeads, exit_config: ExitConfig) -> None:
    """The probe measure and a probe gate need a probe at every exit point the model can have."""
    require_probes(exit_config, heads.model[0].config.num_layers, heads.probe_depths())


def stored_probe_depths(path: str | Path) -> tuple[int, ...]:
    """The depths an exit-heads file holds probes for, read from its keys (nothing is loaded)."""
    with safe_open(str(path), "pt") as f:
        keys = [k for k in f.keys() if k.startswith("exit.") and k.endswith(".probe.weight")]
    return tuple(sorted(int(k.split(".")[1]) for k in keys))


def require_probes(exit_config: ExitConfig, num_layers: int, probe_depths: tuple[int, ...]) -> None:
    """`check_probes` given the depths that have a probe."""
    if exit_config.measure != "probe" and exit_config.probe_gate is None:
        return
    missing = sorted(set(exit_config.exit_points(num_layers)) - set(probe_depths))
    if missing:
        what = "confidence measure 'probe'" if exit_config.measure == "probe" else "probe_gate"
        where = f"the exit heads file {exit_config.heads_path}" if exit_config.heads_path else "no exit heads file"
        raise ValueError(f"{what} needs an exit probe at every exit point; {where} has none at "
                         f"depth(s) {missing} (train them with `helios train-exits --probes`)")


def exit_check(heads: ExitHeads, exit_config: ExitConfig, depth: int, h: Tensor, previous: Tensor,
               thresholds: Tensor, with_logits: bool = True) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """The rows of h (N, D) that leave at exit point `depth`: (their indices in h, their confidence,
    their fp32 logits), or None. thresholds (N,): inf for a row that may not leave.

    Logits are computed for as few rows as the measure allows: the probe gate's candidates for
    max_prob and margin, the leaving rows only for the logit-free measures; with `with_logits=False`
    a logit-free measure computes none (None in their place: the caller runs the LM head later)."""
    measure, gate = exit_config.measure, exit_config.probe_gate
    candidates = None
    if gate is not None:
        keep = torch.sigmoid(heads.probe_logit(depth, h)) >= gate
        if not bool(keep.any()):
            return None
        candidates = keep.nonzero()[:, 0]
        h, previous, thresholds = h[candidates], previous[candidates], thresholds[candidates]
    logits = None if measure in LOGIT_FREE else heads.logits(depth, h)
    conf = exit_confidence(heads, measure, depth, h, previous, logits)
    leave = conf >= thresholds
    if not bool(leave.any()):
        return None
    rows = leave.nonzero()[:, 0]
    if logits is not None:
        logits = logits[rows].float()
    elif with_logits:
        logits = heads.logits(depth, h[rows]).float()
    return (rows if candidates is None else candidates[rows]), conf[rows], logits


def exit_confidence(heads: ExitHeads, measure: str, depth: int, h: Tensor, previous: Tensor | None,
                    logits: Tensor | None = None, logprobs: Tensor | None = None) -> Tensor:
    """(N, D) hidden states at `depth` -> (N,) confidence in [0, 1].

    logits: the depth's exit logits, or logprobs: their log-softmax where the caller has it (one pass
    over the vocabulary saved), needed by max_prob and margin (and by probe where a forced exit lands
    on a depth without a probe: its max probability stands in). previous: the hidden state at the
    previous exit point (cosine). With the probe measure the model's own last layer has confidence 1:
    its token is the full model's by definition.
    """
    if measure == "cosine":
        return cosine_saturation(h, previous)
    if measure == "probe":
        if depth == heads.model[0].config.num_layers:
            return torch.ones(h.shape[0], device=h.device)
        if str(depth) in heads.probes:
            return torch.sigmoid(heads.probe_logit(depth, h))
        measure = "max_prob"
    if logprobs is None:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
    return confidence_from_logprobs(logprobs, measure)


def confidence_from_logprobs(logprobs: Tensor, measure: str) -> Tensor:
    """(N, V) fp32 log-softmax -> (N,) confidence in [0, 1]."""
    if measure == "max_prob":
        return logprobs.amax(dim=-1).exp()  # amax: max() also computes indices, 10x slower here
    top2 = logprobs.topk(2, dim=-1).values.exp()
    return top2[:, 0] - top2[:, 1]


def cosine_saturation(h: Tensor, previous: Tensor) -> Tensor:
    """Similarity of the hidden state to the one at the previous exit point: near 1 = saturated."""
    return F.cosine_similarity(h.float(), previous.float(), dim=-1).clamp(min=0.0)
