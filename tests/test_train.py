"""helios train: a LayerSkip-trained checkpoint that transformers and Helios both load; resumable."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.sampling import SamplingParams
from helios_core.train import TrainConfig, train
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
    engine = LLMEngine(EngineConfig(model=str(out), early_exit=False))
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
