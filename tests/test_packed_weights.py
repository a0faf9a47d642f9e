"""Weights held in oneDNN's layout (`models.loader.pack_weights`): the same products, the same bytes."""

from __future__ import annotations

import pytest
import torch
import yaml
from tiny_models import SAMPLE_PROMPT, hf_greedy, make_tiny_checkpoint

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.models import load_layers, load_model, pack_weights
from helios_core.models.transformer import Linear, packs_weights
from helios_core.policy import Registry, RegistryError
from helios_core.sampling import SamplingParams

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not packs_weights(torch.float32, CPU), reason="this torch build has no oneDNN")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # fp32: a different order of the sums


def _linears(module: torch.nn.Module) -> list[Linear]:
    return [m for m in module.modules() if isinstance(m, Linear)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama_gqa", "llama_tied"])
def test_a_packed_model_computes_the_plain_models_logits(family, dtype, tmp_path):
    if not packs_weights(dtype, CPU):
        pytest.skip(f"oneDNN does not compute {dtype} on this CPU")
    path = make_tiny_checkpoint(family, tmp_path / family, num_layers=4)
    plain, packed = (load_model(path, num_layers=3, dtype=dtype, max_len=64) for _ in range(2))
    pack_weights(packed)
    assert all(m.weight.is_mkldnn for m in _linears(packed.layers))
    tied = family == "llama_tied"  # a tied LM head stays plain: its table is the embedding's too
    assert packed.lm_head.weight.is_mkldnn != tied and (packed.lm_head.weight is packed.embed.weight) == tied
    # ... and in fp32 oneDNN multiplies it in place (PyTorch's own fp32 product can be far slower)
    assert packed.lm_head.onednn == (tied and dtype == torch.float32) and not plain.lm_head.onednn
    assert packed.weight_bytes() == plain.weight_bytes()

    tokens = torch.randint(0, plain.config.vocab_size, (2, 9))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(packed(tokens), plain(tokens), rtol=tol, atol=tol)
    load_layers(packed, 4)  # a block loaded later is packed as it loads
    load_layers(plain, 4)
    assert all(m.weight.is_mkldnn for m in _linears(packed.layers[3]))
    torch.testing.assert_close(packed(tokens), plain(tokens), rtol=tol, atol=tol)

    # K/V for tokens that exited below a layer: the packed Q/K/V matrix cannot be sliced
    x = torch.randn(2, 3, plain.config.hidden_size, dtype=dtype)
    for got, want in zip(packed.layers[1].attn.project_kv(x, None), plain.layers[1].attn.project_kv(x, None)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_a_tied_lm_head_is_packed_as_a_copy_beside_the_embedding(tmp_path):
    path = make_tiny_checkpoint("llama_tied", tmp_path / "tied", num_layers=2)
    plain, packed = load_model(path, max_len=64), load_model(path, max_len=64)
    pack_weights(packed, tied_head=True)
    assert packed.lm_head.weight.is_mkldnn and not packed.embed.weight.is_mkldnn
    head = plain.lm_head.weight
    assert packed.weight_bytes() == plain.weight_bytes() + head.numel() * head.element_size()
    tokens = torch.randint(0, plain.config.vocab_size, (2, 9))
    torch.testing.assert_close(packed(tokens), plain(tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama_gqa", "llama_tied"])
def test_the_engine_packs_its_weights_decodes_as_transformers_and_plans_its_bytes(family, tmp_path):
    path = make_tiny_checkpoint(family, tmp_path / family, num_layers=6)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", num_layers=4, early_exit=False,
                                    pack_tied_lm_head=True))
    assert all(m.weight.is_mkldnn for m in _linears(engine.model))
    engine.set_num_layers(6)  # partial loading: the new blocks are packed too
    assert all(m.weight.is_mkldnn for m in _linears(engine.model))
    [done] = engine.generate([SAMPLE_PROMPT], params)
    assert done.token_ids == hf_greedy(path, done.prompt_token_ids, 12)

    # The default packs what costs no memory: the registry's plan is the engine's bytes.
    default = LLMEngine(EngineConfig(model=str(path), dtype="float32", early_exit=False))
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": [{"name": "m", "path": str(path)}]}))
    assert Registry.load(str(registry), "float32")["m"].weight_bytes(6) == default.memory.weight_bytes
    copy = engine.model.config.vocab_size * engine.model.config.hidden_size * 4 if family == "llama_tied" else 0
    assert engine.memory.weight_bytes == default.memory.weight_bytes + copy

    # The default holds a tied head plain, multiplied by oneDNN in place: the same greedy tokens.
    assert default.model.lm_head.onednn == (family == "llama_tied")
    [by_default] = default.generate([SAMPLE_PROMPT], params)
    assert by_default.token_ids == done.token_ids

    plain = LLMEngine(EngineConfig(model=str(path), dtype="float32", early_exit=False, pack_weights=False))
    assert not any(m.weight.is_mkldnn for m in _linears(plain.model))
    assert plain.memory.weight_bytes == default.memory.weight_bytes
    [again] = plain.generate([SAMPLE_PROMPT], params)
    assert again.token_ids == done.token_ids


def test_a_registry_entry_asks_for_the_tied_head_copy_and_plans_its_bytes(tmp_path):
    path = make_tiny_checkpoint("llama_tied", tmp_path / "tied", num_layers=3)
    registry = tmp_path / "registry.yaml"
    models = [{"name": "copy", "path": str(path), "pack_tied_lm_head": True},
              {"name": "compiled", "path": str(path), "pack_tied_lm_head": True, "compile": True},
              {"name": "plain", "path": str(path)}]
    registry.write_text(yaml.safe_dump({"models": models}))
    reg = Registry.load(str(registry), "float32")
    copy, compiled, plain = reg["copy"], reg["compiled"], reg["plain"]
    assert copy.packed_head_bytes == copy.config.vocab_size * copy.config.hidden_size * 4
    assert compiled.packed_head_bytes == plain.packed_head_bytes == 0  # a compiled engine packs nothing
    engine = LLMEngine(EngineConfig(model=str(path), num_layers=2, **copy.engine_options()))
    assert engine.model.lm_head.weight.is_mkldnn and engine.memory.weight_bytes == copy.weight_bytes(2)
    assert copy.weight_bytes(2) == plain.weight_bytes(2) + copy.packed_head_bytes

    reg.save(registry)  # the keys are kept; the file's sizes are the checkpoint's, on any host
    saved = {m["name"]: m for m in yaml.safe_load(registry.read_text())["models"]}
    assert saved["copy"]["pack_tied_lm_head"] and saved["compiled"]["compile"] and "compile" not in saved["plain"]
    assert saved["copy"]["weight_bytes_fixed"] == saved["plain"]["weight_bytes_fixed"]
    assert Registry.load(str(registry), "float32")["copy"].weight_bytes(2) == copy.weight_bytes(2)

    registry.write_text(yaml.safe_dump({"models": [{"name": "bad", "path": str(path), "compile": "yes"}]}))
    with pytest.raises(RegistryError, match="compile must be true or false"):
        Registry.load(str(registry), "float32")
