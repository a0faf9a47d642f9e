"""Train exit heads for a frozen model: turn a vanilla checkpoint into an early-exit model.

`helios train-exits` writes an adapter in the `helios-exit-heads` format (see `exits.py`) that the
engine loads with `ExitConfig(heads_path=...)`. The base model is never modified.

Recipe (EE-LLM style heads, trained by self-distillation):
- one head per exit depth: its own norm, initialised from the model's final norm, and optionally a
  residual projection (h + proj(h), zero-initialised) and an own LM head (a copy of the model's);
  at step 0 every head therefore computes exactly the shared head, so training can only start from
  what LayerSkip-style exits already give;
- the loss of a head is KL(final layer || head) on every position: the engine uses a head to emit
  the token the full model would have emitted, and its max-probability as the confidence that it
  would, so the final layer's distribution is the target. `ce_weight` mixes in cross-entropy to the
  text (default 0: the text's next token is a noisier signal for "what the full model says");
- hidden states come from the frozen model under no_grad, one forward per batch for all heads.

Evaluation, before and after training, on held-out text (files where `train.is_held_out` is true; for
corpora without such a file, the last tokens of the corpus, which training then never sees): per exit
depth, top-1 agreement with the final layer and the head's perplexity on the text, and the share of
tokens that would leave at that depth with max-probability threshold 0.8. Hidden states there come
from a full-depth forward, so the exit shares ignore the engine's K/V propagation for earlier exited
tokens: an estimate of the engine's exits, exact for the first generated token.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .exits import ExitHead, ExitHeads, load_exit_heads, make_probe, save_exit_heads
from .models import Transformer, load_model, resolve_dtype
from .models.low_rank import BackboneAdapter
from .train import is_held_out, parse_sources, resolve_device

EVAL_THRESHOLD = 0.8  # the engine's default exit threshold
CHECKPOINT_EVERY_S = 300.0  # training state is written at most this often (and when the time limit hits)


def train_exit_heads(
    model_dir: str | Path,
    out_path: str | Path,
    corpus: list[str] | None = None,
    exit_layers: tuple[int, ...] | list[int] | None = None,
    steps: int = 300,
    batch_size: int = 8,
    seq_len: int = 256,
    lr: float = 3e-3,
    proj: bool = False,
    lm_head: bool = False,
    ce_weight: float = 0.0,
    topk: int | None = None,
    rank: int | None = None,
    eval_tokens: int = 16384,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    time_limit: float | None = None,
    save_dtype: str | None = None,
    init_heads: str | Path | None = None,
    backbone_rank: int | None = None,
    backbone_lr: float = 3e-4,
    final_weight: float = 4.0,
) -> dict:
    """Train exit heads at `exit_layers` (default: every layer but the last) and write them to `out_path`.

    corpus: data sources "[NAME=]PATH[:WEIGHT]" as for `helios train` (default: code=stdlib).
    topk: distil on the final layer's top-k tokens plus shared sampled negatives instead of the whole
    vocabulary (see `candidate_kl`); None = the whole vocabulary.
    rank: a low-rank residual adapter h + up(down(h)) per head (`proj` is the full-rank one). On
    SmolLM2 a rank-64 adapter beat a full-rank one on held-out text (less to overfit).
    Training checkpoints beside `out_path` (`*.ckpt.safetensors`) every few steps and after
    `time_limit` seconds, and a later call with the same arguments resumes from there; the
    checkpoint is removed once the heads are written. Returns the run's figures, with the held-out
    "before" and "after" tables (see `evaluate`); `finished` is False when the time limit stopped it.
    Deterministic for a seed on CPU (for a given thread count), resumed or not.
    save_dtype: the dtype the heads are stored in (default: fp32).
    init_heads: start from the heads in this file (e.g. the frozen-backbone ones when training the
    LayerSkip variant); the "before" table is then theirs.
    backbone_rank: also train a low-rank adapter of the backbone's layers below the deepest exit
    (`models/low_rank.py`), LayerSkip's recipe without touching the checkpoint: the exits' loss flows
    into the layers, and `final_weight` x KL(original model || adapted model) at the last layer keeps
    full depth close to the original. The adapter is saved in the heads file and merged at load.
    """
    out_path = _check_out(out_path)
    if steps < 0 or batch_size < 1 or seq_len < 2 or eval_tokens < seq_len:
        raise ValueError(f"need steps >= 0, batch_size >= 1, seq_len >= 2 and eval_tokens >= seq_len; got "
                         f"steps={steps} batch_size={batch_size} seq_len={seq_len} eval_tokens={eval_tokens}")
    dev = resolve_device(device)
    model, depths, tokenizer = _frozen_model(model_dir, exit_layers, seq_len, dev)
    num_layers = model.config.num_layers
    train_data, eval_data = load_corpus(corpus, tokenizer, steps * batch_size * (seq_len + 1), eval_tokens,
                                        seq_len, seed)

    trained = {d: make_head(model, proj, lm_head, rank).to(dev) for d in depths}
    initial = ExitHeads(model)
    if init_heads is not None:
        initial = load_exit_heads(init_heads, model)
        if initial.backbone or set(initial.trained) != {str(d) for d in depths}:
            raise ValueError(f"--init-heads {init_heads}: need heads at exactly {list(depths)} on the original "
                             f"backbone, the file has {sorted(int(d) for d in initial.trained)}"
                             + (" and a backbone adapter" if initial.backbone else ""))
        trained = {d: initial.trained[str(d)] for d in depths}
        initial = ExitHeads(model, {d: copy.deepcopy(h) for d, h in trained.items()})
    heads = ExitHeads(model, trained)
    backbone = BackboneAdapter(model, backbone_rank, range(max(depths))).to(dev) if backbone_rank else None
    groups = [{"params": list(heads.trained.parameters()), "lr": lr}]
    trainable: nn.Module = heads.trained
    if backbone is not None:
        groups.append({"params": list(backbone.parameters()), "lr": backbone_lr})
        trainable = nn.ModuleDict({"exits": heads.trained, "backbone": backbone})
    optimizer = torch.optim.Adam(groups)  # no weight decay: it pulls norm gains to 0
    checkpoint = out_path.with_suffix(".ckpt.safetensors")
    start, loss_value, seconds, before = resume(checkpoint, trainable, optimizer, steps, dev)
    before = before or evaluate(model, initial, depths, eval_data, batch_size)
    lrs = [group["lr"] for group in optimizer.param_groups]

    from tqdm import tqdm

    started = time.perf_counter()
    last_saved = started
    with backbone.attached() if backbone is not None else contextlib.nullcontext():
        for step in tqdm(range(start, steps), disable=not progress, desc="train-exits", unit="step",
                         initial=start, total=steps):
            for group, group_lr in zip(optimizer.param_groups, lrs):  # cosine decay to 10%, no warmup
                group["lr"] = group_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))
            rng = random.Random(seed * 1_000_003 + step)  # a step's batch depends on the step only: resumable
            batch = sample_batch(train_data, batch_size, seq_len, rng).to(dev)
            loss = distillation_loss(model, heads, depths, batch, ce_weight, topk, rng, backbone, final_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
            now = time.perf_counter()
            out_of_time = time_limit is not None and now - started >= time_limit
            if step + 1 < steps and (out_of_time or now - last_saved >= CHECKPOINT_EVERY_S):
                save_checkpoint(checkpoint, trainable, optimizer, step + 1, loss_value, seconds + now - started,
                                before)
                last_saved = now
                if out_of_time:
                    return {"out": str(out_path), "finished": False, "steps_done": step + 1, "steps": steps,
                            "checkpoint": str(checkpoint), "final_loss": loss_value}
        seconds += time.perf_counter() - started
        after = evaluate(model, heads, depths, eval_data, batch_size)

    heads.backbone = backbone.tensors() if backbone is not None else {}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_exit_heads(out_path, heads, resolve_dtype(save_dtype) if save_dtype else None)
    checkpoint.unlink(missing_ok=True)
    return {
        "out": str(out_path),
        "finished": True,
        "topk": topk,
        "rank": rank,
        "backbone_rank": backbone_rank,
        "model": str(model_dir),
        "exit_layers": list(depths),
        "num_layers": num_layers,
        "steps": steps,
        "tokens_seen": steps * batch_size * seq_len,
        "train_tokens": len(train_data),
        "eval_tokens": int(eval_data.numel() - eval_data.shape[0]),  # predicted positions
        "final_loss": loss_value,
        "seconds": round(seconds, 2),
        "adapter_bytes": out_path.stat().st_size,
        "before": before,
        "after": after,
    }


def _check_out(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"exit heads are written as a .safetensors file, got {out_path.name!r}")
    return out_path


def _frozen_model(model_dir: str | Path, exit_layers, seq_len: int, dev: str) -> tuple[Transformer, tuple[int, ...], object]:
    """The model (fp32, no grad), the exit depths to train (default every layer but the last) and its tokenizer."""
    model = load_model(model_dir, dtype="float32", device=dev, max_len=seq_len)
    model.requires_grad_(False)
    num_layers = model.config.num_layers
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's {model.config.max_position_embeddings} positions")
    depths = tuple(range(1, num_layers)) if exit_layers is None else tuple(sorted(set(exit_layers)))
    bad = [d for d in depths if not 1 <= d < num_layers]
    if not depths or bad:
        raise ValueError(f"exit layer(s) {bad or 'none'} out of range: this {num_layers}-layer model takes "
                         f"exit heads at depths 1..{num_layers - 1} (the last layer uses the model's own head)")

    from transformers import AutoTokenizer

    return model, depths, AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def make_head(model: Transformer, proj: bool, lm_head: bool, rank: int | None = None) -> ExitHead:
    """A head that starts out computing exactly the shared head (final norm + LM head): its adapter's
    last matrix is zero."""
    head = ExitHead(model, proj=proj, lm_head=lm_head, rank=rank).to(model.dtype)
    head.norm.load_state_dict(model.norm.state_dict())
    if head.proj is not None:
        torch.nn.init.zeros_(head.proj.weight)
    if head.up is not None:
        torch.nn.init.zeros_(head.up.weight)
    if head.lm_head is not None:
        head.lm_head.weight.data.copy_(model.lm_head.unpacked_weight())
    return head


@torch.no_grad()
def frozen_forward(model: Transformer, tokens: Tensor, depths: tuple[int, ...]) -> tuple[dict[int, Tensor], Tensor]:
    """Hidden states at `depths` (as ordinary tensors, usable as training inputs) and final log-probs."""
    logits, hidden = model(tokens, output_hidden_states=True)  # inference tensors: clone before autograd
    return {d: hidden[d - 1].clone() for d in depths}, F.log_softmax(logits.float(), dim=-1)


def distillation_loss(model: Transformer, heads: ExitHeads, depths: tuple[int, ...], batch: Tensor,
                      ce_weight: float, topk: int | None = None, rng: random.Random | None = None,
                      backbone: BackboneAdapter | None = None, final_weight: float = 4.0) -> Tensor:
    """Sum over heads of KL(final || head), plus ce_weight x cross-entropy to the next token.

    Summed, not averaged: every head has its own parameters, so each gets the gradient of its own loss.
    With `topk`, each head is scored on candidate tokens only (`candidate_kl`): the final layer's top-k
    at each position plus NEGATIVES_PER_TOPK x topk tokens sampled for the batch (rng). A real model's
    LM head costs as much as several blocks (SmolLM2: 8; Gemma 3 270M: 30), so the full vocabulary at
    every exit would cost more than the frozen forward itself.
    With a `backbone` adapter (attached), "final" is the original model's last layer, hidden states
    come from the adapted model with gradients, and final_weight x KL(original || adapted) over the
    whole vocabulary at the last layer is added.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:].flatten()
    loss = torch.zeros((), device=batch.device)
    if backbone is None:
        hidden, teacher = frozen_forward(model, inputs, depths)
        teacher = teacher.flatten(0, 1)
    else:
        with backbone.disabled():
            _, teacher = frozen_forward(model, inputs, ())
        teacher = teacher.flatten(0, 1)
        logits, states = model.forward_with_grad(inputs, output_hidden_states=True)
        hidden = {d: states[d - 1] for d in depths}
        student = F.log_softmax(logits.float().flatten(0, 1), dim=-1)
        loss = loss + final_weight * F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    if topk:
        top = teacher.topk(topk, dim=-1).indices  # (N, k)
        generator = torch.Generator().manual_seed((rng or random.Random(0)).randrange(2**62))
        sampled = torch.randint(teacher.shape[1], (NEGATIVES_PER_TOPK * topk,), generator=generator).to(top.device)
        if ce_weight:
            top = torch.cat([top, targets[:, None]], dim=1)
    for d in depths:
        if topk:
            features, lm_head = heads.features(d, hidden[d])
            kl, student_target = candidate_kl(features.flatten(0, 1), lm_head.weight, teacher, top, sampled)
            loss = loss + kl
            if ce_weight:
                loss = loss + ce_weight * -student_target.mean()
            continue
        student = F.log_softmax(heads.logits(d, hidden[d]).float().flatten(0, 1), dim=-1)
        loss = loss + F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        if ce_weight:
            loss = loss + ce_weight * F.nll_loss(student, targets)
    return loss


NEGATIVES_PER_TOPK = 8  # sampled tokens per top-k slot: they keep the rest of the vocabulary down


def candidate_kl(features: Tensor, weight: Tensor, teacher: Tensor, top: Tensor,
                 sampled: Tensor) -> tuple[Tensor, Tensor]:
    """KL(teacher || student) over each position's candidates: its own `top` ids (N, k) and the
    batch's `sampled` ids (S,), both distributions renormalised over them.

    features (N, D) and the LM head `weight` (V, D) give the student's logits for the candidates only
    (N·(k+S)·D multiply-adds instead of N·V·D). Returns the KL (mean over positions) and the
    student's log-probability of each position's last `top` column (its text token when the caller
    appended it), for the cross-entropy term.
    """
    student = torch.cat([torch.einsum("nd,nkd->nk", features, weight[top]), features @ weight[sampled].T], dim=1)
    student = F.log_softmax(student.float(), dim=-1)
    target = torch.cat([teacher.gather(1, top), teacher[:, sampled]], dim=1).log_softmax(dim=-1)
    kl = F.kl_div(student, target, log_target=True, reduction="batchmean")
    return kl, student[:, top.shape[1] - 1]


def save_checkpoint(path: Path, trainable: nn.Module, optimizer: torch.optim.Optimizer, step: int, loss: float,
                    seconds: float, before: dict) -> None:
    """The trained parameters (under "heads.") and Adam's moments as safetensors (never a pickle), the
    step in the metadata; written to a temporary file and renamed, so an interruption leaves the
    previous checkpoint whole."""
    tensors = {f"heads.{k}": v.detach().contiguous().cpu() for k, v in trainable.state_dict().items()}
    params = list(trainable.parameters())
    for i, p in enumerate(params):
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"adam.{i}.{key}"] = state[key].contiguous().cpu()
        if "step" in state:
            tensors[f"adam.{i}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1).cpu()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "loss": repr(loss), "seconds": repr(seconds),
                                           "before": json.dumps(before)})  # held-out "before": not evaluated again
    tmp.replace(path)


def resume(path: Path, trainable: nn.Module, optimizer: torch.optim.Optimizer, steps: int,
           device: str) -> tuple[int, float, float, dict | None]:
    """Load a checkpoint written by `save_checkpoint` if there is one: (next step, loss, seconds so far,
    the held-out "before" table)."""
    if not path.is_file():
        return 0, float("nan"), 0.0, None
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    step = int(meta["step"])
    if step > steps:
        raise ValueError(f"{path} is at step {step}, beyond --steps {steps}: remove it to start over")
    trainable.load_state_dict({k[len("heads."):]: v for k, v in tensors.items() if k.startswith("heads.")})
    for i, p in enumerate(trainable.parameters()):
        if f"adam.{i}.exp_avg" in tensors:
            optimizer.state[p] = {"step": tensors[f"adam.{i}.step"][0].clone(),
                                  "exp_avg": tensors[f"adam.{i}.exp_avg"].to(device),
                                  "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(device)}
    before = json.loads(meta["before"]) if "before" in meta else None  # older checkpoints: evaluated again
    return step, float(meta["loss"]), float(meta["seconds"]), before


@torch.no_grad()
def evaluate(model: Transformer, heads: ExitHeads, depths: tuple[int, ...], windows: Tensor,
             batch_size: int, threshold: float = EVAL_THRESHOLD) -> dict:
    """Held-out figures of `heads` at `depths` (and the final layer) on token windows (W, T+1).

    rows: per depth, `agreement` (top-1 equal to the final layer's), `perplexity` (on the text) and
    `exit_share` (share of tokens whose first exit point with max-probability >= threshold is this
    depth; the final row takes the rest). `exit_agreement` is the share of tokens whose exit token
    equals the final layer's; `mean_exit_depth` the average depth they leave at.
    """
    num_layers = model.config.num_layers
    all_depths = (*depths, num_layers)
    agree = {d: 0 for d in all_depths}
    nll = {d: 0.0 for d in all_depths}
    exits = {d: 0 for d in all_depths}
    exit_agree, n = 0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(model.device)
        hidden, final = frozen_forward(model, batch[:, :-1], depths)
        final, targets = final.flatten(0, 1), batch[:, 1:].flatten()
        final_top = final.argmax(-1)
        running = torch.ones_like(targets, dtype=torch.bool)
        for d in all_depths:
            logp = final if d == num_layers else F.log_softmax(heads.logits(d, hidden[d]).float(), -1).flatten(0, 1)
            top = logp.argmax(-1)
            agree[d] += int((top == final_top).sum())
            nll[d] += float(F.nll_loss(logp, targets, reduction="sum"))
            leave = running & ((logp.max(-1).values.exp() >= threshold) | (d == num_layers))
            exits[d] += int(leave.sum())
            exit_agree += int((leave & (top == final_top)).sum())
            running &= ~leave
        n += targets.numel()
    rows = [{"depth": d, "agreement": agree[d] / n, "perplexity": math.exp(nll[d] / n), "exit_share": exits[d] / n}
            for d in all_depths]
    return {"rows": rows, "threshold": threshold, "exit_agreement": exit_agree / n,
            "mean_exit_depth": sum(d * exits[d] for d in all_depths) / n}


# --- exit probes -----------------------------------------------------------------------------------
PROBE_THRESHOLDS = (0.5, 0.8, 0.9, 0.95)  # the report's teacher-forced exit simulation


def train_exit_probes(
    model_dir: str | Path,
    out_path: str | Path,
    corpus: list[str] | None = None,
    exit_layers: tuple[int, ...] | list[int] | None = None,
    steps: int = 300,
    train_tokens: int = 32768,
    batch_size: int = 8,
    seq_len: int = 256,
    lr: float = 3e-2,
    eval_tokens: int = 16384,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    heads_path: str | Path | None = None,
    save_dtype: str | None = None,
) -> dict:
    """Train an exit probe per depth for the model's exit heads and write them to `out_path`.

    A probe is a logistic regression on the final-normed hidden state: label 1 when the depth's top-1
    token equals the final layer's (teacher-forced on the corpus' training files). Features and labels
    are collected once (`train_tokens` positions, frozen forwards of `batch_size` windows); then `steps`
    full-batch Adam steps fit all depths together. Returns the held-out report (see `probe_report`).
    heads_path: trained exit heads (from `train_exit_heads`): the probes learn when *those* heads agree
    with the final layer, and `out_path` holds the heads and the probes together (what the engine
    loads); default exit depths are then the heads' depths. None: probes for the shared head.
    save_dtype: store the heads (and a backbone adapter) in this dtype (default: as in heads_path).
    """
    out_path = _check_out(out_path)
    if steps < 0 or batch_size < 1 or seq_len < 2 or train_tokens < seq_len or eval_tokens < seq_len:
        raise ValueError(f"need steps >= 0, batch_size >= 1, seq_len >= 2, train_tokens and eval_tokens >= "
                         f"seq_len; got steps={steps} batch_size={batch_size} seq_len={seq_len} "
                         f"train_tokens={train_tokens} eval_tokens={eval_tokens}")
    dev = resolve_device(device)
    model, depths, tokenizer = _frozen_model(model_dir, exit_layers, seq_len, dev)
    heads = ExitHeads(model)
    if heads_path is not None:
        heads = load_exit_heads(heads_path, model)
        if exit_layers is None:
            depths = tuple(sorted(int(d) for d in heads.trained)) or depths
    train_data, eval_windows = load_corpus(corpus, tokenizer, train_tokens + seq_len + 1, eval_tokens, seq_len, seed)
    n = min(len(train_data) // (seq_len + 1), math.ceil(train_tokens / seq_len))
    train_windows = torch.from_numpy(train_data[: n * (seq_len + 1)].reshape(n, seq_len + 1))

    started = time.perf_counter()
    x, y, _ = probe_data(heads, depths, train_windows, batch_size)
    weight, bias = fit_probes(x, y, steps, lr, progress)
    seconds = time.perf_counter() - started

    probes = {}
    for i, d in enumerate(depths):
        probes[d] = make_probe(model)
        probes[d].weight.data.copy_(weight[i][None])
        probes[d].bias.data.copy_(bias[i : i + 1])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    trained = {int(d): head for d, head in heads.trained.items()}
    save_exit_heads(out_path, ExitHeads(model, trained, probes, heads.backbone),
                    resolve_dtype(save_dtype) if save_dtype else _stored_dtype(heads_path) if heads_path else None)
    del x, y  # free the training features before the held-out pass collects its own
    report = probe_report(heads, depths, weight, bias, eval_windows, batch_size)
    return {"out": str(out_path), "model": str(model_dir), "exit_layers": list(depths),
            "num_layers": model.config.num_layers, "steps": steps, "train_tokens": int(_positions(train_windows)),
            "eval_tokens": int(_positions(eval_windows)), "seconds": round(seconds, 2),
            "adapter_bytes": out_path.stat().st_size} | report


def _stored_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype a heads file stores its trained heads in (None when it holds probes only)."""
    with safe_open(path, framework="pt") as f:
        names = [k for k in f.keys() if ".probe." not in k]
        return f.get_tensor(names[0]).dtype if names else None


def _positions(windows: Tensor) -> int:
    return windows.shape[0] * (windows.shape[1] - 1)  # predicted positions


@torch.no_grad()
def probe_data(heads: ExitHeads, depths: tuple[int, ...], windows: Tensor,
               batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per depth, over every predicted position: features (L', N, D) = final norm of the hidden state,
    labels (L', N) = the depth's head's top-1 == final top-1, and that head's max probability (L', N)."""
    model = heads.model[0]
    xs, ys, ps = [], [], []
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size, :-1].to(model.device)
        hidden, final = frozen_forward(model, batch, depths)
        final_top = final.flatten(0, 1).argmax(-1)
        h = torch.stack([hidden[d].flatten(0, 1) for d in depths])  # (L', n, D)
        logits = torch.stack([heads.logits(d, h[j]) for j, d in enumerate(depths)]).float()
        xs.append(model.norm(h).cpu())
        ys.append((logits.argmax(-1) == final_top).cpu())
        ps.append(torch.softmax(logits, -1).amax(-1).cpu())
    return torch.cat(xs, 1), torch.cat(ys, 1), torch.cat(ps, 1)


def fit_probes(x: Tensor, y: Tensor, steps: int, lr: float, progress: bool = False) -> tuple[Tensor, Tensor]:
    """Logistic regressions, one per depth, fitted together: x (L', N, D), y (L', N) -> weight (L', D), bias (L',).

    Full-batch Adam on the mean BCE, from the best constant (weight 0, bias = logit of the label rate):
    no randomness, so deterministic for given data.
    """
    target = y.float()
    rate = target.mean(1).clamp(1e-4, 1 - 1e-4)
    weight = torch.zeros(x.shape[0], x.shape[2], requires_grad=True)
    bias = torch.log(rate / (1 - rate)).requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)

    from tqdm import tqdm

    for step in tqdm(range(steps), disable=not progress, desc="train-probes", unit="step"):
        for group in optimizer.param_groups:  # cosine decay to 10%, as for the heads
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))
        logit = torch.einsum("lnd,ld->ln", x, weight) + bias[:, None]
        loss = F.binary_cross_entropy_with_logits(logit, target, reduction="none").mean(1).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return weight.detach(), bias.detach()


def auc(score: Tensor, label: Tensor) -> float | None:
    """Area under the ROC curve (Mann-Whitney U); None when one class is absent."""
    pos = int(label.sum())
    neg = label.numel() - pos
    if not pos or not neg:
        return None
    ranks = torch.empty(score.numel(), dtype=torch.float64)
    ranks[score.argsort()] = torch.arange(1, score.numel() + 1, dtype=torch.float64)
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def probe_report(heads: ExitHeads, depths: tuple[int, ...], weight: Tensor, bias: Tensor, windows: Tensor,
                 batch_size: int, thresholds: tuple[float, ...] = PROBE_THRESHOLDS) -> dict:
    """Held-out: per depth, the label rate and how well each confidence ranks right from wrong (AUC,
    probe vs max_prob); per threshold and measure, the teacher-forced exits (first depth whose confidence
    reaches it, else the last layer): mean exit depth and share of exit tokens equal to the final layer's.
    Teacher-forced from a full-depth forward, so it ignores the engine's K/V propagation: an estimate."""
    model = heads.model[0]
    x, y, max_prob = probe_data(heads, depths, windows, batch_size)
    probe = torch.sigmoid(torch.einsum("lnd,ld->ln", x, weight) + bias[:, None])
    rows = [{"depth": d, "agreement": float(y[i].float().mean()), "auc_max_prob": auc(max_prob[i], y[i]),
             "auc_probe": auc(probe[i], y[i]),
             "probe_accuracy": float(((probe[i] >= 0.5) == y[i]).float().mean())} for i, d in enumerate(depths)]
    num_layers = model.config.num_layers
    simulated = []
    for t in thresholds:
        for measure, conf in (("max_prob", max_prob), ("probe", probe)):
            leave = conf >= t
            first = torch.where(leave.any(0), leave.float().argmax(0), len(depths))  # index of the exit depth
            exit_depth = torch.tensor((*depths, num_layers))[first]
            agree = torch.cat([y, torch.ones_like(y[:1])])[first, torch.arange(y.shape[1])]
            simulated.append({"threshold": t, "measure": measure, "mean_exit_depth": float(exit_depth.float().mean()),
                              "exit_agreement": float(agree.float().mean()),
                              "early_share": float((exit_depth < num_layers).float().mean())})
    return {"rows": rows, "simulated": simulated}


