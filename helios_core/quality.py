"""Teacher-forced exit analysis on text: the numbers model cards and benchmarks quote.

Text is cut into chunks (256 tokens by default) and each chunk is read in two passes:

- the *full pass* runs every layer for every token and decodes each depth d with its exit head:
  perplexity, top-1 accuracy against the text, top-1 agreement with the final layer and mean
  confidence, per depth. It also measures the HELIOS forced-exit observation: among tokens whose
  confidence at depth d is low, how often depth d's top-1 already equals the final layer's;
- the *exit pass* (`simulate_exits`) makes the engine's exit decision at a threshold: a token leaves at
  the first exit point where its confidence reaches the threshold, else at the last loaded layer
  (forced when that is shallower than the model). Exited tokens keep their exit hidden state, and
  deeper layers see K/V computed from it, exactly as the engine's decode step does (docs/engine.md),
  so the result is the exit depth each token would get if the engine decoded this text token by token.

`TokenTable` keeps the per-token results, so two models sharing a tokenizer can be compared token
by token (`cross_tab`): HELIOS observes that tokens that do not exit early on one model often do on
another. Models with different tokenizers are compared where both predict a token starting at the same
character (`aligned_positions`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .exits import LOGIT_FREE, ExitConfig, ExitHeads, check_probes, exit_check, exit_confidence
from .models.transformer import NoCache, Transformer, causal_masks


# --- the engine's exit decision, teacher-forced ---------------------------------------------------
@dataclass
class ExitTrace:
    """Per position of (N, T) tokens; positions before `start` ran every loaded layer and did not exit."""

    depth: Tensor  # (N, T) int64: exit depth, 1-based; 0 before start
    confidence: Tensor  # (N, T) fp32: confidence at the exit depth
    forced: Tensor  # (N, T) bool: left at the last loaded layer of a partially loaded model
    logits: Tensor  # (N, T, V) fp32: the logits each position exited with (predicting the next token)


@torch.inference_mode()
def simulate_exits(
    model: Transformer,
    heads: ExitHeads,
    tokens: Tensor,
    exit_config: ExitConfig,
    loaded_layers: int | None = None,
    start: int = 0,
) -> ExitTrace:
    """Exit decisions of positions >= start, as the engine makes them decoding `tokens` one at a time.

    Positions before `start` are the prompt (prefilled through every loaded layer). Runs layer by layer
    over all positions at once: a position that exited stops updating, so the next layers compute its
    K/V from its frozen exit state, which is what the engine's decode step writes to the cache.
    """
    n, t = tokens.shape
    k = loaded_layers or model.num_loaded_layers
    if not 1 <= k <= model.num_loaded_layers:
        raise ValueError(f"loaded_layers must be in [1, {model.num_loaded_layers}], got {k}")
    device = model.device
    tokens = tokens.to(device)
    positions = torch.arange(t, device=device).expand(n, t)
    x = model.embed_tokens(tokens, positions)
    rope = model.rope(positions)
    kv = NoCache(causal_masks(model.config, t, t, 0, device))
    may_exit = positions >= start
    exited = torch.zeros(n, t, dtype=torch.bool, device=device)
    trace = ExitTrace(
        depth=torch.where(may_exit, k, 0),
        confidence=torch.zeros(n, t, device=device),
        forced=torch.zeros(n, t, dtype=torch.bool, device=device),
        logits=torch.zeros(n, t, model.config.vocab_size, device=device),
    )
    points = set(exit_config.exit_points(k))
    measure, threshold = exit_config.measure, exit_config.threshold
    previous = x  # hidden state at the previous exit point (cosine measure)
    for layer in model.layers[:k]:
        depth = layer.index + 1
        x = torch.where(exited[..., None], x, layer(x, rope, kv))
        if depth not in points:
            continue
        rows = (may_exit & ~exited).nonzero(as_tuple=True)
        h = x[rows]
        found = exit_check(heads, exit_config, depth, h, previous[rows], torch.full((h.shape[0],), threshold, device=device))
        previous = x
        if found is None:
            continue
        sel, conf, logits = found
        left = tuple(i[sel] for i in rows)
        trace.depth[left] = depth
        trace.confidence[left] = conf
        trace.logits[left] = logits
        exited[left] = True
    rest = (may_exit & ~exited).nonzero(as_tuple=True)  # greedy exit at the last loaded layer
    h = x[rest]
    logits = heads.logits(k, h)
    trace.logits[rest] = logits.float()
    trace.confidence[rest] = exit_confidence(heads, measure, k, h, previous[rest], logits)
    trace.forced[rest] = k < model.config.num_layers
    return trace


# --- per-token results ------------------------------------------------------------------------------
@dataclass
class TokenTable:
    """One row per predicted token (chunks concatenated); columns as below. CPU tensors."""

    targets: Tensor  # (M,) the next text token
    nll: Tensor  # (M, L) negative log-likelihood of the target at each depth (full pass)
    top1: Tensor  # (M, L) top-1 token at each depth (full pass)
    confidence: Tensor  # (M, L) confidence at each depth (full pass)
    exit_depth: Tensor  # (M,) exit depth at the threshold (exit pass)
    exit_nll: Tensor  # (M,) NLL of the target under the exit layer's distribution
    exit_top1: Tensor  # (M,) top-1 at the exit
    exit_confidence: Tensor  # (M,)
    forced: Tensor  # (M,) bool

    @staticmethod
    def cat(parts: list["TokenTable"]) -> "TokenTable":
        return TokenTable(**{f: torch.cat([getattr(p, f) for p in parts]) for f in TokenTable.__dataclass_fields__})


@torch.inference_mode()
def full_pass(model: Transformer, heads: ExitHeads, tokens: Tensor, exit_config: ExitConfig,
              depths: Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(N, T) tokens -> nll, top1, confidence, each (N*(T-1), D): every predicted token decoded at each of
    `depths` in increasing order (default: every depth; fewer saves LM heads, the cost of a large vocabulary)."""
    n, t = tokens.shape
    decoded = set(depths or range(1, model.num_loaded_layers + 1))
    _, hidden = model(tokens, output_hidden_states=True)
    targets = tokens[:, 1:].reshape(-1)
    points = set(exit_config.exit_points(model.num_loaded_layers))
    previous = model.embed_tokens(tokens, torch.arange(t, device=tokens.device).expand(n, t))
    nll, top1, conf = [], [], []
    for depth, h in enumerate(hidden, start=1):
        if depth in decoded:
            flat, prev = h[:, :-1].reshape(-1, h.shape[-1]), previous[:, :-1].reshape(-1, h.shape[-1])
            logp = torch.log_softmax(heads.logits(depth, flat).float(), dim=-1)
            nll.append(-logp.gather(1, targets[:, None])[:, 0])
            top2 = logp.topk(2, dim=-1)  # one softmax serves NLL, top-1 and confidence (max_prob or margin)
            top1.append(top2.indices[:, 0])
            if exit_config.measure in LOGIT_FREE:
                conf.append(exit_confidence(heads, exit_config.measure, depth, flat, prev, logp))
            else:
                p = top2.values.exp()
                conf.append(p[:, 0] if exit_config.measure == "max_prob" else p[:, 0] - p[:, 1])
        if depth in points:
            previous = h
    return torch.stack(nll, 1), torch.stack(top1, 1), torch.stack(conf, 1)


