"""helios train: a LayerSkip-trained checkpoint that transformers and Helios both load; resumable."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.sampling import SamplingParams
from helios_core.train import TokenizedSource, TrainConfig, parse_source, parse_sources, sample_batch, train
from tiny_models import hf_greedy

CORPUS = "\n".join(
    f"def function_{i}(x, y):\n    '''Return the sum of x and y, times {i}.'''\n    return (x + y) * {i}\n"
    for i in range(200)
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "code.py"
    path.write_text(CORPUS)
    return str(path)


def config(out, corpus, **kw) -> TrainConfig:
    base = dict(out=str(out), corpus=[corpus], layers=3, hidden=32, heads=2, kv_heads=1, intermediate=64,
                vocab=300, seq_len=32, batch_size=4, steps=6, lr=1e-2, warmup=2, checkpoint_every=3, threads=1)
    return TrainConfig(**(base | kw))


def test_training_lowers_loss_and_writes_a_loadable_checkpoint(tmp_path, corpus):
    out = tmp_path / "model"
    result = train(config(out, corpus, steps=30, checkpoint_every=10), progress=False)
    log = result["log"]
    assert [entry["step"] for entry in log] == [10, 20, 30]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    prompt = [5, 6, 7, 8]
    engine = LLMEngine(EngineConfig(model=str(out), dtype="float32", early_exit=False))
    [done] = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert done.token_ids == hf_greedy(out, prompt, 12)
    assert json.loads((out / "train_state.json").read_text())["step"] == 30


def test_resume_continues_exactly(tmp_path, corpus):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config(straight, corpus), progress=False)
    train(config(resumed, corpus), progress=False, stop_at=3)
    assert json.loads((resumed / "train_state.json").read_text())["step"] == 3
    train(config(resumed, corpus), progress=False)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_data_sources_parse_and_mix_by_weight(tmp_path):
    code, prose = tmp_path / "code", tmp_path / "prose.txt"
    code.mkdir()
    (code / "a.py").write_text("x = 1\n")
    (code / "skip.bin").write_text("not text")
    prose.write_text("Some words.")
    src = parse_source(f"code={code}:3")
    assert (src.name, src.weight, [f.name for f in src.files]) == ("code", 3.0, ["a.py"])
    assert parse_source(str(prose)).name == "prose" and parse_source(str(prose)).weight == 1.0
    assert [s.weight for s in parse_sources([f"code={code}:3", f"prose={prose}:1"])] == [0.75, 0.25]
    for bad, message in ((f"x={tmp_path / 'missing'}", "does not exist"), (f"x={code}:0", "weight must be positive")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            parse_source(bad)
    # Rows are drawn by weight: a 0.9 / 0.1 mix gives ~90% rows of the first source.
    a = TokenizedSource("a", 0.9, np.zeros(100, dtype=np.int32), np.zeros(10, dtype=np.int32))
    b = TokenizedSource("b", 0.1, np.ones(100, dtype=np.int32), np.ones(10, dtype=np.int32))
    cfg = TrainConfig(out="", seq_len=8, batch_size=2000)
    batch = sample_batch([a, b], cfg, random.Random(0))
    assert batch.shape == (2000, 9) and 0.87 < float((batch[:, 0] == 0).float().mean()) < 0.93


def test_family_shares_a_tokenizer_and_steps_zero_only_prepares(tmp_path, corpus):
    first, second = tmp_path / "first", tmp_path / "second"
    assert train(config(first, corpus, steps=0), progress=False)["steps"] == 0
    assert (first / "tokenizer.json").is_file() and not (first / "model.safetensors").exists()
    train(config(second, corpus, tokenizer=str(first)), progress=False)
    assert (second / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()
    with pytest.raises(ValueError, match="tokens but vocab"):
        train(config(tmp_path / "third", corpus, tokenizer=str(first), vocab=999), progress=False)


def test_time_limit_stops_with_a_checkpoint(tmp_path, corpus):
    out = tmp_path / "model"
    result = train(config(out, corpus, steps=10_000), progress=False, time_limit=0.0)
    assert result["steps"] == 1 and json.loads((out / "train_state.json").read_text())["step"] == 1
    assert load_file(str(out / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16  # save_dtype
