"""Weights held in oneDNN's layout (`models.loader.pack_weights`): the same products, the same bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from tiny_models import SAMPLE_PROMPT, hf_greedy, make_tiny_checkpoint

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.models import load_layers, load_model, pack_weights
from helios_core.models.transformer import Linear, MappedEmbedding, packs_weights
from helios_core.policy import Registry, RegistryError
from helios_core.sampling import SamplingParams

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not packs_weights(torch.float32, CPU), reason="this torch build has no oneDNN")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # fp32: a different order of the sums


def _linears(module: torch.nn.Module) -> list[Linear]:
    return [m for m in module.modules() if isinstance(m, Linear)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama_gqa", "llama_tied", "gemma3"])  # gemma3: tied, embedding scaled
def test_a_packed_model_computes_the_plain_models_logits(family, dtype, tmp_path):
    if not packs_weights(dtype, CPU):
        pytest.skip(f"oneDNN does not compute {dtype} on this CPU")
    path = make_tiny_checkpoint(family, tmp_path / family, num_layers=4)
    plain, packed = (load_model(path, num_layers=3, dtype=dtype, max_len=64) for _ in range(2))
    pack_weights(packed)
    assert all(m.weight.is_mkldnn for m in _linears(packed.layers))
    assert packed.lm_head.weight.is_mkldnn  # tied or not
    # A tied table is then read from the checkpoint's mapped file: no copy, the same bytes.
    assert isinstance(packed.embed, MappedEmbedding) == (family != "llama_gqa")  # the tied families
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


def _mapped_files() -> dict[str, list[tuple[int, int]]]:
    """This process's file mappings: path -> [(start, end)] addresses (/proc/self/maps)."""
    maps: dict[str, list[tuple[int, int]]] = {}
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            maps.setdefault(fields[5], []).append((start, end))
    return maps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tied_embedding_is_read_from_the_mapped_checkpoint_once_its_head_is_packed(dtype, tmp_path):
    if not packs_weights(dtype, CPU):
        pytest.skip(f"oneDNN does not compute {dtype} on this CPU")
    path = make_tiny_checkpoint("llama_tied", tmp_path / "tied", num_layers=2)  # an fp32 file
    plain, packed = (load_model(path, max_len=64, dtype=dtype) for _ in range(2))
    pack_weights(packed)
    table = packed.embed.table
    assert table.dtype == torch.float32 and packed.embed(torch.tensor([0])).dtype == dtype  # rows converted
    [file] = path.glob("*.safetensors")
    assert any(a <= table.data_ptr() < b for a, b in _mapped_files()[str(file.resolve())])  # the file's pages
    assert packed.weight_bytes() == plain.weight_bytes()  # the packed head; the table is not memory of ours

    tokens = torch.randint(0, plain.config.vocab_size, (2, 9))
    assert torch.equal(packed.embed(tokens), plain.embed(tokens))  # the load's conversion, row by row
    torch.testing.assert_close(packed(tokens), plain(tokens), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def _misalign(file: Path, name: str) -> None:
    """Rewrite a safetensors file with a 2-byte tensor first, so that `name`'s fp32 bytes start at an
    offset that is not a multiple of 4 (safetensors' writer never does this; other writers may)."""
    with safe_open(file, "pt") as f:
        tensors = {"pad": torch.zeros(1, dtype=torch.float16), **{k: f.get_tensor(k) for k in f.keys()}}
    header, blobs, offset = {}, [], 0
    for key, t in tensors.items():  # in this order: pad first
        blob = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": {torch.float16: "F16", torch.float32: "F32"}[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    assert (8 + len(raw) + header[name]["data_offsets"][0]) % 4


def test_a_tied_head_whose_table_cannot_be_mapped_stays_plain_and_oneDNN_multiplies_it(tmp_path):
    path = make_tiny_checkpoint("llama_tied", tmp_path / "tied", num_layers=2)
    [file] = path.glob("*.safetensors")
    _misalign(file, "model.embed_tokens.weight")
    plain, packed = load_model(path, max_len=64), load_model(path, max_len=64)
    pack_weights(packed)
    assert packed.lm_head.weight is packed.embed.weight and not packed.lm_head.weight.is_mkldnn
    assert packed.lm_head.onednn and not plain.lm_head.onednn  # fp32: PyTorch's own product can be far slower
    assert packed.weight_bytes() == plain.weight_bytes()
    tokens = torch.randint(0, plain.config.vocab_size, (2, 9))
    torch.testing.assert_close(packed(tokens), plain(tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama_gqa", "llama_tied"])
def test_the_engine_packs_its_weights_decodes_as_transformers_and_plans_its_bytes(family, tmp_path):
    path = make_tiny_checkpoint(family, tmp_path / family, num_layers=6)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", num_layers=4, early_exit=False))
    assert all(m.weight.is_mkldnn for m in _linears(engine.model))  # the LM head too, tied or not
    engine.set_num_layers(6)  # partial loading: the new blocks are packed too
    assert all(m.weight.is_mkldnn for m in _linears(engine.model))
    [done] = engine.generate([SAMPLE_PROMPT], params)
    assert done.token_ids == hf_greedy(path, done.prompt_token_ids, 12)

    # Packing costs no memory: the registry's plan is the engine's bytes, as with plain weights.
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": [{"name": "m", "path": str(path)}]}))
    assert Registry.load(str(registry), "float32")["m"].weight_bytes(6) == engine.memory.weight_bytes

    plain = LLMEngine(EngineConfig(model=str(path), dtype="float32", early_exit=False, pack_weights=False))
    assert not any(m.weight.is_mkldnn for m in _linears(plain.model))
    assert plain.memory.weight_bytes == engine.memory.weight_bytes
    [again] = plain.generate([SAMPLE_PROMPT], params)
    assert again.token_ids == done.token_ids


def test_registry_entries_plan_the_same_bytes_packed_or_compiled_and_refuse_the_old_head_switch(tmp_path):
    path = make_tiny_checkpoint("llama_tied", tmp_path / "tied", num_layers=3)
    registry = tmp_path / "registry.yaml"
    models = [{"name": "compiled", "path": str(path), "compile": True}, {"name": "packed", "path": str(path)}]
    registry.write_text(yaml.safe_dump({"models": models}))
    reg = Registry.load(str(registry), "float32")
    assert reg["compiled"].weight_bytes(2) == reg["packed"].weight_bytes(2)  # a compiled engine packs nothing

    reg.save(registry)
    saved = {m["name"]: m for m in yaml.safe_load(registry.read_text())["models"]}
    assert saved["compiled"]["compile"] and "compile" not in saved["packed"]

    for bad, error in (({"compile": "yes"}, "compile must be true or false"),
                       ({"pack_tied_lm_head": True}, "unknown keys")):  # a tied head is always packed now
        registry.write_text(yaml.safe_dump({"models": [{"name": "bad", "path": str(path), **bad}]}))
        with pytest.raises(RegistryError, match=error):
            Registry.load(str(registry), "float32")
