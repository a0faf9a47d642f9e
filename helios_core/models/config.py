"""One config for every decoder family we run, read from a Hugging Face `config.json`.

The families differ in a handful of switches (norm kind, activation, position encoding, biases, per-layer
attention windows); `ModelConfig` names those switches so `transformer.py` is one model, not six.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3_text", "opt", "gpt2")
ACTIVATIONS = ("silu", "swish", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    scaling: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm: str  # "rms" | "gemma_rms" (normalised x * (1 + weight), all in fp32) | "layer"
    norm_eps: float
    activation: str  # key of ACTIVATIONS
    gated_mlp: bool  # SwiGLU-style gate/up projections (Llama) vs a plain fc1/fc2 MLP (OPT, GPT-2)
    positions: str  # "rope" | "learned"
    rope: RopeConfig = field(default_factory=RopeConfig)  # of every layer, or only the global ones with local_rope
    local_rope: RopeConfig | None = None  # Gemma 3: the RoPE of the local (sliding-window) layers
    position_offset: int = 0  # OPT stores learned positions shifted by 2
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    # Per layer: the sliding attention window of a local layer, None for a global (full-attention) layer.
    # Empty means every layer is global. Mistral: every layer local; Gemma 3: local and global interleaved.
    layer_windows: tuple[int | None, ...] = ()
    embed_scale: float = 1.0  # Gemma: token embeddings times sqrt(hidden_size)
    qk_norm: bool = False  # Gemma 3: per-head norm of q and k (over head_dim) before RoPE
    sandwich_norms: bool = False  # Gemma: the attention and MLP outputs are normalised too, before the residual add
    attn_scale: float | None = None  # softmax scale of q·k; None = head_dim ** -0.5
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self):
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(f"{len(self.layer_windows)} layer windows for {self.num_layers} layers")

    def rope_index(self, layer: int) -> int:
        """Which RoPE table `layer` rotates with: 0 = `rope`, 1 = `local_rope` (local layers, when set)."""
        return int(self.local_rope is not None and self.layer_windows[layer] is not None)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_share(self) -> float:
        """The attention half's share of a block's per-row matmul work (Q/K/V and output projections
        over all of them): what a row that exited below a layer still costs there, since it writes
        the layer's K/V and the decode step runs attention on the whole batch (runner.py)."""
        attention = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size
        return attention / (attention + mlp)

    def kv_bytes_per_token_per_layer(self, element_size: int) -> int:
        """K and V for one token in one layer."""
        return 2 * self.kv_size * element_size

    @staticmethod
    def from_pretrained(path: str | Path) -> "ModelConfig":
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model path {str(path)!r} is not a directory")
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}: not a Hugging Face model directory")
        return ModelConfig.from_hf_dict(json.loads(config_file.read_text()))

    @staticmethod
    def from_hf_dict(hf: dict[str, Any]) -> "ModelConfig":
        model_type = hf.get("model_type")
        reader = _READERS.get(model_type)
        if reader is None:
            hint = _HINTS.get(model_type, "")
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r} ({hf.get('architectures')}){hint}; "
                f"supported model_type values: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        config = reader(hf)
        if config.activation not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"unsupported activation {config.activation!r}; supported: {', '.join(ACTIVATIONS)}"
            )
        return config


def _eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _rope(hf: dict[str, Any]) -> RopeConfig:
    # transformers 5 nests RoPE settings in `rope_parameters`; older files use rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return _rope_config(params, hf.get("rope_theta", 10000.0))


def _rope_config(params: dict[str, Any], default_theta: float) -> RopeConfig:
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", default_theta))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, scaling="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            scaling="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedModelError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")


def _llama_like(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf["model_type"]
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    window = None
    if model_type == "mistral":
        window = hf.get("sliding_window")  # one window for every layer
    elif model_type == "qwen2" and hf.get("use_sliding_window"):
        raise UnsupportedModelError("qwen2 with use_sliding_window=true is not supported")
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm="rms",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=hf.get("hidden_act", "silu"),
        gated_mlp=True,
        positions="rope",
        rope=_rope(hf),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        out_bias=model_type == "llama" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        layer_windows=(window,) * hf["num_hidden_layers"] if window is not None else (),
        eos_token_ids=_eos_ids(hf),
        bos_token_id=hf.get("bos_token_id"),
    )


GEMMA3_LAYER_TYPES = ("sliding_attention", "full_attention")