def token_table(model: Transformer, heads: ExitHeads, chunks: Sequence[Sequence[int]], exit_config: ExitConfig,
                loaded_layers: int | None = None, batch_size: int = 8) -> TokenTable:
    """Both passes over every chunk (each chunk predicts its tokens 1..T-1), batched."""
    if model.num_loaded_layers != model.config.num_layers:
        raise ValueError("quality analysis needs every layer loaded (loaded_layers simulates partial loading)")
    check_probes(heads, exit_config)
    device = model.device
    parts = []
    for batch in batches(chunks, batch_size):
        tokens = torch.tensor(batch, device=device)
        nll, top1, conf = full_pass(model, heads, tokens, exit_config)
        trace = simulate_exits(model, heads, tokens, exit_config, loaded_layers)
        targets = tokens[:, 1:].reshape(-1)
        logits = trace.logits[:, :-1].reshape(-1, trace.logits.shape[-1])
        parts.append(TokenTable(
            targets=targets.cpu(), nll=nll.cpu(), top1=top1.cpu(), confidence=conf.cpu(),
            exit_depth=trace.depth[:, :-1].reshape(-1).cpu(),
            exit_nll=F.cross_entropy(logits, targets, reduction="none").cpu(),
            exit_top1=logits.argmax(-1).cpu(),
            exit_confidence=trace.confidence[:, :-1].reshape(-1).cpu(),
            forced=trace.forced[:, :-1].reshape(-1).cpu(),
        ))
    if not parts:
        raise ValueError("no text to analyse: need at least one chunk of 2 or more tokens")
    return TokenTable.cat(parts)


