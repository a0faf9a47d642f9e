"""Weight-only int8 (helios_core/models/quantize.py): the kernel against its definition, the engine
against transformers with the same rounded weights, the memory the policy plans with, partial
loading, a merged backbone adapter, and bad settings refused."""

from __future__ import annotations

import pytest
import torch
import yaml
from tiny_models import SAMPLE_PROMPT, make_tiny_checkpoint

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.models import load_model
from helios_core.models.low_rank import merge
from helios_core.models.quantize import dequantize_rows, int8_linear, quantize_rows, scale_dtype
from helios_core.models.transformer import Linear
from helios_core.policy import Registry, RegistryError
from helios_core.sampling import SamplingParams


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_round_to_within_half_a_step_of_their_own_scale(dtype):
    """In whatever dtype the scale is kept, q is rounded against the scale as stored."""
    torch.manual_seed(0)
    w = torch.randn(48, 40) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitudes
    w[5] = 0  # an all-zero row stays zero
    q, scale = quantize_rows(w, dtype)
    assert q.dtype == torch.int8 and scale.shape == (48,) and scale.dtype == dtype
    assert int(q.abs().max()) == 127  # every nonzero row uses the whole range
    err = (dequantize_rows(q, scale) - w).abs()
    assert torch.all(err <= scale.float()[:, None] / 2 + 1e-7)
    assert torch.equal(q[5], torch.zeros(40, dtype=torch.int8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_the_product_with_the_dequantized_weight(dtype):
    """On the CPU the kernel computes in bf16: an fp32 model's scales are kept in bf16 and its activations
    rounded to bf16, the products accumulate in fp32 and are rounded to bf16 once, then take the
    activations' dtype."""
    torch.manual_seed(1)
    q, scale = quantize_rows(torch.randn(24, 32), scale_dtype(dtype))
    assert scale.dtype == torch.bfloat16
    x, bias = torch.randn(2, 5, 32, dtype=dtype), torch.randn(24, dtype=dtype)
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    want = bf(x) @ dequantize_rows(q, scale).T + bias.float()
    got = int8_linear(x, q, scale, bias)
    assert got.shape == (2, 5, 24) and got.dtype == dtype
    product = want - bias.float()  # rounded to bf16 before the bias is added (and after, in bf16)
    assert torch.all((got.float() - want).abs() <= 2**-8 * (product.abs() + want.abs()) + 1e-6)


def _hf_with_rounded_weights(path):
    """transformers' model computing what Helios' int8 engine computes in fp32: every Linear's weight
    replaced by its int8 rounding against a bf16 scale (the per-row scales of a fused matrix are those of
    its parts), its input and output rounded to bf16; a tied embedding reads the same int8 rows and
    scales."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                q, scale = quantize_rows(m.weight, torch.bfloat16)
                if m.weight is embedding.weight:
                    embedding.weight = torch.nn.Parameter(dequantize_rows(q, scale))
                m.weight = torch.nn.Parameter(dequantize_rows(q, scale))
                m.register_forward_pre_hook(lambda _, args: (args[0].to(torch.bfloat16).float(),))
                m.register_forward_hook(lambda _m, _args, out: out.to(torch.bfloat16).float())
    return model


@pytest.mark.parametrize("family", ["llama_gqa", "llama_tied"])
def test_int8_engine_decodes_as_transformers_with_the_rounded_weights(family, tmp_path):
    path = make_tiny_checkpoint(family, tmp_path / family, num_layers=4)
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", quantization="int8", early_exit=False))
    assert all(m.weight.dtype == torch.int8 for m in engine.model.modules() if isinstance(m, Linear))
    [done] = engine.generate([SAMPLE_PROMPT], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    hf = _hf_with_rounded_weights(path)
    ids = torch.tensor([done.prompt_token_ids])
    want = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    assert done.token_ids == want.tolist()
    plain = LLMEngine(EngineConfig(model=str(path), dtype="float32", early_exit=False))
    # fp32 -> int8 matrices; a tied embedding is read from the int8 LM head, not kept in fp32 beside it
    assert engine.memory.weight_bytes < plain.memory.weight_bytes / (3 if family == "llama_tied" else 2)


def test_kv_of_exited_tokens_comes_from_the_int8_rows_of_k_and_v(tiny_llama):
    """`project_kv` (K/V for tokens that exited below a layer) slices the int8 Q/K/V matrix and its
    scales: the same K and V as the full projection's."""
    model = load_model(tiny_llama, quantization="int8", max_len=64)
    attn, c = model.layers[1].attn, model.config
    x = torch.randn(2, 3, c.hidden_size)
    k, v = attn.project_kv(x, None)
    _, k_all, v_all = attn.wqkv(x).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
    assert torch.allclose(k.flatten(2), k_all, atol=1e-5) and torch.allclose(v.flatten(2), v_all, atol=1e-5)


@pytest.mark.parametrize("family", ["llama_gqa", "llama_tied"])
def test_the_registry_plans_the_int8_bytes_the_engine_holds_at_every_depth(family, tmp_path):
    tiny_llama = make_tiny_checkpoint(family, tmp_path / family, num_layers=6)
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "q", "path": str(tiny_llama), "quantization": "int8"},
                                               {"name": "plain", "path": str(tiny_llama)}]}))
    registry = Registry.load(str(path), "bfloat16")
    q, plain = registry["q"], registry["plain"]
    assert q.layer_weight_bytes < plain.layer_weight_bytes
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="bfloat16", quantization="int8", num_layers=2,
                                    early_exit=False))
    assert engine.memory.weight_bytes == q.weight_bytes(2)
    engine.set_num_layers(5)  # layers loaded later are quantized as they load
    assert engine.memory.weight_bytes == q.weight_bytes(5)
    assert all(m.weight.dtype == torch.int8 for m in engine.model.layers.modules() if isinstance(m, Linear))
    registry.save(path)
    assert yaml.safe_load(path.read_text())["models"][0]["quantization"] == "int8"
    assert Registry.load(str(path), "float32")["q"].weight_bytes(5) == LLMEngine(EngineConfig(
        model=str(tiny_llama), dtype="float32", quantization="int8", num_layers=5)).memory.weight_bytes


def test_a_backbone_delta_merges_into_int8_weights(tiny_llama):
    model = load_model(tiny_llama, quantization="int8")
    block = model.layers[0]
    w = dequantize_rows(block.mlp.w_out.weight, block.mlp.w_out.scale)
    a, b = torch.randn(4, w.shape[1]) * 0.1, torch.randn(w.shape[0], 4) * 0.1
    merge(block, {"mlp.w_out": (a, b)})
    assert block.mlp.w_out.weight.dtype == torch.int8
    merged = dequantize_rows(block.mlp.w_out.weight, block.mlp.w_out.scale)
    assert torch.all((merged - (w + b @ a)).abs() <= block.mlp.w_out.scale[:, None] / 2 + 1e-6)


def test_unknown_quantizations_are_refused_with_the_choices(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="int8"):
        EngineConfig(model=str(tiny_llama), quantization="int4")
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "q", "path": str(tiny_llama), "quantization": "int4"}]}))
    with pytest.raises(RegistryError, match="unknown quantization 'int4'"):
        Registry.load(str(path))
