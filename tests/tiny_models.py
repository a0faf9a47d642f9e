"""Tiny Hugging Face checkpoints for tests.

Everything here is built offline: a byte-level BPE tokenizer trained on a small inline corpus,
and tiny models built from ``transformers`` configs with random weights, saved with
``save_pretrained`` (safetensors). ``transformers`` then serves as the numerical oracle for our
own decoder (:func:`hf_greedy`, :func:`hf_logits`).

Public API
----------
- ``FAMILIES``: names accepted by :func:`make_tiny_checkpoint`.
- :func:`build_tokenizer(path)`: deterministic ~384-token byte-level BPE tokenizer.
- :func:`make_tiny_checkpoint(family, path, ...)`: a model directory (config, safetensors,
  generation config, tokenizer).
- :func:`make_pickle_checkpoint(path)`: a llama directory holding only ``pytorch_model.bin``.
- :func:`hf_greedy(path, prompt_ids, max_new_tokens)`: greedy continuation by ``generate``.
- :func:`hf_greedy_with_margins(...)`: the same plus the top-1 minus top-2 logit margins.
- :func:`hf_logits(path, input_ids)`: ``(1, T, V)`` logits from one plain forward.
- ``TEST_CRASH_PROMPT``: text that kills an engine process of the suite's Ray cluster.

Weights are re-initialised with a larger spread than transformers' default (std 0.02) so that
greedy decoding usually has clear margins between the top-1 and top-2 logits. Near-ties are
rare but possible for an arbitrary prompt (about 1 prompt in 100 has a step with a margin
below 1e-3 within 32 tokens); ``SAMPLE_PROMPT`` is checked, others can be checked with
:func:`hf_greedy_with_margins`.
"""

from __future__ import annotations

import copy
import functools
import pathlib
from typing import Any

import torch

FAMILIES: tuple[str, ...] = (
    "llama_gqa",    # GQA (4 q heads / 2 kv heads), untied embeddings
    "llama_tied",   # MHA, tied embeddings
    "llama3_rope",  # llama3 rope scaling (rope_parameters rope_type="llama3")
    "llama_bias",   # attention_bias=True, mlp_bias=True
    "qwen2",        # qkv bias, GQA, tied
    "mistral",      # GQA, sliding_window=16
    "gemma3",       # gemma3_text: local (window 16) and global layers with their own RoPE, q/k norms, tied
    "opt",          # pre-norm (do_layer_norm_before), learned positions (offset 2), tied
    "gpt2",         # Conv1D (transposed) weights, learned positions, tied
)

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_VOCAB_SIZE = 384
MAX_POSITIONS = 256
NUM_HEADS = 4
NUM_KV_HEADS_GQA = 2
MISTRAL_SLIDING_WINDOW = 16

# Gemma 3 (gemma3_text): head_dim != hidden / heads and query_pre_attn_scalar != head_dim, so the
# attention scale and the head shapes are tested; every third layer from layer 1 is global (4 layers:
# local, global, local, local), the rest attend within GEMMA3_SLIDING_WINDOW; the global layers
# rotate with a linearly scaled RoPE of another base than the local layers'.
GEMMA3_SLIDING_WINDOW = 16
GEMMA3_HEAD_DIM = 32
GEMMA3_NUM_KV_HEADS = 1
GEMMA3_QUERY_PRE_ATTN_SCALAR = 24
GEMMA3_ROPE_PARAMETERS: dict[str, Any] = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
}


def gemma3_layer_types(num_layers: int) -> list[str]:
    return ["full_attention" if i % 3 == 1 else "sliding_attention" for i in range(num_layers)]

# llama3 rope scaling. With head_dim 16 and theta 1e4 the rotary wavelengths are
# 6.3, 19.9, 62.8, 199, 628, ... so with original_max_position_embeddings=64 (low-freq wavelength
# 64, high-freq wavelength 16) all three branches of the llama3 formula are used: unscaled,
# smoothly interpolated and divided by `factor`.
LLAMA3_ROPE_PARAMETERS: dict[str, Any] = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# A prompt for which every family (default size, and llama_gqa with 6 layers) greedily generates
# 64 tokens with top-1 minus top-2 logit margins > 1e-3 at every step (measured min 5.9e-3).
SAMPLE_PROMPT = "Serving many requests at once"
# A prompt holding this kills its engine process in the suite's Ray cluster (conftest.serve_cluster
# sets helios_core.engine_process.CRASH_PROMPT_ENV to it; tests/test_hostile_input.py sends it).
TEST_CRASH_PROMPT = "<helios test: crash the engine>"