def batches(chunks: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[Sequence[int]]]:
    """Runs of equal-length chunks (only the last chunk of a text is usually shorter), at most batch_size."""
    batch: list[Sequence[int]] = []
    for chunk in chunks:
        if len(chunk) < 2:
            continue
        if batch and (len(batch) == batch_size or len(chunk) != len(batch[0])):
            yield batch
            batch = []
        batch.append(list(chunk))
    if batch:
        yield batch


def chunk_tokens(ids: Sequence[int], chunk_len: int = 256) -> list[list[int]]:
    """Consecutive, non-overlapping chunks; the last may be shorter."""
    if chunk_len < 2:
        raise ValueError(f"chunk_len must be >= 2, got {chunk_len}")
    return [list(ids[i : i + chunk_len]) for i in range(0, len(ids), chunk_len)]


# --- summaries ------------------------------------------------------------------------------------
def _mean(x: Tensor) -> float | None:
    return float(x.float().mean()) if x.numel() else None


def _ppl(nll: Tensor) -> float | None:
    return math.exp(float(nll.double().mean())) if nll.numel() else None


@dataclass
class DepthStats:
    """Every token decoded at one depth (the full pass)."""

    depth: int
    perplexity: float
    accuracy: float  # top-1 == next text token
    agreement: float  # top-1 == the final layer's top-1
    mean_confidence: float
    below_threshold: float  # share of tokens with confidence < threshold here
    below_threshold_agreement: float | None  # among those: top-1 == final top-1 (forced-exit observation)
    below_half: float  # share with confidence < 0.5
    below_half_agreement: float | None


@dataclass
class ExitSummary:
    """The exit decision at a threshold (the exit pass); quality is that of each token's exit layer."""

    threshold: float
    measure: str
    loaded_layers: int
    histogram: dict[int, int]  # exit depth -> tokens
    exit_share_within: dict[int, float]  # depth -> share of tokens exited at or before it
    mean_exit_layer: float
    early_share: float  # left before the last loaded layer
    perplexity: float
    accuracy: float
    agreement: float  # with the full model's final-layer top-1
    forced_share: float
    breach_rate: float  # forced with confidence below the threshold


