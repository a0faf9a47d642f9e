"""Weight-only int8 (helios_core/models/quantize.py): the kernel against its definition, the engine
against transformers with the same rounded weights, the memory the policy plans with, partial
loading, a merged backbone adapter, and bad settings refused."""

from __future__ import annotations

import pytest
import torch
import yaml
from tiny_models import SAMPLE_PROMPT

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.exits import ExitConfig
from helios_core.models import load_model
from helios_core.models.low_rank import merge
from helios_core.models.quantize import dequantize_rows, int8_linear, quantize_rows
from helios_core.models.transformer import Linear
from helios_core.policy import Registry, RegistryError
from helios_core.sampling import SamplingParams


def test_rows_round_to_within_half_a_step_of_their_own_scale():
    torch.manual_seed(0)
    w = torch.randn(48, 40) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitudes
    w[5] = 0  # an all-zero row stays zero
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert int(q.abs().max()) == 127  # every nonzero row uses the whole range
    err = (dequantize_rows(q, scale) - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-7)
    assert torch.equal(q[5], torch.zeros(40, dtype=torch.int8))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_int8_linear_is_the_product_with_the_dequantized_weight(dtype, tol):
    torch.manual_seed(1)
    q, scale = quantize_rows(torch.randn(24, 32))
    x, bias = torch.randn(2, 5, 32, dtype=dtype), torch.randn(24, dtype=dtype)
    want = x.float() @ dequantize_rows(q, scale.float()).T + bias.float()
    got = int8_linear(x, q, scale.to(dtype), bias)
    assert got.shape == (2, 5, 24) and got.dtype == dtype
    assert torch.allclose(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


def _hf_with_rounded_weights(path):
    """transformers' model with every Linear's weight replaced by its int8 rounding: the per-row
    scales of a fused matrix are those of its parts, so this is exactly what Helios serves."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(dequantize_rows(*quantize_rows(m.weight)))
    return model


def test_int8_engine_decodes_as_transformers_with_the_rounded_weights(tiny_llama):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", quantization="int8", early_exit=False))
    assert all(m.weight.dtype == torch.int8 for m in engine.model.modules() if isinstance(m, Linear))
    [done] = engine.generate([SAMPLE_PROMPT], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    hf = _hf_with_rounded_weights(tiny_llama)
    ids = torch.tensor([done.prompt_token_ids])
    want = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    assert done.token_ids == want.tolist()
    plain = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", early_exit=False))
    assert engine.memory.weight_bytes < plain.memory.weight_bytes / 2  # fp32 -> int8 matrices


def test_int8_engine_with_exits_equals_the_plain_engine_on_the_rounded_checkpoint(tiny_llama, tmp_path):
    """With exits (rows leaving early, their K/V written from the frozen state by `project_kv`), the
    int8 engine serves what the unquantized engine serves on a checkpoint of the rounded weights."""
    import shutil

    rounded = tmp_path / "rounded"
    _hf_with_rounded_weights(tiny_llama).save_pretrained(rounded)
    for f in tiny_llama.glob("tokenizer*"):
        shutil.copy(f, rounded / f.name)
    exits = ExitConfig(threshold=0.2)  # low enough that tokens of this random model leave early
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [SAMPLE_PROMPT, "the quick brown fox", "def f(x):"]
    got = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", quantization="int8", exit=exits)).generate(
        prompts, params)
    want = LLMEngine(EngineConfig(model=str(rounded), dtype="float32", exit=exits)).generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.exit_layers for c in got] == [c.exit_layers for c in want]
    assert min(min(c.exit_layers) for c in got) < 6  # some tokens did exit early


def test_the_registry_plans_the_int8_bytes_the_engine_holds_at_every_depth(tiny_llama, tmp_path):
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
