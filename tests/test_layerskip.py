"""The LayerSkip variant: exit heads trained together with a low-rank adapter of the backbone, merged at load."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.exits import ExitConfig, load_exit_heads, save_exit_heads
from helios_core.models import load_model
from helios_core.models.loader import load_layers
from helios_core.sampling import SamplingParams
from helios_core.train_exits import train_exit_heads, train_exit_probes
from tiny_models import hf_greedy, hf_logits

DEPTHS = (2, 4)
FAST = dict(exit_layers=DEPTHS, steps=40, batch_size=8, seq_len=64, lr=1e-2, rank=8, topk=8, eval_tokens=1024,
            progress=False)
PROMPTS = [[5, 17, 33, 2, 9], [7, 8, 9, 10, 11, 12], [40]]
HF_ROWS = {"attn.wqkv": ("q_proj", "k_proj", "v_proj"), "attn.wo": ("o_proj",), "mlp.w_in": ("gate_proj", "up_proj"),
           "mlp.w_out": ("down_proj",)}


@pytest.fixture(scope="module")
def variants(tiny_llama, exit_corpus, tmp_path_factory):
    """(frozen-backbone heads, LayerSkip heads started from them, the LayerSkip run's result)."""
    root = tmp_path_factory.mktemp("layerskip")
    frozen = root / "frozen.safetensors"
    train_exit_heads(tiny_llama, frozen, [exit_corpus], **FAST)
    adapted = root / "layerskip.safetensors"
    result = train_exit_heads(tiny_llama, adapted, [exit_corpus], **FAST, init_heads=frozen, backbone_rank=4,
                              backbone_lr=3e-3)
    return frozen, adapted, result


def merged_hf_checkpoint(model_dir, heads_path, out):
    """A transformers checkpoint with the adapter's b @ a added to the matching HF matrices by hand:
    the oracle for what loading the heads file does to our fused weights."""
    shutil.copytree(model_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    adapter = {k: v for k, v in load_file(str(heads_path)).items() if k.startswith("backbone.")}
    layers = sorted({int(k.split(".")[1]) for k in adapter})
    for i in layers:
        for ours, theirs in HF_ROWS.items():
            delta = adapter[f"backbone.{i}.{ours}.b"] @ adapter[f"backbone.{i}.{ours}.a"]
            names = [f"model.layers.{i}.{'mlp' if 'mlp' in ours else 'self_attn'}.{t}.weight" for t in theirs]
            parts = delta.split([weights[n].shape[0] for n in names])
            for n, part in zip(names, parts):
                weights[n] = weights[n] + part
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out, layers


def test_the_adapter_moves_the_shallow_exits_and_keeps_full_depth(variants):
    _, _, result = variants
    before, after = result["before"]["rows"], result["after"]["rows"]  # before: the frozen-backbone heads
    assert [r["depth"] for r in after] == [*DEPTHS, 6] and result["backbone_rank"] == 4
    assert after[0]["perplexity"] < before[0]["perplexity"]  # the exits improve beyond their frozen-backbone heads
    # ... while the adapted model's last layer stays near the original (distilled from it at every step).
    assert after[-1]["perplexity"] < 1.05 * before[-1]["perplexity"]
    assert after[-1]["agreement"] == 1.0


def test_loading_the_file_merges_the_adapter_as_transformers_would(tiny_llama, variants, tmp_path):
    _, adapted, _ = variants
    oracle, layers = merged_hf_checkpoint(tiny_llama, adapted, tmp_path / "merged")
    assert layers == list(range(max(DEPTHS)))  # the layers below the deepest exit
    model = load_model(tiny_llama)
    load_exit_heads(adapted, model)
    tokens = torch.tensor([PROMPTS[1]])
    torch.testing.assert_close(model(tokens).float(), hf_logits(oracle, tokens), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(load_model(tiny_llama)(tokens).float(), hf_logits(oracle, tokens), atol=1e-3)

    never = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32",
                                   exit=ExitConfig(threshold=1.5, heads_path=str(adapted))))
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in never.generate(PROMPTS, greedy)] == [hf_greedy(oracle, p, 12) for p in PROMPTS]


