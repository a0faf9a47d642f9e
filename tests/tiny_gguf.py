"""Tiny GGUF files for tests, written the way llama.cpp's ``convert_hf_to_gguf.py`` writes them.

:func:`gguf_ready_checkpoint` builds a tiny checkpoint with ``tiny_models`` whose config the
GGUF format can express; :func:`write_gguf` writes a Hugging Face directory as a GGUF file with
the ``gguf`` package's ``GGUFWriter``: llama.cpp's tensor names, Llama's Q/K rows permuted for
its rotary layout, Gemma's norm weights stored as ``1 + w``, 1-D tensors in F32 and the rest in
F32 or a quantized type (``gguf.quants.quantize``), and a tokenizer with special-token ids,
``add_bos_token`` and an optional chat template: Llama's is the tiny model's own byte-level BPE
(gpt2-style, with merges); Gemma's is a sentencepiece-style vocabulary as llama.cpp writes for
Gemma (``<pad> <eos> <bos> <unk>``, byte-fallback tokens, ``\u2581`` pieces, no merges), since
transformers rebuilds a Gemma file's tokenizer as a ``GemmaTokenizer``.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

import tiny_models

GGUF_ARCH = {"llama": "llama", "gemma3_text": "gemma3"}  # HF model_type -> GGUF architecture
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_BYTE = 1, 3, 6  # llama.cpp's token types
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0..3, as in Gemma's vocabulary
_GEMMA_VOCAB_TEXT = tiny_models.SAMPLE_PROMPT + " The quick brown fox jumps over the lazy dog. def fibonacci(n): return"


def gguf_ready_checkpoint(family: str, path, num_layers: int = 4) -> pathlib.Path:
    """``tiny_models.make_tiny_checkpoint``, with a config a GGUF round trip keeps.

    A Gemma 3 GGUF states neither its layer pattern, its local RoPE, its RoPE scaling nor its
    query scale: llama.cpp and transformers take Gemma 3's defaults for them. The tiny Gemma's
    config is set to those defaults (its weights do not depend on them), keeping its window and
    its global RoPE base, which the file does state.
    """
    from transformers import Gemma3TextConfig

    path = tiny_models.make_tiny_checkpoint(family, path, num_layers=num_layers)
    if family != "gemma3":
        return path
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    defaults = Gemma3TextConfig(num_hidden_layers=num_layers)
    config["layer_types"] = defaults.layer_types
    config["query_pre_attn_scalar"] = defaults.query_pre_attn_scalar
    config["rope_parameters"] = {
        "sliding_attention": defaults.rope_parameters["sliding_attention"],
        "full_attention": {"rope_type": "default",
                           "rope_theta": config["rope_parameters"]["full_attention"]["rope_theta"]},
    }
    config_path.write_text(json.dumps(config, indent=2))
    return path


def write_gguf(model_dir, path, qtype: str = "F32", *, add_bos_token: bool = False,
               chat_template: str | None = None, architecture: str | None = None) -> pathlib.Path:
    """Write the model in ``model_dir`` to ``path`` as GGUF; 2-D tensors as ``qtype`` ("F32", "Q8_0"...).

    ``architecture`` overrides ``general.architecture`` (to test refusals).
    """
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    model_dir, path = pathlib.Path(model_dir), pathlib.Path(path)
    config = AutoConfig.from_pretrained(model_dir)
    arch = architecture or GGUF_ARCH[config.model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {config.model_type}")
    _add_hparams(writer, config)
    if config.model_type == "gemma3_text":
        _add_gemma_tokenizer(writer, config.vocab_size)
    else:
        _add_bpe_tokenizer(writer, model_dir, config)
    writer.add_add_bos_token(add_bos_token)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    qtype_id = gguf.GGMLQuantizationType[qtype]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[GGUF_ARCH[config.model_type].upper()],
                                     config.num_hidden_layers)
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        data = _llama_cpp_layout(name, tensor.astype(np.float32), config)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if data.ndim == 1 or qtype_id == gguf.GGMLQuantizationType.F32:  # llama.cpp keeps 1-D in F32
            writer.add_tensor(gguf_name, data)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype_id), raw_dtype=qtype_id)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_hparams(writer, config) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.model_type == "gemma3_text":
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
        writer.add_sliding_window(config.sliding_window)
    else:
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_vocab_size(config.vocab_size)


def _add_bpe_tokenizer(writer, model_dir: pathlib.Path, config) -> None:
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"] | {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tokenizer["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TOKEN_CONTROL if t in special else TOKEN_NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)


def _add_gemma_tokenizer(writer, vocab_size: int) -> None:
    """``vocab_size`` tokens: specials, 256 byte tokens, then characters and word prefixes."""
    pieces = sorted(set(_GEMMA_VOCAB_TEXT) - {" "}) + ["\u2581"]
    for word in _GEMMA_VOCAB_TEXT.split():
        pieces.extend("\u2581" + word[:k] for k in range(1, len(word) + 1))
    tokens = list(GEMMA_SPECIALS) + [f"<0x{b:02X}>" for b in range(256)]
    tokens += list(dict.fromkeys(p for p in pieces if p not in tokens))
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    assert len(tokens) == vocab_size, (len(tokens), vocab_size)
    types = [TOKEN_CONTROL] * len(GEMMA_SPECIALS) + [TOKEN_BYTE] * 256
    types += [TOKEN_NORMAL] * (vocab_size - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_token_types(types)
    for name, token_id in zip(("pad", "eos", "bos", "unk"), range(4)):
        getattr(writer, f"add_{name}_token_id")(token_id)


def _llama_cpp_layout(name: str, data: np.ndarray, config) -> np.ndarray:
    """The transforms llama.cpp applies on conversion, which a GGUF reader has to undo."""
    if config.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
        return _permute_rotary_rows(data, heads)
    if config.model_type == "gemma3_text" and name.endswith("norm.weight"):
        return data + 1.0  # Gemma scales by (1 + w); llama.cpp stores the scale itself
    return data


def _permute_rotary_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half layout -> llama.cpp's interleaved pairs
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))