# Re-initialisation spreads (see _reinit_weights).
WEIGHT_STD = 0.2
NORM_PERTURB_STD = 0.1
BIAS_STD = 0.1
# Gain of the final norm (before lm_head): scales the logits (std ~ 0.2 * sqrt(hidden) * gain,
# about 6; max |logit| about 30) so top-1/top-2 margins clear an absolute 1e-3 bar.
FINAL_NORM_GAIN = 4.0
# Gemma normalises each sublayer's output before adding it to the residual stream. At unit scale the
# token embedding (times sqrt(hidden)) dominates that stream, and the tied LM head then mostly predicts
# the input token; this gain on those norms gives the tiny Gemma the other families' behaviour.
SANDWICH_NORM_GAIN = 4.0
_SANDWICH_NORM_WEIGHTS = (".post_attention_layernorm.weight", ".post_feedforward_layernorm.weight")
_FINAL_NORM_WEIGHTS = (
    "model.norm.weight",  # llama, qwen2, mistral, gemma3
    "transformer.ln_f.weight",  # gpt2
    "model.decoder.final_layer_norm.weight",  # opt (not layers.N.final_layer_norm: MLP pre-norm)
)

_ONE_PLUS_WEIGHT_NORMS = ("gemma3_text",)  # model types whose norms scale by 1 + weight