def test_layers_loaded_later_get_the_adapter_too(tiny_llama, variants):
    _, adapted, _ = variants
    full = load_model(tiny_llama)
    load_exit_heads(adapted, full)
    partial = load_model(tiny_llama, num_layers=1)
    load_exit_heads(adapted, partial)
    load_layers(partial, 6)  # layers 1..5 read from the checkpoint now, layer 1..3 adapted
    for a, b in zip(full.layers, partial.layers):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_probes_and_resaving_keep_the_adapter(tiny_llama, exit_corpus, variants, tmp_path):
    _, adapted, _ = variants
    out = tmp_path / "with_probes.safetensors"
    train_exit_probes(tiny_llama, out, [exit_corpus], steps=20, train_tokens=1024, batch_size=8, seq_len=64,
                      eval_tokens=512, progress=False, heads_path=adapted)
    stored, original = load_file(str(out)), load_file(str(adapted))
    assert all(torch.equal(stored[k], v) for k, v in original.items())
    assert {k for k in stored if ".probe." in k} == {f"exit.{d}.probe.{n}" for d in DEPTHS for n in ("weight", "bias")}
    eng = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", exit=ExitConfig(measure="probe", threshold=0.5,
                                                                        exit_layers=DEPTHS, heads_path=str(out))))
    assert len(eng.generate(PROMPTS, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))) == 3

    half = tmp_path / "bf16.safetensors"  # stored in bf16 (half the file), probes stay fp32
    train_exit_probes(tiny_llama, half, [exit_corpus], steps=20, train_tokens=1024, batch_size=8, seq_len=64,
                      eval_tokens=512, progress=False, heads_path=adapted, save_dtype="bfloat16")
    stored = load_file(str(half))
    assert {k for k, v in stored.items() if v.dtype == torch.float32} == {k for k in stored if ".probe." in k}
    assert all(torch.equal(stored[k], v.to(torch.bfloat16)) for k, v in original.items())


def test_bad_adapters_are_refused_with_the_reason(tiny_llama, exit_corpus, variants, tmp_path):
    frozen, adapted, _ = variants
    model = load_model(tiny_llama)
    heads = load_exit_heads(adapted, model)
    with pytest.raises(ValueError, match="already has a backbone adapter"):
        load_exit_heads(adapted, model)
    wrong = tmp_path / "wrong.safetensors"
    heads.backbone = dict(heads.backbone) | {"backbone.0.attn.wo.a": torch.zeros(4, 7)}
    save_exit_heads(wrong, heads)
    with pytest.raises(ValueError, match=r"layer 0 attn.wo: a \(4, 7\).*\(64, 64\) matrix"):
        load_exit_heads(wrong, load_model(tiny_llama))
    heads.backbone = {"backbone.9.attn.wo.a": torch.zeros(4, 64)}
    save_exit_heads(wrong, heads)
    with pytest.raises(ValueError, match=r"'backbone.9.attn.wo.a' is not backbone.\{layer\}"):
        load_exit_heads(wrong, load_model(tiny_llama))
    with pytest.raises(ValueError, match="need heads at exactly"):  # warm starts only from frozen-backbone heads
        train_exit_heads(tiny_llama, tmp_path / "x.safetensors", [exit_corpus], **FAST, init_heads=adapted,
                         backbone_rank=4)


def test_cli_trains_the_variant_and_refuses_it_with_probes(tiny_llama, exit_corpus, variants, tmp_path):
    from test_train_exits import helios

    frozen, _, _ = variants
    out = tmp_path / "cli.safetensors"
    run = helios("train-exits", "--model", str(tiny_llama), "--out", str(out), "--corpus", exit_corpus,
                 "--exit-layers", "2,4", "--rank", "8", "--topk", "8", "--steps", "2", "--seq-len", "32",
                 "--eval-tokens", "256", "--init-heads", str(frozen), "--backbone-rank", "2", "--quiet")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["backbone_rank"] == 2
    assert {k for k in load_file(str(out)) if k.startswith("backbone.")} == {
        f"backbone.{i}.{m}.{p}" for i in range(4) for m in HF_ROWS for p in "ab"}
    refused = helios("train-exits", "--probes", "--model", str(tiny_llama), "--out", str(out), "--backbone-rank", "2")
    assert refused.returncode != 0 and "drop" in refused.stderr and "--backbone-rank" in refused.stderr


def test_the_registry_counts_no_memory_for_a_merged_adapter(tiny_llama, variants, tmp_path):
    from helios_core.policy import Registry

    frozen, adapted, _ = variants
    registry = tmp_path / "registry.yaml"
    registry.write_text("models:\n" + "".join(
        f"- name: {name}\n  path: {tiny_llama}\n  exit_heads: {heads}\n  exit_layers: [2, 4]\n"
        for name, heads in (("frozen", frozen), ("layerskip", adapted))))
    entries = Registry.load(registry, "float32")
    assert entries["layerskip"].weight_bytes(6) == entries["frozen"].weight_bytes(6)  # same heads, adapter merged
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", exit=entries["layerskip"].exit_config()))
    assert entries["layerskip"].weight_bytes(6) == engine.memory.weight_bytes