@dataclass
class QualityReport:
    model: str
    num_layers: int
    tokens: int  # predicted tokens
    depths: list[DepthStats]
    exit: ExitSummary
    source: str = ""
    table: TokenTable | None = field(default=None, repr=False)  # per-token results (not in to_dict)

    def to_dict(self) -> dict:
        return {"model": self.model, "source": self.source, "num_layers": self.num_layers, "tokens": self.tokens,
                "depths": [asdict(d) for d in self.depths], "exit": asdict(self.exit)}

    def format(self) -> str:
        e = self.exit
        lines = [
            f"{self.model} on {self.source or 'text'}: {self.tokens} tokens, teacher-forced; threshold {e.threshold} "
            f"({e.measure}), {e.loaded_layers}/{self.num_layers} layers loaded",
            "depth     ppl    acc  agree   conf   <thr  agree|<thr  agree|<0.5   exits  exited by",
        ]
        for d in self.depths:
            exits = ""  # blank below the loaded depth
            if d.depth <= e.loaded_layers:
                exits = f"{e.histogram.get(d.depth, 0) / self.tokens:7.1%} {e.exit_share_within[d.depth]:9.1%}"
            lines.append(
                f"{d.depth:5d} {d.perplexity:7.2f} {d.accuracy:6.1%} {d.agreement:6.1%} {d.mean_confidence:6.3f} "
                f"{d.below_threshold:6.1%} {_pct(d.below_threshold_agreement):>11} {_pct(d.below_half_agreement):>11} "
                f"{exits}".rstrip()
            )
        lines.append(
            f"early exit: ppl {e.perplexity:.2f}, accuracy {e.accuracy:.1%}, agreement with the final layer "
            f"{e.agreement:.1%}; mean exit layer {e.mean_exit_layer:.2f}, exited early {e.early_share:.1%}, "
            f"forced {e.forced_share:.1%}, breaches {e.breach_rate:.1%}"
        )
        return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def summarize(table: TokenTable, exit_config: ExitConfig, loaded_layers: int, model: str = "") -> QualityReport:
    threshold = exit_config.threshold
    final = table.top1[:, -1]
    depths = []
    for i in range(table.nll.shape[1]):
        agree = table.top1[:, i] == final
        low, half = table.confidence[:, i] < threshold, table.confidence[:, i] < 0.5
        depths.append(DepthStats(
            depth=i + 1, perplexity=_ppl(table.nll[:, i]), accuracy=_mean(table.top1[:, i] == table.targets),
            agreement=_mean(agree), mean_confidence=_mean(table.confidence[:, i]),
            below_threshold=_mean(low), below_threshold_agreement=_mean(agree[low]),
            below_half=_mean(half), below_half_agreement=_mean(agree[half]),
        ))
    n = table.targets.numel()
    histogram = dict(sorted(Counter(table.exit_depth.tolist()).items()))
    within, running = {}, 0
    for d in range(1, loaded_layers + 1):
        running += histogram.get(d, 0)
        within[d] = running / n
    exit_summary = ExitSummary(
        threshold=threshold, measure=exit_config.measure, loaded_layers=loaded_layers, histogram=histogram,
        exit_share_within=within, mean_exit_layer=_mean(table.exit_depth),
        early_share=_mean(table.exit_depth < loaded_layers), perplexity=_ppl(table.exit_nll),
        accuracy=_mean(table.exit_top1 == table.targets), agreement=_mean(table.exit_top1 == final),
        forced_share=_mean(table.forced), breach_rate=_mean(table.forced & (table.exit_confidence < threshold)),
    )
    return QualityReport(model, table.nll.shape[1], n, depths, exit_summary, table=table)


def analyze(model: Transformer, heads: ExitHeads, chunks: Sequence[Sequence[int]],
            exit_config: ExitConfig = ExitConfig(), loaded_layers: int | None = None, batch_size: int = 8,
            name: str = "") -> QualityReport:
    """Per-depth quality and the exit decision at exit_config.threshold, optionally with only the
    first `loaded_layers` layers loaded. `model` must hold every layer (the final layer is the reference)."""
    table = token_table(model, heads, chunks, exit_config, loaded_layers, batch_size)
    return summarize(table, exit_config, loaded_layers or model.num_loaded_layers, name)


def evaluate_text(model: str, source: str, exit_config: ExitConfig = ExitConfig(), layers: int | None = None,
                  limit: int | None = None, chunk_len: int = 256, device: str = "auto",
                  dtype: str = "auto", quantization: str | None = None) -> QualityReport:
    """`analyze` on a model directory and a text source (see `load_text_tokens`), at most `limit` tokens."""
    from .engine import load_tokenizer
    from .exits import load_exit_heads
    from .models import load_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(model)
    if tokenizer is None:
        raise ValueError(f"model {model} has no tokenizer: text evaluation needs one")
    net = load_model(model, dtype=dtype, device=device, max_len=chunk_len, quantization=quantization)
    depth = net.config.num_layers
    if layers is not None and not 1 <= layers <= depth:
        raise ValueError(f"layers must be in [1, {depth}], got {layers}")
    heads = load_exit_heads(exit_config.heads_path, net) if exit_config.heads_path else ExitHeads(net)
    ids, _ = load_text_tokens(source, tokenizer, limit)
    report = analyze(net, heads, chunk_tokens(ids, chunk_len), exit_config, layers, name=Path(model).name)
    report.source = source
    return report


# --- two models, one tokenizer ----------------------------------------------------------------------
@dataclass
class CrossTab:
    """Tokens by whether they exit early on model A and on model B ("early" = at <= early_fraction of depth,
    or with early_fraction None before the model's last layer)."""

    early_fraction: float | None
    tokens: int
    both_early: int
    a_only: int  # early on A, not on B
    b_only: int
    neither: int

    @property
    def b_early_given_a_late(self) -> float | None:
        late_a = self.b_only + self.neither
        return self.b_only / late_a if late_a else None

    @property
    def a_early_given_b_late(self) -> float | None:
        late_b = self.a_only + self.neither
        return self.a_only / late_b if late_b else None

    def to_dict(self) -> dict:
        return asdict(self) | {"b_early_given_a_late": self.b_early_given_a_late,
                               "a_early_given_b_late": self.a_early_given_b_late}


def exited_early(depth: Tensor, layers: int, early_fraction: float | None = 0.5) -> Tensor:
    """Exit depths -> bool: at <= early_fraction of the model's layers, or (None) before its last layer."""
    return depth < layers if early_fraction is None else depth <= early_fraction * layers


def cross_tab(depth_a: Tensor, layers_a: int, depth_b: Tensor, layers_b: int,
              early_fraction: float | None = 0.5) -> CrossTab:
    """Exit depths of the same tokens on two models (e.g. `report.table.exit_depth`) and the models' depths."""
    if depth_a.shape != depth_b.shape:
        raise ValueError(f"exit depths cover different tokens: shapes {tuple(depth_a.shape)}, {tuple(depth_b.shape)}")
    a = exited_early(depth_a, layers_a, early_fraction)
    b = exited_early(depth_b, layers_b, early_fraction)
    return CrossTab(early_fraction, a.numel(), int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()),
                    int((~a & ~b).sum()))


# --- two models, two tokenizers ------------------------------------------------------------------
def token_starts(offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Character offsets of a tokenization (its offset mapping) -> where each token starts new text, or -1:
    a special token (empty span) or a byte-level piece of a character the previous token began."""
    starts, end = [], 0
    for s, e in offsets:
        starts.append(s if e > s and s >= end else -1)
        end = max(end, e)
    return starts


def aligned_positions(starts_a: Sequence[int], starts_b: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Indices into two models' per-token results whose predicted tokens start at the same character
    (each list: the start of the token each position predicts, -1 for none). There both models have
    read the same text, so their exit decisions can be compared although the tokenizers differ."""
    index_b = {c: i for i, c in enumerate(starts_b) if c >= 0}
    pairs = [(i, index_b[c]) for i, c in enumerate(starts_a) if c >= 0 and c in index_b]
    a, b = zip(*pairs) if pairs else ((), ())
    return torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long)


# --- text sources -----------------------------------------------------------------------------------
def source_files(source: str) -> list[Path]:
    """The files of a text source: a file, a directory's text files, or a builtin source's held-out files."""
    from .train import BUILTIN_SOURCES, held_out_files, parse_source

    return held_out_files(source) if source in BUILTIN_SOURCES else parse_source(source).files


def load_texts(source: str, tokenizer, limit: int) -> list[tuple[str, bool]]:
    """The text `load_text_tokens(source, tokenizer, limit)` reads, file by file, with whether the file is
    whole (it then ends with end-of-text): the last is cut after the character where the `limit`-th
    token ends, so that another tokenizer can read the same characters."""
    files = source_files(source)
    eos = 1 if tokenizer.eos_token_id is not None else 0
    texts, count = [], 0
    for f in files:
        if count >= limit:
            break
        text = f.read_text(encoding="utf-8", errors="replace")
        offsets = tokenizer(text, return_offsets_mapping=True).offset_mapping
        if count + len(offsets) + eos <= limit:
            texts.append((text, True))
        elif count + len(offsets) > limit:
            texts.append((text[: offsets[limit - count - 1][1]], False))
        else:
            texts.append((text, False))  # the file fits, its end-of-text does not
        count += len(offsets) + eos
    return texts


def tokenize_texts(texts: Sequence[tuple[str, bool]], tokenizer) -> list[int]:
    """`load_texts`' text as `tokenizer` reads it: each whole file followed by end-of-text."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [t for text, whole in texts for t in tokenizer(text).input_ids + (eos if whole else [])]


def load_text_tokens(source: str, tokenizer, limit: int | None = None) -> tuple[list[int], list[Path]]:
    """Token ids of a file, a directory's text files, or a builtin source (`stdlib`, `pydoc`: only its
    held-out files, so a model is never scored on its training data). Each file ends with end-of-text.
    Returns the ids (at most `limit`) and the files read."""
    files = source_files(source)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    read = []
    for f in files:
        if limit is not None and len(ids) >= limit:
            break
        ids += tokenizer(f.read_text(encoding="utf-8", errors="replace")).input_ids + eos
        read.append(f)
    return ids[:limit], read