_CORPUS = [
    '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    seq = [0, 1]
    while len(seq) < n:
        seq.append(seq[-1] + seq[-2])
    return seq[:n]


class Cache:
    def __init__(self, capacity=128):
        self.capacity = capacity
        self.items = {}

    def get(self, key, default=None):
        return self.items.get(key, default)

    def put(self, key, value):
        if len(self.items) >= self.capacity:
            self.items.pop(next(iter(self.items)))
        self.items[key] = value
''',
    '''import torch

def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    x = x - x.max(dim=dim, keepdim=True).values
    e = x.exp()
    return e / e.sum(dim=dim, keepdim=True)

for i, layer in enumerate(model.layers):
    hidden = layer(hidden, position_ids=positions)
    if exit_head(hidden).max() > threshold:
        break
print(f"exited at layer {i} of {len(model.layers)}")
''',
    "The quick brown fox jumps over the lazy dog. A large language model predicts the next "
    "token from the tokens before it, one step at a time, and an early-exit model may stop "
    "after only a few of its layers when it is already confident about the answer.",
    "Serving many requests at once means batching them together: the scheduler keeps a queue, "
    "the engine runs a forward pass for every active sequence, and finished sequences leave the "
    "batch while new ones join. Memory for the key and value cache is the scarce resource.",
    "Café, naïve, résumé, façade and jalapeño are borrowed words. Straße is German for street; "
    "Ελληνικά means Greek; Русский текст; 日本語のテキスト; 中文文本; emoji like 🚀 and ✨ "
    "are several bytes long in UTF-8. Ångström, Øresund, São Paulo, Zürich, Kraków.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness. Numbers such as 3.14159, 2.71828 and 1,000,000 appear in text too.",
]


def _corpus_lines() -> list[str]:
    lines: list[str] = []
    for text in _CORPUS:
        lines.extend(line for line in text.splitlines() if line.strip())
    return lines


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; return the serialized tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tok.to_str()


def _make_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_json())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def build_tokenizer(path, chat_template: str | None = None,
                    add_bos: bool = False) -> "PreTrainedTokenizerFast":  # noqa: F821
    """Build the deterministic test tokenizer and save it to ``path``.

    Byte-level BPE (~384 tokens: 256 byte symbols, ``<|endoftext|>`` and merges learnt from the
    inline corpus). ``<|endoftext|>`` is eos, bos and pad; ``add_bos``: encoding puts it first.
    ``AutoTokenizer.from_pretrained(path)`` loads it back, with ``chat_template`` if given.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _make_tokenizer()
    tokenizer.add_bos_token = add_bos
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(path))
    return tokenizer


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _intermediate(hidden: int) -> int:
    return hidden * 5 // 2


def _make_config(family: str, *, vocab_size: int, eos_id: int, num_layers: int, hidden: int):
    from transformers import (
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
    )

    special = dict(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=_intermediate(hidden),
        num_hidden_layers=num_layers,
        num_attention_heads=NUM_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        **special,
    )
    rope_default = {"rope_type": "default", "rope_theta": 10000.0}
    if family == "llama_gqa":
        return LlamaConfig(
            **common, num_key_value_heads=NUM_KV_HEADS_GQA, tie_word_embeddings=False,
            rope_parameters=dict(rope_default),
        )
    if family == "llama_tied":
        return LlamaConfig(
            **common, num_key_value_heads=NUM_HEADS, tie_word_embeddings=True,
            rope_parameters=dict(rope_default),
        )
    if family == "llama3_rope":
        return LlamaConfig(
            **common, num_key_value_heads=NUM_KV_HEADS_GQA, tie_word_embeddings=False,
            rope_parameters=dict(LLAMA3_ROPE_PARAMETERS),
        )
    if family == "llama_bias":
        return LlamaConfig(
            **common, num_key_value_heads=NUM_KV_HEADS_GQA, tie_word_embeddings=False,
            attention_bias=True, mlp_bias=True, rope_parameters=dict(rope_default),
        )
    if family == "qwen2":
        return Qwen2Config(
            **common, num_key_value_heads=NUM_KV_HEADS_GQA, tie_word_embeddings=True,
            use_sliding_window=False, rope_parameters=dict(rope_default),
        )
    if family == "mistral":
        return MistralConfig(
            **common, num_key_value_heads=NUM_KV_HEADS_GQA, tie_word_embeddings=False,
            sliding_window=MISTRAL_SLIDING_WINDOW, rope_parameters=dict(rope_default),
        )
    if family == "gemma3":
        return Gemma3TextConfig(
            **common, num_key_value_heads=GEMMA3_NUM_KV_HEADS, head_dim=GEMMA3_HEAD_DIM,
            query_pre_attn_scalar=GEMMA3_QUERY_PRE_ATTN_SCALAR, sliding_window=GEMMA3_SLIDING_WINDOW,
            layer_types=gemma3_layer_types(num_layers), rope_parameters=copy.deepcopy(GEMMA3_ROPE_PARAMETERS),
            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        )
    if family == "opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            word_embed_proj_dim=hidden,
            ffn_dim=_intermediate(hidden),
            num_hidden_layers=num_layers,
            num_attention_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
            do_layer_norm_before=True,
            activation_function="relu",
            dropout=0.0,
            attention_dropout=0.0,
            layerdrop=0.0,
            tie_word_embeddings=True,
            **special,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=MAX_POSITIONS,
            n_embd=hidden,
            n_layer=num_layers,
            n_head=NUM_HEADS,
            n_inner=_intermediate(hidden),
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **special,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _is_norm_weight(name: str) -> bool:
    leaf = name.rsplit(".", 2)
    owner = leaf[-2] if len(leaf) >= 2 else ""
    return "norm" in owner or owner.startswith("ln_") or owner == "ln_f"


@torch.no_grad()
def _reinit_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic re-initialisation with a larger spread than transformers' default.

    Matrices (Linear / Conv1D / Embedding weights) ~ N(0, WEIGHT_STD); norm weights
    1 + N(0, NORM_PERTURB_STD), the final norm additionally times FINAL_NORM_GAIN; norm and
    layer biases ~ N(0, BIAS_STD). Tied parameters appear once in ``named_parameters`` and are
    therefore initialised once.

    Gemma's norms (its q/k norms included) scale by 1 + weight, and transformers initialises
    their weights to 0 (identity). Here they store the offset from 1 of the same random scales,
    so a norm whose weight was ignored or misread would show; its sandwich norms (on the
    sublayer outputs) get SANDWICH_NORM_GAIN on top.
    """
    gen = torch.Generator().manual_seed(seed + 1234)
    one_plus_weight = model.config.model_type in _ONE_PLUS_WEIGHT_NORMS
    for name, param in model.named_parameters():
        shape = param.shape
        if _is_norm_weight(name) and name.endswith(".weight"):
            value = 1.0 + NORM_PERTURB_STD * torch.randn(shape, generator=gen)
            if name in _FINAL_NORM_WEIGHTS:
                value = FINAL_NORM_GAIN * value
            if one_plus_weight:
                if name.endswith(_SANDWICH_NORM_WEIGHTS):  # (Llama's post_attention_layernorm is an input norm)
                    value = SANDWICH_NORM_GAIN * value
                value = value - 1.0
        elif param.ndim >= 2:
            value = WEIGHT_STD * torch.randn(shape, generator=gen)
        else:  # biases (Linear, Conv1D, LayerNorm)
            value = BIAS_STD * torch.randn(shape, generator=gen)
        param.copy_(value.to(param.dtype))


def make_tiny_checkpoint(
    family: str,
    path,
    *,
    num_layers: int = 4,
    hidden: int = 64,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    seed: int = 0,
    chat_template: str | None = None,
    add_bos: bool = False,
) -> pathlib.Path:
    """Build a tiny random ``family`` model and save it (safetensors) with its tokenizer
    (``chat_template``, ``add_bos``: ``build_tokenizer``'s).

    ``max_shard_size`` is passed to ``save_pretrained`` (e.g. ``"20KB"`` gives several
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``).
    Returns the directory path.
    """
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path, chat_template, add_bos)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = _make_config(
        family, vocab_size=len(tokenizer), eos_id=eos_id, num_layers=num_layers, hidden=hidden
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit_weights(model, seed)
    model.generation_config.bos_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model = model.to(dtype).eval()
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(path), **save_kwargs)
    return path


def make_pickle_checkpoint(path) -> pathlib.Path:
    """A llama directory with ``config.json`` and a pickled ``pytorch_model.bin`` only.

    No ``*.safetensors`` file is written (used to check that loaders refuse pickles).
    """
    from transformers import AutoModelForCausalLM

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = _make_config(
        "llama_gqa", vocab_size=len(tokenizer), eos_id=eos_id, num_layers=2, hidden=64
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit_weights(model, 0)
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(path))
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


# --------------------------------------------------------------------------------------------
# transformers as the oracle
# --------------------------------------------------------------------------------------------


def _load_hf(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.to("cpu").eval()


@torch.no_grad()
def hf_greedy_with_margins(
    path, prompt_ids: list[int], max_new_tokens: int
) -> tuple[list[int], list[float]]:
    """Like :func:`hf_greedy`, also returning the top-1 minus top-2 logit margin of each step."""
    model = _load_hf(path)
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=None,  # no eos masking: the ids stay the plain argmax
        eos_token_id=None,  # overrides generation_config.json: eos does not stop generation
        pad_token_id=model.config.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, input_ids.shape[1]:].tolist()
    if len(new) != max_new_tokens:
        raise AssertionError(f"generate returned {len(new)} tokens, expected {max_new_tokens}")
    top2 = torch.stack(out.logits)[:, 0].float().topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    return new, margins


def hf_greedy(path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt_ids`` by transformers' ``generate(do_sample=False)``.

    Loads ``path`` with ``AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)`` on
    CPU. Returns only the ``max_new_tokens`` new ids (the prompt is not included). eos neither
    stops generation (``eos_token_id=None``) nor is masked out, so the ids are exactly the argmax
    at every step (with the KV cache transformers uses by default).
    """
    return hf_greedy_with_margins(path, prompt_ids, max_new_tokens)[0]


@torch.no_grad()
def hf_logits(path, input_ids) -> torch.Tensor:
    """``(1, T, V)`` float32 logits from a plain forward (no cache) over ``input_ids``."""
    model = _load_hf(path)
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits.float()


def run_to_completion(engine) -> dict[str, list[int]]:
    """Step an engine until idle; request id -> generated token ids."""
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens
