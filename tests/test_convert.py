"""helios convert: GGUF -> Hugging Face directory, checked against transformers.

Tiny Llama and Gemma 3 checkpoints are written as GGUF the way llama.cpp writes them
(tests/tiny_gguf.py), in F32 and in Q8_0, and converted back. F32 must give back the original
model (greedy tokens equal, logits close); Q8_0 must equal transformers loading that GGUF itself,
with weights that are exactly the original's quantize -> dequantize round trip.
"""

from __future__ import annotations

import json

import pytest
import torch

import tiny_gguf
import tiny_models as tm
from helios_core.cli import main
from helios_core.gguf_convert import convert_gguf

NEW_TOKENS = 16
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
ARCHITECTURES = {"llama_gqa": ["LlamaForCausalLM"], "gemma3": ["Gemma3ForCausalLM"]}
# Nothing that says how the model computes: where and how the directory was written.
_PROVENANCE = ("architectures", "dtype", "transformers_version", "_name_or_path")


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf_originals")
    # 6 Gemma layers: the default pattern (5 local, 1 global) then has a global layer.
    return {"llama_gqa": tiny_gguf.gguf_ready_checkpoint("llama_gqa", root / "llama_gqa"),
            "gemma3": tiny_gguf.gguf_ready_checkpoint("gemma3", root / "gemma3", num_layers=6)}


@pytest.fixture(scope="module")
def gguf_files(originals, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf_files")
    return {
        (family, qtype): tiny_gguf.write_gguf(
            originals[family], root / f"{family}-{qtype}.gguf", qtype,
            add_bos_token=family == "gemma3",  # as Gemma's files do; SmolLM2's say False
            chat_template=CHAT_TEMPLATE if family == "llama_gqa" else None)
        for family in originals for qtype in ("F32", "Q8_0")
    }


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("family", ["llama_gqa", "gemma3"])
def test_round_trip(family, qtype, originals, gguf_files, tmp_path):
    gguf = gguf_files[family, qtype]
    out = convert_gguf(gguf, tmp_path / "hf")

    _check_files(out, ARCHITECTURES[family])
    assert _config_dict(out) == _gguf_config_dict(gguf)
    ids = _check_tokenizer(out, gguf, originals[family], family)
    got = tm.hf_greedy(out, ids, NEW_TOKENS)
    if qtype == "F32":
        assert got == tm.hf_greedy(originals[family], ids, NEW_TOKENS)
        torch.testing.assert_close(tm.hf_logits(out, ids), tm.hf_logits(originals[family], ids),
                                   atol=1e-4, rtol=1e-4)
    else:
        assert got == _gguf_greedy(gguf, ids)
        _check_dequantized(out, originals[family], qtype)


def test_bfloat16(gguf_files, tmp_path):
    from safetensors import safe_open

    out = convert_gguf(gguf_files["llama_gqa", "F32"], tmp_path / "hf", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_refuses_bad_input(originals, gguf_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "a")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        convert_gguf(tmp_path / "text.gguf", tmp_path / "a")
    (tmp_path / "cut.gguf").write_bytes(gguf_files["llama_gqa", "F32"].read_bytes()[:3000])
    with pytest.raises(ValueError, match="truncated or damaged"):
        convert_gguf(tmp_path / "cut.gguf", tmp_path / "a")
    qwen = tiny_gguf.write_gguf(originals["llama_gqa"], tmp_path / "qwen2.gguf", architecture="qwen2")
    with pytest.raises(ValueError, match="architecture 'qwen2' is not supported.*gemma3, llama"):
        convert_gguf(qwen, tmp_path / "a")
    unknown = tiny_gguf.write_gguf(originals["llama_gqa"], tmp_path / "x.gguf", architecture="nosucharch")
    with pytest.raises(ValueError, match="nosucharch.*gemma3, llama"):
        convert_gguf(unknown, tmp_path / "a")
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf(gguf_files["llama_gqa", "F32"], tmp_path / "a", dtype="float16")
    assert not (tmp_path / "a").exists()
    assert not list(tmp_path.glob(".a.*")), "no staging directory may be left behind"


def test_existing_output(gguf_files, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty.*--force"):
        convert_gguf(gguf_files["llama_gqa", "F32"], out)
    assert (out / "keep.txt").exists()
    convert_gguf(gguf_files["llama_gqa", "F32"], out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_cli(gguf_files, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["convert", str(gguf_files["llama_gqa", "Q8_0"]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(gguf_files["llama_gqa", "Q8_0"]), "--out", str(out)])
    assert exit_info.value.code == 2
    assert "not empty" in capsys.readouterr().err


def _check_files(out, architectures):
    """A plain, dequantized HF directory: safetensors only, no quantization_config."""
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".gguf"))]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == architectures
    generation = json.loads((out / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == \
           {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _config_dict(path) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path)).to_dict()
    return {k: v for k, v in config.items() if k not in _PROVENANCE}


def _gguf_config_dict(gguf) -> dict:
    """The config transformers itself uses when it loads the GGUF."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).to_dict()
    return {k: v for k, v in config.items() if k not in _PROVENANCE}


def _check_tokenizer(out, gguf, original, family) -> list[int]:
    """The converted tokenizer encodes as transformers' GGUF tokenizer does; returns the prompt ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer(tm.SAMPLE_PROMPT).input_ids
    assert ids == AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)(tm.SAMPLE_PROMPT).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == tm.SAMPLE_PROMPT
    config = json.loads((out / "tokenizer_config.json").read_text())
    if family == "gemma3":
        assert config["add_bos_token"] is True and ids[0] == tokenizer.bos_token_id == tiny_gguf.GEMMA_SPECIALS.index("<bos>")
    else:  # the same byte-level BPE as the original, no BOS, and the chat template kept
        assert ids == AutoTokenizer.from_pretrained(str(original))(tm.SAMPLE_PROMPT).input_ids
        assert config["add_bos_token"] is False and config["chat_template"] == CHAT_TEMPLATE
    return ids


@torch.no_grad()
def _gguf_greedy(gguf, ids: list[int]) -> list[int]:
    """Greedy tokens of transformers loading the GGUF itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    input_ids = torch.tensor([ids])
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=NEW_TOKENS, eos_token_id=None)
    return out[0, len(ids):].tolist()


def _check_dequantized(out, original, qtype: str) -> None:
    """Every matrix equals the original after llama.cpp's quantization and the gguf package's dequantization."""
    import gguf
    from safetensors.torch import load_file

    converted, source = load_file(str(out / "model.safetensors")), load_file(str(original / "model.safetensors"))
    assert converted.keys() == source.keys()
    qtype_id = gguf.GGMLQuantizationType[qtype]
    for name, weight in source.items():
        expected = weight
        if weight.ndim == 2:
            expected = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), qtype_id), qtype_id))
            assert not torch.equal(expected, weight)  # the round trip is visible...
        torch.testing.assert_close(converted[name], expected, msg=name)  # ...and reproduced
