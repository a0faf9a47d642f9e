"""Train a small Llama-architecture early-exit model from scratch (the LayerSkip recipe) on CPU.

LayerSkip in brief: every layer's hidden state is decoded by the *shared* final norm + LM head and
trained with cross-entropy (the early-exit loss), and layers are dropped at random with a rate that
rises with depth, so shallow layers learn to predict on their own. The result is a plain Hugging Face
Llama checkpoint (config.json, model.safetensors, tokenizer.json) that transformers and Helios load.

Resumable: every `checkpoint_every` steps the weights and optimizer state are written as safetensors
(never pickles) with a JSON of the step; running the same command again continues from there.
Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import json
import math
import random
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

SPECIAL = "<|endoftext|>"


@dataclass
class TrainConfig:
    out: str
    corpus: list[str] = field(default_factory=list)  # files or directories of text; default: Python's stdlib
    layers: int = 4
    hidden: int = 192
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 512
    vocab: int = 2048
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 2000
    lr: float = 3e-3
    warmup: int = 100
    exit_loss_weight: float = 0.5  # weight of the mean early-exit loss next to the final loss
    exit_loss_positions: float = 0.25  # share of positions the early-exit loss is computed on (speed)
    max_layer_dropout: float = 0.1  # drop rate of the last layer; rises linearly from 0 at the first
    seed: int = 0
    checkpoint_every: int = 200
    threads: int = 2


def default_corpus() -> list[Path]:
    """Python's standard library source (PSF licence), without its tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idlelib", "lib2to3"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def corpus_files(paths: list[str]) -> list[Path]:
    if not paths:
        return default_corpus()
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in {".py", ".txt", ".rst", ".md"})
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus path {p} does not exist")
    if not files:
        raise ValueError(f"no text files under {paths}")
    return files


def train_tokenizer(texts: list[str], vocab: int):
    """Byte-level BPE (no unknown tokens) with one special token for end of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL, bos_token=SPECIAL, pad_token=SPECIAL)


def build_model(cfg: TrainConfig, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max(1024, cfg.seq_len), tie_word_embeddings=True,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    return LlamaForCausalLM(config)


def layerskip_loss(model, tokens: torch.Tensor, cfg: TrainConfig, rng: random.Random) -> tuple[torch.Tensor, float]:
    """Final-layer CE plus the mean early-exit CE over the layers that ran. Returns (loss, final CE)."""
    inner = model.model
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1])[None]
    h = inner.embed_tokens(inputs)
    rope = inner.rotary_emb(h, position_ids=positions)
    n = len(inner.layers)
    exit_losses = []
    # Early-exit loss on a random subset of positions: the LM head is the costliest part of it.
    keep = torch.rand(targets.shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    keep = keep < cfg.exit_loss_positions
    for i, layer in enumerate(inner.layers):
        if i < n - 1 and rng.random() < cfg.max_layer_dropout * i / max(n - 1, 1):
            continue  # layer dropout, rising with depth; the last layer always runs
        h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=positions)  # causal SDPA
        if i < n - 1 and keep.any():
            logits = model.lm_head(inner.norm(h[keep]))
            exit_losses.append(F.cross_entropy(logits, targets[keep]))
    final = F.cross_entropy(model.lm_head(inner.norm(h)).flatten(0, 1), targets.flatten())
    loss = final
    if exit_losses:
        loss = final + cfg.exit_loss_weight * torch.stack(exit_losses).mean()
    return loss, float(final.detach())


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_state(out: Path, model, optimizer, step: int, cfg: TrainConfig, log: list[dict]) -> None:
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = {p: n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"optim.{names[p]}.{key}"] = value.reshape(1) if value.dim() == 0 else value.contiguous()
    save_file(tensors, str(out / "train_state.safetensors"))
    (out / "train_state.json").write_text(json.dumps({"step": step, "config": asdict(cfg), "log": log}))


def _load_state(out: Path, model, optimizer) -> tuple[int, list[dict]]:
    meta = json.loads((out / "train_state.json").read_text())
    tensors = load_file(str(out / "train_state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    model.tie_weights()
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, field_name = key[6:].rsplit(".", 1)
            optimizer.state[params[name]][field_name] = value.reshape(()) if field_name == "step" else value
    return meta["step"], meta["log"]


def prepare_data(cfg: TrainConfig, out: Path):
    """Tokenizer (trained once, then reused) and the corpus as one token array."""
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in corpus_files(cfg.corpus)]
    if (out / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    else:
        tokenizer = train_tokenizer(texts, cfg.vocab)
        tokenizer.save_pretrained(str(out))
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text).input_ids + [eos]
    return tokenizer, np.asarray(ids, dtype=np.int32)


def train(cfg: TrainConfig, progress: bool = True, stop_at: int | None = None) -> dict:
    """Train until cfg.steps (or until step `stop_at`, checkpointed, to continue later)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer, data = prepare_data(cfg, out)
    split = int(len(data) * 0.98)  # the tail is held out for the validation loss
    train_data, val_data = data[:split], data[split:]
    model = build_model(cfg, tokenizer.eos_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    step, log = 0, []
    if (out / "train_state.json").is_file():
        step, log = _load_state(out, model, optimizer)

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", unit="step")
    started = time.perf_counter()
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    while step < end:
        rng = random.Random(cfg.seed * 1_000_003 + step)  # per-step RNG: resuming replays the same batches
        starts = [rng.randrange(len(train_data) - cfg.seq_len - 1) for _ in range(cfg.batch_size)]
        batch = torch.from_numpy(np.stack([train_data[s : s + cfg.seq_len + 1] for s in starts])).long()
        for group in optimizer.param_groups:
            group["lr"] = _lr(cfg, step)
        model.train()
        loss, final = layerskip_loss(model, batch, cfg, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{final:.3f}")
        if step % cfg.checkpoint_every == 0 or step == end:
            val = validation_loss(model, val_data, cfg)
            log.append({"step": step, "train_loss": final, "val_loss": val,
                        "seconds": time.perf_counter() - started, "tokens": step * cfg.batch_size * cfg.seq_len})
            _save_state(out, model, optimizer, step, cfg, log)
            model.save_pretrained(str(out))
    bar.close()
    return {"steps": step, "tokens_seen": step * cfg.batch_size * cfg.seq_len, "log": log,
            "params": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def validation_loss(model, data: np.ndarray, cfg: TrainConfig, batches: int = 8) -> float:
    model.eval()
    n = min(batches, (len(data) - 1) // (cfg.seq_len + 1))
    chunks = [data[i * (cfg.seq_len + 1) : (i + 1) * (cfg.seq_len + 1)] for i in range(n)]
    batch = torch.from_numpy(np.stack(chunks)).long()
    logits = model(batch[:, :-1]).logits
    return float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
