"""helios train-exits: heads trained by distillation agree more with the final layer; the engine uses them."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helios_core.cli import main
from helios_core.engine import EngineConfig, LLMEngine
from helios_core.exits import ExitConfig, load_exit_heads
from helios_core.sampling import SamplingParams
from helios_core.train_exits import candidate_kl, fit_probes, train_exit_heads, train_exit_probes
from tiny_models import hf_greedy, make_pickle_checkpoint

DEPTHS = (1, 2, 3)
FAST = dict(exit_layers=DEPTHS, steps=60, batch_size=8, seq_len=64, lr=1e-2, proj=True, eval_tokens=1024,
            progress=False)
PROMPTS = [[5, 17, 33, 2, 9], [7, 8, 9, 10, 11, 12], [40], [100, 101, 102], [3, 250, 7], [60, 61]]


@pytest.fixture(scope="module")
def trained(tiny_llama, exit_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "heads.safetensors"
    weights = load_file(str(tiny_llama / "model.safetensors"))
    result = train_exit_heads(tiny_llama, out, [exit_corpus], **FAST)
    return out, result, weights


def test_training_raises_agreement_with_the_final_layer(trained):
    _, result, _ = trained
    before, after = result["before"]["rows"], result["after"]["rows"]
    assert [r["depth"] for r in after] == [*DEPTHS, 6]
    for b, a in zip(before[:-1], after[:-1]):  # the random model's shallow shared head is poor: < 20% agreement
        assert a["agreement"] > b["agreement"] and a["perplexity"] < b["perplexity"]
    assert before[0]["agreement"] < 0.2
    assert after[-1] == before[-1] | {"exit_share": after[-1]["exit_share"]}  # the final layer is untouched
    # Overconfident shared heads exit wrongly; trained ones exit less, and right more often.
    assert result["after"]["exit_agreement"] > result["before"]["exit_agreement"]


def test_base_model_is_unchanged_and_same_seed_gives_the_same_adapter(tiny_llama, exit_corpus, trained, tmp_path):
    path, _, weights_before = trained
    after = load_file(str(tiny_llama / "model.safetensors"))
    assert all(torch.equal(after[k], v) for k, v in weights_before.items())
    again = tmp_path / "again.safetensors"
    train_exit_heads(tiny_llama, again, [exit_corpus], **FAST)
    a, b = load_file(str(path)), load_file(str(again))
    assert sorted(a) == sorted(f"exit.{d}.{n}" for d in DEPTHS for n in ("norm.weight", "proj.weight"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_engine_exits_where_the_trained_heads_say(tiny_llama, trained):
    path, _, _ = trained
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    probe = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", exit=ExitConfig(heads_path=str(path))))
    heads = load_exit_heads(path, probe.model)
    with torch.inference_mode():  # by hand: the first generated token sees the full prompt at every depth
        hidden = [probe.model(torch.tensor([p]), output_hidden_states=True)[1] for p in PROMPTS]
        conf = torch.stack([heads.logits(2, h[1][:, -1]).float().softmax(-1).amax() for h in hidden])
        tokens = [int(heads.logits(2, h[1][:, -1]).argmax()) for h in hidden]
        full = [int(probe.model(torch.tensor([p]))[0, -1].argmax()) for p in PROMPTS]
    low, high = conf.sort().values[len(PROMPTS) // 2 - 1 : len(PROMPTS) // 2 + 1].tolist()
    threshold = (low + high) / 2  # half the prompts exit at depth 2, the others run to the end
    eng = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32",
                                 exit=ExitConfig(threshold=threshold, exit_layers=(2,), heads_path=str(path))))
    outs = eng.generate(PROMPTS, one)
    assert [o.exit_layers[0] for o in outs] == [2 if c >= threshold else 6 for c in conf.tolist()]
    assert [o.token_ids[0] for o in outs] == [t if c >= threshold else f for t, c, f in zip(tokens, conf, full)]
    assert {o.exit_layers[0] for o in outs} == {2, 6}

    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    shared = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32",
                                    exit=ExitConfig(threshold=0.5))).generate(PROMPTS, greedy)
    own = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32",
                                 exit=ExitConfig(threshold=0.5, heads_path=str(path))))
    assert [o.exit_layers for o in own.generate(PROMPTS, greedy)] != [o.exit_layers for o in shared]
    never = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32",
                                   exit=ExitConfig(threshold=1.5, heads_path=str(path))))
    [out] = never.generate([PROMPTS[0]], greedy)
    assert out.token_ids == hf_greedy(tiny_llama, PROMPTS[0], 16)


def test_bad_inputs_raise_clear_errors(tiny_llama, exit_corpus, tmp_path):
    out = tmp_path / "heads.safetensors"
    with pytest.raises(ValueError, match=r"exit layer\(s\) \[6\] out of range.*depths 1..5"):
        train_exit_heads(tiny_llama, out, [exit_corpus], exit_layers=(2, 6), progress=False)
    with pytest.raises(ValueError, match=r"\.safetensors file"):
        train_exit_heads(tiny_llama, tmp_path / "heads.pt", [exit_corpus], progress=False)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        train_exit_heads(tmp_path / "nope", out, [exit_corpus], progress=False)
    with pytest.raises(ValueError, match="only pickled weights"):
        train_exit_heads(make_pickle_checkpoint(tmp_path / "pickled"), out, [exit_corpus], progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_exit_heads(tiny_llama, out, [str(tmp_path / "missing.txt")], progress=False)
    assert not out.exists()


PROBES_FAST = dict(steps=100, train_tokens=2048, batch_size=8, seq_len=64, eval_tokens=1024, progress=False)


def test_fit_probes_separates_what_a_linear_probe_can():
    torch.manual_seed(0)
    x = torch.randn(2, 4000, 16)
    y = torch.stack([x[0, :, 3] > 0.5, x[1] @ torch.linspace(-1, 1, 16) < 0])  # one rule per depth
    weight, bias = fit_probes(x, y, steps=300, lr=3e-2)
    predicted = torch.einsum("lnd,ld->ln", x, weight) + bias[:, None] > 0
    assert (predicted == y).float().mean(1).min() > 0.97
    again = fit_probes(x, y, steps=300, lr=3e-2)
    assert torch.equal(again[0], weight) and torch.equal(again[1], bias)  # no randomness


def test_trained_probes_drive_the_engine(tiny_llama, exit_corpus, tmp_path):
    out = tmp_path / "probes.safetensors"
    result = train_exit_probes(tiny_llama, out, [exit_corpus], **PROBES_FAST)
    assert result["exit_layers"] == [1, 2, 3, 4, 5] and [r["depth"] for r in result["rows"]] == [1, 2, 3, 4, 5]
    assert all(0 <= r["agreement"] <= 1 for r in result["rows"])
    assert {(s["threshold"], s["measure"]) for s in result["simulated"]} >= {(0.9, "probe"), (0.9, "max_prob")}
    assert sorted(load_file(str(out))) == sorted(f"exit.{d}.probe.{n}" for d in range(1, 6) for n in ("weight", "bias"))
    again = tmp_path / "again.safetensors"
    train_exit_probes(tiny_llama, again, [exit_corpus], **PROBES_FAST)
    a, b = load_file(str(out)), load_file(str(again))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same probes

    heads = load_exit_heads(out, LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32")).model)
    eng = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", exit=ExitConfig(measure="probe", threshold=0.5,
                                                                        heads_path=str(out))))
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    with torch.inference_mode():  # by hand: the first token leaves at the first depth whose probe says >= 0.5
        for prompt, o in zip(PROMPTS, outs):
            hidden = eng.model(torch.tensor([prompt]), output_hidden_states=True)[1]
            conf = [float(torch.sigmoid(heads.probe_logit(d, hidden[d - 1][:, -1]))) for d in range(1, 6)]
            assert o.exit_layers[0] == next((d for d, c in enumerate(conf, 1) if c >= 0.5), 6)
            assert o.records[0].confidence == pytest.approx(conf[o.exit_layers[0] - 1] if o.exit_layers[0] < 6 else 1)


def helios(*args: str) -> subprocess.CompletedProcess:
    # One thread: with two, OpenMP spin-waiting next to another busy process is many times slower.
    return subprocess.run([sys.executable, "-m", "helios_core.cli", *args], capture_output=True, text=True,
                          timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_cli_round_trip(tiny_llama, exit_corpus, tmp_path):
    out = tmp_path / "cli.safetensors"
    run = helios("train-exits", "--model", str(tiny_llama), "--out", str(out), "--corpus", exit_corpus,
                 "--exit-layers", "2,4", "--steps", "5", "--seq-len", "32", "--eval-tokens", "256", "--quiet")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["exit_layers"] == [2, 4] and result["steps"] == 5 and out.is_file()
    assert "agreement" in run.stderr and "->" in run.stderr and "train-exits:" not in run.stderr  # no bar
    assert sorted(load_file(str(out))) == ["exit.2.norm.weight", "exit.4.norm.weight"]


def test_cli_trains_probes(tiny_llama, exit_corpus, tmp_path):
    out = tmp_path / "probes.safetensors"
    run = helios("train-exits", "--probes", "--model", str(tiny_llama), "--out", str(out), "--corpus", exit_corpus,
                 "--exit-layers", "2,4", "--steps", "20", "--train-tokens", "512", "--seq-len", "32",
                 "--eval-tokens", "256", "--quiet")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["exit_layers"] == [2, 4] and "AUC probe" in run.stderr
    assert sorted(load_file(str(out))) == ["exit.2.probe.bias", "exit.2.probe.weight", "exit.4.probe.bias",
                                           "exit.4.probe.weight"]
    gen = helios("generate", "--model", str(tiny_llama), "--prompt", "def f", "--max-tokens", "4", "--measure",
                 "probe", "--exit-layers", "2,4", "--exit-heads", str(out), "--json")
    assert gen.returncode == 0, gen.stderr
    assert set(json.loads(gen.stdout)["exit_layers"]) <= {2, 4, 6}
    bad = helios("train-exits", "--probes", "--proj", "--model", str(tiny_llama), "--out", str(out))
    assert bad.returncode == 2 and "--probes fits probes for the shared head or --heads" in bad.stderr
    bad = helios("train-exits", "--heads", str(out), "--model", str(tiny_llama), "--out", str(out))
    assert bad.returncode == 2 and "--heads goes with --probes" in bad.stderr


def test_cli_stops_at_the_time_limit_and_resumes(tiny_llama, exit_corpus, tmp_path):
    out = tmp_path / "cli.safetensors"
    args = ("train-exits", "--model", str(tiny_llama), "--out", str(out), "--corpus", exit_corpus,
            "--exit-layers", "2", "--steps", "3", "--seq-len", "32", "--eval-tokens", "256", "--topk", "4", "--save-dtype", "bfloat16",
            "--quiet")
    first = helios(*args, "--time-limit", "0")
    assert first.returncode == 0 and "stopped at step 1 of 3" in first.stderr and not out.exists()
    rest = helios(*args)
    assert rest.returncode == 0, rest.stderr
    assert json.loads(rest.stdout.splitlines()[-1])["finished"] and "agreement" in rest.stderr
    assert {t.dtype for t in load_file(str(out)).values()} == {torch.bfloat16}


def test_cli_errors_are_one_clear_line(tiny_llama, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train-exits", "--model", str(tiny_llama), "--out", str(tmp_path / "h.safetensors"),
              "--exit-layers", "0"])
    assert exited.value.code == 2 and "helios: error: exit layer(s) [0] out of range" in capsys.readouterr().err


def test_candidate_kl_is_the_full_kl_when_the_candidates_are_the_vocabulary():
    torch.manual_seed(0)
    features, weight = torch.randn(12, 8), torch.randn(30, 8)
    teacher = torch.log_softmax(torch.randn(12, 30), -1)
    full = torch.nn.functional.kl_div(torch.log_softmax(features @ weight.T, -1), teacher, log_target=True,
                                      reduction="batchmean")
    every = torch.arange(30).expand(12, 30)
    kl, _ = candidate_kl(features, weight, teacher, every, torch.zeros(0, dtype=torch.long))
    torch.testing.assert_close(kl, full)
    part, _ = candidate_kl(features, weight, teacher, teacher.topk(4, -1).indices, torch.arange(5))
    assert 0 < float(part) and not torch.isclose(part, full)  # fewer candidates: another (smaller-support) KL


def test_topk_distillation_raises_agreement_with_the_final_layer(tiny_llama, exit_corpus, tmp_path):
    out = tmp_path / "topk.safetensors"
    result = train_exit_heads(tiny_llama, out, [exit_corpus], **(FAST | {"proj": False}), topk=8, rank=8)
    before, after = result["before"]["rows"], result["after"]["rows"]
    # Perplexity, not agreement: on this random model's 1,024 held-out tokens a head's agreement moves by
    # about its noise (0.5-1 point) in 60 steps, while its perplexity falls 7-18x.
    assert all(a["perplexity"] < b["perplexity"] / 2 for b, a in zip(before[:-1], after[:-1]))
    assert result["topk"] == 8 and result["rank"] == 8
    assert sorted(load_file(str(out))) == sorted(f"exit.{d}.{n}.weight" for d in DEPTHS for n in ("norm", "down", "up"))


def test_interrupted_training_resumes_to_the_same_heads(tiny_llama, exit_corpus, trained, tmp_path):
    path, _, _ = trained
    out = tmp_path / "resumed.safetensors"
    calls = 0
    while True:  # time_limit=0: every call trains one step, checkpoints and stops
        result = train_exit_heads(tiny_llama, out, [exit_corpus], **FAST, time_limit=0)
        calls += 1
        if result["finished"]:
            break
        assert result["steps_done"] == calls and not out.exists()
    assert calls == FAST["steps"] and not out.with_suffix(".ckpt.safetensors").exists()
    a, b = load_file(str(path)), load_file(str(out))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_probes_for_trained_heads_ship_in_one_file_with_them(tiny_llama, exit_corpus, trained, tmp_path):
    path, _, _ = trained
    out = tmp_path / "heads_probes.safetensors"
    result = train_exit_probes(tiny_llama, out, [exit_corpus], **PROBES_FAST, heads_path=path)
    assert result["exit_layers"] == list(DEPTHS)
    stored, heads = load_file(str(out)), load_file(str(path))
    assert all(torch.equal(stored[k], v) for k, v in heads.items())  # the heads, unchanged
    assert sorted(set(stored) - set(heads)) == sorted(f"exit.{d}.probe.{n}" for d in DEPTHS for n in ("weight", "bias"))
    eng = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", exit=ExitConfig(measure="probe", threshold=0.5,
                                                                        exit_layers=DEPTHS, heads_path=str(out))))
    loaded = load_exit_heads(out, eng.model)
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    with torch.inference_mode():  # a token that leaves at depth d carries the trained head's top-1 there
        for prompt, o in zip(PROMPTS, outs):
            hidden = eng.model(torch.tensor([prompt]), output_hidden_states=True)[1]
            d = o.exit_layers[0]
            if d < 6:
                assert o.token_ids[0] == int(loaded.logits(d, hidden[d - 1][:, -1]).argmax())