def _gemma3_text(hf: dict[str, Any]) -> ModelConfig:
    """Gemma 3's text model, as transformers' Gemma3TextConfig reads its config.json."""
    for option in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(option) is not None:
            raise UnsupportedModelError(f"gemma3_text with {option}={hf[option]} is not supported")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError("gemma3_text with use_bidirectional_attention=true is not supported")
    num_layers, heads, hidden = hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"]
    layer_types = hf.get("layer_types")
    if layer_types is None:  # older configs: every `sliding_window_pattern`-th layer is global
        pattern = hf.get("sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers or not set(layer_types) <= set(GEMMA3_LAYER_TYPES):
        raise UnsupportedModelError(
            f"gemma3_text layer_types must be {num_layers} of {', '.join(GEMMA3_LAYER_TYPES)}, got {layer_types}"
        )
    window = hf.get("sliding_window", 4096)
    if window is None and "sliding_attention" in layer_types:
        raise UnsupportedModelError("gemma3_text with sliding_attention layers but no sliding_window is not supported")

    # transformers 5: rope_parameters per layer type; older files: rope_theta (+ rope_scaling) for the global
    # layers and rope_local_base_freq for the local ones. The defaults are Gemma3TextConfig's.
    params = hf.get("rope_parameters")
    if params and not set(params) <= set(GEMMA3_LAYER_TYPES):
        raise UnsupportedModelError(f"gemma3_text rope_parameters must be given per layer type, got {params}")
    if params:
        global_params, local_params = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:
        global_params, local_params = hf.get("rope_scaling") or {}, {}

    return ModelConfig(
        model_type="gemma3_text",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 131_072),
        norm="gemma_rms",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        gated_mlp=True,
        positions="rope",
        rope=_rope_config(global_params, hf.get("rope_theta", 1_000_000.0)),
        local_rope=_rope_config(local_params, hf.get("rope_local_base_freq", 10_000.0)),
        qkv_bias=bool(hf.get("attention_bias", False)),
        out_bias=bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        layer_windows=tuple(window if kind == "sliding_attention" else None for kind in layer_types),
        embed_scale=hidden**0.5,
        qk_norm=True,
        sandwich_norms=True,
        attn_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5,
        eos_token_ids=_eos_ids(hf),
        bos_token_id=hf.get("bos_token_id"),
    )


def _opt(hf: dict[str, Any]) -> ModelConfig:
    if not hf.get("do_layer_norm_before", True):
        raise UnsupportedModelError("OPT with do_layer_norm_before=false (post-norm, e.g. opt-350m) is not supported")
    if hf.get("word_embed_proj_dim", hf["hidden_size"]) != hf["hidden_size"]:
        raise UnsupportedModelError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported")
    if hf.get("_remove_final_layer_norm", False) or not hf.get("layer_norm_elementwise_affine", True):
        raise UnsupportedModelError("OPT without an affine final layer norm is not supported")
    heads = hf["num_attention_heads"]
    bias = bool(hf.get("enable_bias", True))
    return ModelConfig(
        model_type="opt",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hf["hidden_size"] // heads,
        intermediate_size=hf["ffn_dim"],
        max_position_embeddings=hf["max_position_embeddings"],
        norm="layer",
        norm_eps=1e-5,
        activation=hf.get("activation_function", "relu"),
        gated_mlp=False,
        positions="learned",
        position_offset=2,
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        eos_token_ids=_eos_ids(hf),
        bos_token_id=hf.get("bos_token_id"),
    )


def _gpt2(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise UnsupportedModelError("GPT-2 with non-standard attention scaling is not supported")
    hidden, heads = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        model_type="gpt2",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_position_embeddings=hf["n_positions"],
        norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=hf.get("activation_function", "gelu_new"),
        gated_mlp=False,
        positions="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        eos_token_ids=_eos_ids(hf),
        bos_token_id=hf.get("bos_token_id"),
    )


_READERS: dict[str, Callable[[dict[str, Any]], ModelConfig]] = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "gemma3_text": _gemma3_text,
    "opt": _opt,
    "gpt2": _gpt2,
}

# Said after "unsupported architecture ..." for types that are near a supported one.
_HINTS = {
    "gemma3": ": the multimodal Gemma 3 (vision tower + text model) is not supported, its text-only sibling "
    "gemma3_text (e.g. gemma-3-270m, gemma-3-1b) is",
}
