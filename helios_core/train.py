"""Train a small Llama-architecture early-exit model from scratch (the LayerSkip recipe), CPU or CUDA.

LayerSkip in brief: every layer's hidden state is decoded by the *shared* final norm + LM head and
trained with cross-entropy (the early-exit loss), and layers are dropped at random with a rate that
rises with depth, so shallow layers learn to predict on their own. The result is a plain Hugging Face
Llama checkpoint (config.json, model.safetensors, tokenizer.json) that transformers and Helios load.

Data is a weighted mix of named sources (`code=stdlib:0.8 prose=pydoc:0.2`); each batch row is drawn
from one source with probability equal to its weight, so models of one family can be given different
mixes. One file in 50 of every source (chosen by a hash of its path) is held out for validation and
evaluation. A family shares one tokenizer (`tokenizer=` another model's directory) so token-level
exit statistics compare across its models.

Resumable: every `checkpoint_every` steps the weights and optimizer state are written as safetensors
(never pickles) with a JSON of the step; running the same command again continues from there.
Deterministic for a given seed and thread count on CPU; on CUDA, bfloat16 autocast is used and runs
are reproducible only up to GPU kernel nondeterminism.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sysconfig
import time
import zlib
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
    corpus: list[str] = field(default_factory=list)  # data sources "[NAME=]PATH[:WEIGHT]"; default: stdlib
    tokenizer: str = ""  # reuse this directory's tokenizer.json instead of training one (a family shares it)
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
    device: str = "auto"  # "auto" = cuda when available
    save_dtype: str = "bfloat16"  # dtype of the exported model.safetensors (training state stays float32)


TEXT_SUFFIXES = {".py", ".txt", ".rst", ".md"}
PYDOC = Path("/usr/share/doc/python3.11/html/_sources")  # Debian package python3.11-doc (PSF licence)
# pydoc's held-out files, shipped (data/pydoc/LICENSE): evaluation needs no Debian package.
PYDOC_HELD_OUT = Path(__file__).parent / "data" / "pydoc" / PYDOC.name


def stdlib_files() -> list[Path]:
    """Python's standard library source (PSF licence), without its tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idlelib", "lib2to3"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


# Named sources usable in place of a path.
BUILTIN_SOURCES = {"stdlib": stdlib_files, "pydoc": lambda: _text_files(PYDOC)}


def held_out_files(source: str) -> list[Path]:
    """The held-out files of a builtin source, the text models are scored on: Python's own for
    stdlib, Helios' copies for pydoc (training on pydoc still needs the Debian package)."""
    if source == "pydoc":
        return _text_files(PYDOC_HELD_OUT)
    return [f for f in BUILTIN_SOURCES[source]() if is_held_out(f)]


@dataclass
class DataSource:
    name: str
    files: list[Path]
    weight: float


def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    if path.is_file():
        return [path]
    hint = " (install the Debian package python3.11-doc to train on it)" if path == PYDOC else ""
    raise FileNotFoundError(f"corpus path {path} does not exist{hint}")


def parse_source(spec: str) -> DataSource:
    """'[NAME=]PATH[:WEIGHT]' where PATH is a file, a directory, or a builtin name (stdlib, pydoc)."""
    name, _, rest = spec.rpartition("=")
    path, weight = rest, 1.0
    head, sep, tail = rest.rpartition(":")
    if sep:
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass  # a ':' inside the path
    if weight <= 0:
        raise ValueError(f"data source {spec!r}: weight must be positive")
    files = BUILTIN_SOURCES[path]() if path in BUILTIN_SOURCES else _text_files(Path(path))
    if not files:
        raise ValueError(f"data source {spec!r} has no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    return DataSource(name or Path(path).stem, files, weight)


def parse_sources(specs: list[str]) -> list[DataSource]:
    sources = [parse_source(s) for s in specs or ["code=stdlib"]]
    total = sum(s.weight for s in sources)
    for s in sources:
        s.weight /= total
    return sources


def is_held_out(path: Path) -> bool:
    """One file in 50, stable across machines: the hash is of the file name and its parent folder."""
    return zlib.crc32(f"{path.parent.name}/{path.name}".encode()) % 50 == 0


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
    positions = torch.arange(inputs.shape[1], device=tokens.device)[None]
    h = inner.embed_tokens(inputs)
    rope = inner.rotary_emb(h, position_ids=positions)
    n = len(inner.layers)
    exit_losses = []
    # Early-exit loss on a random subset of positions: the LM head is the costliest part of it.
    keep = torch.rand(targets.shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    keep = (keep < cfg.exit_loss_positions).to(tokens.device)
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
    tensors = load_file(str(out / "train_state.safetensors"), device=str(model.device))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    model.tie_weights()
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, field_name = key[6:].rsplit(".", 1)
            optimizer.state[params[name]][field_name] = value.reshape(()) if field_name == "step" else value
    return meta["step"], meta["log"]


@dataclass
class TokenizedSource:
    name: str
    weight: float
    train: np.ndarray  # the training files' tokens, concatenated with an end-of-text token after each
    val: np.ndarray  # the held-out files' tokens


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def prepare_data(cfg: TrainConfig, out: Path):
    """Tokenizer (trained once or borrowed, then reused) and each source as train/held-out token arrays."""
    from transformers import AutoTokenizer

    sources = parse_sources(cfg.corpus)
    if (out / "tokenizer.json").is_file() or cfg.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(str(out) if (out / "tokenizer.json").is_file() else cfg.tokenizer,
                                                  local_files_only=True)
        if len(tokenizer) != cfg.vocab:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but vocab={cfg.vocab}")
        tokenizer.save_pretrained(str(out))
    else:
        texts = [_read(f) for s in sources for f in s.files if not is_held_out(f)]
        tokenizer = train_tokenizer(texts, cfg.vocab)
        tokenizer.save_pretrained(str(out))
    eos = tokenizer.eos_token_id

    def tokens(files: list[Path]) -> np.ndarray:
        ids = tokenizer([_read(f) for f in files]).input_ids if files else []
        return np.asarray([t for seq in ids for t in seq + [eos]], dtype=np.int32)

    data = []
    for s in sources:
        train_files = [f for f in s.files if not is_held_out(f)]
        val_files = [f for f in s.files if is_held_out(f)] or train_files[-1:]  # tiny corpora: reuse one file
        data.append(TokenizedSource(s.name, s.weight, tokens(train_files), tokens(val_files)))
        if len(data[-1].train) <= cfg.seq_len + 1:
            raise ValueError(f"data source {s.name!r} has only {len(data[-1].train)} training tokens; "
                             f"seq_len is {cfg.seq_len}")
    return tokenizer, data


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def sample_batch(data: list[TokenizedSource], cfg: TrainConfig, rng: random.Random) -> torch.Tensor:
    """Each row: a source drawn by weight, then a random window of seq_len + 1 tokens from it."""
    rows = []
    for _ in range(cfg.batch_size):
        src = rng.choices(data, weights=[d.weight for d in data])[0]
        start = rng.randrange(len(src.train) - cfg.seq_len - 1)
        rows.append(src.train[start : start + cfg.seq_len + 1])
    return torch.from_numpy(np.stack(rows)).long()


def export(model, out: Path, dtype: str) -> None:
    """The HF checkpoint users load; a cast copy so training continues in float32."""
    copy.deepcopy(model).to(device="cpu", dtype=getattr(torch, dtype)).save_pretrained(str(out))


def train(cfg: TrainConfig, progress: bool = True, stop_at: int | None = None, time_limit: float | None = None) -> dict:
    """Train until cfg.steps, or until step `stop_at` or `time_limit` seconds (checkpointed, to continue later).

    steps=0 only trains (or borrows) the tokenizer and tokenizes the data.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    tokenizer, data = prepare_data(cfg, out)
    model = build_model(cfg, tokenizer.eos_token_id).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    step, log = 0, []
    if (out / "train_state.json").is_file():
        step, log = _load_state(out, model, optimizer)
    # bfloat16 autocast where it is fast (CUDA); CPU bf16 matmuls are slower than fp32 on AVX2 machines.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", unit="step")
    started = time.perf_counter()
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    while step < end:
        rng = random.Random(cfg.seed * 1_000_003 + step)  # per-step RNG: resuming replays the same batches
        batch = sample_batch(data, cfg, rng).to(device)
        for group in optimizer.param_groups:
            group["lr"] = _lr(cfg, step)
        model.train()
        with autocast:
            loss, final = layerskip_loss(model, batch, cfg, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{final:.3f}")
        out_of_time = time_limit is not None and time.perf_counter() - started > time_limit
        if step % cfg.checkpoint_every == 0 or step == end or out_of_time:
            with autocast:
                val = {d.name: validation_loss(model, d.val, cfg) for d in data}
            log.append({"step": step, "train_loss": final, "val_loss": sum(d.weight * val[d.name] for d in data),
                        "val_loss_by_source": val, "seconds": time.perf_counter() - started,
                        "tokens": step * cfg.batch_size * cfg.seq_len})
            _save_state(out, model, optimizer, step, cfg, log)
            export(model, out, cfg.save_dtype)
        if out_of_time:
            break
    bar.close()
    return {"steps": step, "tokens_seen": step * cfg.batch_size * cfg.seq_len, "log": log,
            "params": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def validation_loss(model, data: np.ndarray, cfg: TrainConfig, batches: int = 8) -> float:
    model.eval()
    n = min(batches, (len(data) - 1) // (cfg.seq_len + 1))
    chunks = [data[i * (cfg.seq_len + 1) : (i + 1) * (cfg.seq_len + 1)] for i in range(n)]
    batch = torch.from_numpy(np.stack(chunks)).long().to(model.device)
    logits = model(batch[:, :-1]).logits.float()
    return float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