def format_probe_report(result: dict) -> str:
    """The table `helios train-exits --probes` prints."""
    lines = [
        (f"exit probes at depths {result['exit_layers']} of {result['num_layers']} layers, {result['steps']} steps "
         f"on {result['train_tokens']} tokens, {result['seconds']:.0f} s -> {result['out']}"),
        f"held-out: {result['eval_tokens']} tokens; AUC = how well the confidence ranks tokens equal to the final "
        "layer's above the others",
        f"{'depth':>5}  {'agreement w/ final':>18}  {'AUC max_prob':>12}  {'AUC probe':>9}  {'probe accuracy':>14}",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in result["rows"]:
        lines.append(f"{r['depth']:>5}  {r['agreement']:>18.1%}  {fmt(r['auc_max_prob']):>12}  "
                     f"{fmt(r['auc_probe']):>9}  {r['probe_accuracy']:>14.1%}")
    lines.append("teacher-forced exits: threshold, measure -> mean exit depth, early share, tokens equal to final")
    for s in result["simulated"]:
        lines.append(f"{s['threshold']:>5} {s['measure']:>8}  {s['mean_exit_depth']:6.2f}  {s['early_share']:6.1%}  "
                     f"{s['exit_agreement']:6.1%}")
    return "\n".join(lines)


# --- data ------------------------------------------------------------------------------------------
def load_corpus(specs: list[str] | None, tokenizer, train_tokens: int, eval_tokens: int, seq_len: int,
                seed: int) -> tuple[np.ndarray, Tensor]:
    """Training tokens (one array) and held-out windows (W, seq_len + 1), split by source weight.

    Reads only as much text as the run needs: training files in a seeded random order until the
    source's share of `train_tokens` is read; held-out files in order until its share of `eval_tokens`.
    """
    eos = tokenizer.eos_token_id
    rng = random.Random(seed)

    def tokens(files: list[Path], budget: int) -> list[int]:
        ids: list[int] = []
        for f in files:
            if len(ids) >= budget:
                break
            ids += tokenizer(f.read_text(encoding="utf-8", errors="replace"), verbose=False).input_ids + [eos]
        return ids

    train, windows = [], []
    for s in parse_sources(specs or []):
        held = [f for f in s.files if is_held_out(f)]
        files = [f for f in s.files if not is_held_out(f)]
        rng.shuffle(files)
        want_eval = max(int(s.weight * eval_tokens), seq_len + 1)
        want_train = max(int(s.weight * train_tokens), 2 * (seq_len + 1))
        if held:
            ids, val = tokens(files, want_train), tokens(held, want_eval)
        else:  # a tiny corpus: hold out its last tokens (at most a fifth of them)
            ids = tokens(files, want_train + want_eval)
            cut = len(ids) - min(want_eval, len(ids) // 5)
            ids, val = ids[:cut], ids[cut:]
        if len(ids) <= seq_len + 1 or len(val) < seq_len + 1:
            raise ValueError(f"data source {s.name!r} is too small: {len(ids)} training and {len(val)} held-out "
                             f"tokens for seq_len {seq_len}")
        train.extend(ids)
        n = min(len(val), want_eval) // (seq_len + 1)
        windows.append(torch.tensor(val[: n * (seq_len + 1)]).view(n, seq_len + 1))
    return np.asarray(train, dtype=np.int64), torch.cat(windows)


def sample_batch(data: np.ndarray, batch_size: int, seq_len: int, rng: random.Random) -> Tensor:
    starts = [rng.randrange(len(data) - seq_len - 1) for _ in range(batch_size)]
    return torch.from_numpy(np.stack([data[s : s + seq_len + 1] for s in starts]))


def format_report(result: dict) -> str:
    """The before/after table `helios train-exits` prints."""
    b, a = result["before"], result["after"]
    lines = [
        (f"exit heads at depths {result['exit_layers']} of {result['num_layers']} layers, {result['steps']} steps, "
         f"{result['seconds']:.0f} s -> {result['out']}"),
        f"held-out: {result['eval_tokens']} tokens; exits at max-probability >= {a['threshold']}",
        f"{'depth':>7}  {'agreement w/ final':>20}  {'perplexity':>17}  {'exit share':>15}",
    ]
    for rb, ra in zip(b["rows"], a["rows"]):
        depth = f"{ra['depth']}" + (" (out)" if ra["depth"] == result["num_layers"] else "")
        lines.append(f"{depth:>7}  {rb['agreement']:>9.1%} -> {ra['agreement']:<7.1%}  "
                     f"{rb['perplexity']:>7.4g} -> {ra['perplexity']:<7.4g}  "
                     f"{rb['exit_share']:>6.1%} -> {ra['exit_share']:<6.1%}")
    lines.append(f"at the threshold: mean exit depth {b['mean_exit_depth']:.2f} -> {a['mean_exit_depth']:.2f}, "
                 f"tokens equal to the final layer's {b['exit_agreement']:.1%} -> {a['exit_agreement']:.1%}")
    return "\n".join(lines)
