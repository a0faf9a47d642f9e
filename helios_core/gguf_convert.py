"""GGUF file -> plain Hugging Face model directory (config, safetensors, tokenizer, generation config).

Small instruction models are often published only as llama.cpp GGUF files, while our decoder
(`helios_core.models`) reads Hugging Face directories. This converts once, offline, with
transformers' own GGUF support doing all the work that has to match llama.cpp exactly: the config
comes from `AutoConfig.from_pretrained(..., gguf_file=...)` (so it equals what transformers uses
when it loads the GGUF itself, Gemma 3's sliding-window defaults included), the weights from
`load_gguf_checkpoint` (the `gguf` package's dequantization, with llama.cpp's Q/K row permutation
and Gemma's `+1` on norm weights undone) and the tokenizer from `AutoTokenizer(..., gguf_file=...)`.
The result is dequantized (float32 or bfloat16) and carries no `quantization_config`.

The model is built on the meta device and the dequantized tensors are assigned to it, so nothing
is initialised twice and `accelerate` is not needed. Weights are written with safetensors only.
The directory is built beside the target and renamed into place, so a half-written model never
appears under the target name.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable

import torch

# Bump when the written directory changes for the same GGUF (`helios pull` records it).
CONVERTER_VERSION = 1

# transformers model_type (as parsed from the GGUF) -> the GGUF architecture name it comes from.
# llama.cpp writes Mistral models as "llama"; transformers tells them apart by the model name.
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "gemma3_text": "gemma3"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_GGUF_MAGIC = b"GGUF"

Progress = Callable[[str], None]


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32",
                 progress: Progress | None = None, force: bool = False) -> Path:
    """Convert ``gguf_path`` into a Hugging Face directory at ``out_dir``; return its path.

    ``dtype`` is the weight type written ("float32" or "bfloat16"). ``progress`` receives one
    line per step. An existing non-empty ``out_dir`` is refused unless ``force`` (then replaced).
    Raises FileNotFoundError, FileExistsError or ValueError (not a GGUF, unsupported architecture
    or dtype) with a message naming the problem.
    """
    say = progress or (lambda _line: None)
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir).resolve()
    _check_input(gguf_path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    _check_output(out_dir, force)

    say(f"reading the config of {gguf_path.name}")
    config = _read_config(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        say(f"dequantizing {gguf_path.name} to {dtype} ({config.model_type}, {config.num_hidden_layers} layers)")
        _write_model(gguf_path, config, DTYPES[dtype], staging)
        say("converting the tokenizer")
        _write_tokenizer(gguf_path, staging)
        _make_readable(staging)
        move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _check_output(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass --force / force=True to replace it)")


def _check_input(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with path.open("rb") as f:
        if f.read(len(_GGUF_MAGIC)) != _GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def _read_config(gguf_path: Path):
    """The config transformers itself builds for this GGUF; refuses architectures we do not convert."""
    from transformers import AutoConfig

    supported = ", ".join(sorted(set(SUPPORTED_MODEL_TYPES.values())))
    try:
        config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, IndexError, KeyError, struct.error) as err:
        if "architecture" in str(err):  # transformers names the architecture it does not know
            raise ValueError(f"{gguf_path}: {err} helios convert supports: {supported}") from None
        raise ValueError(f"{gguf_path} could not be read as GGUF ({err}); is it truncated or damaged?") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{gguf_path}: architecture {config.model_type!r} is not supported by helios convert "
                         f"(supported: {supported})")
    return config


def _write_model(gguf_path: Path, config, dtype: torch.dtype, out: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config.dtype = dtype
    with torch.device("meta"):  # shapes and names only: the GGUF provides every value
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model,
                                   torch_dtype=dtype)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{gguf_path}: the GGUF's tensors do not match the {config.model_type} model "
                         f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    # Non-persistent buffers (rotary frequencies, embedding scales) are recomputed at load; they are
    # never saved, so they can stay on the meta device.
    model.save_pretrained(str(out), safe_serialization=True)


def _write_tokenizer(gguf_path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # Keep the chat template inside tokenizer_config.json, where every transformers version reads it.
    tokenizer.save_pretrained(str(out), save_jinja_files=False)
    # tokenizer.json's post-processor already adds BOS/EOS as the GGUF says; the flags are written
    # too so the config states it. The loading flags from_pretrained recorded mean nothing here.
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    for key in ("add_bos_token", "add_eos_token"):
        if tokenizer.init_kwargs.get(key) is not None:
            config[key] = bool(tokenizer.init_kwargs[key])
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _make_readable(directory: Path) -> None:
    """mkdtemp (and transformers' atomic saves) create private files; a model is ordinary data."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished ``staging`` directory to ``out_dir`` (same filesystem), replacing what is there."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out_dir)
