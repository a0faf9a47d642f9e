"""Quality evaluation: teacher-forced exit analysis (quality.py), generation vs full depth (evaluate.py),
`helios eval`."""

import json
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F
import yaml

from helios_core.cli import main
from helios_core.engine import EngineConfig, LLMEngine, load_tokenizer
from helios_core.evaluate import Prompt, evaluate, lcs_length, load_prompts, rouge_l
from helios_core.exits import ExitConfig, ExitHeads
from helios_core.models import load_model
from helios_core.quality import (analyze, chunk_tokens, cross_tab, load_text_tokens, load_texts, simulate_exits,
                                 tokenize_texts)
from helios_core.sampling import SamplingParams

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"
CODE, PROSE = MODELS / "helios-demo-code-6l", MODELS / "helios-demo-prose-12l"
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, x):", "The module provides"]


@pytest.fixture(scope="module")
def code_model():
    model = load_model(CODE)
    return model, ExitHeads(model)


@pytest.fixture(scope="module")
def code_chunks():
    ids, files = load_text_tokens("stdlib", load_tokenizer(CODE), limit=768)
    assert len(ids) == 768 and files
    return chunk_tokens(ids, 128)


def test_another_tokenizer_reads_the_same_characters_as_the_reference(tiny_llama):
    """load_texts cuts the held-out text where the reference's 768 tokens end: the reference reads it
    back as (nearly) the same tokens, another tokenizer decodes its tokens to exactly that text."""
    ref, other = load_tokenizer(CODE), load_tokenizer(tiny_llama)
    ids, files = load_text_tokens("stdlib", ref, limit=768)
    texts = load_texts("stdlib", ref, 768)
    assert len(texts) == len(files) and all(whole for _, whole in texts[:-1])
    for (text, _), f in zip(texts, files):
        assert f.read_text(encoding="utf-8", errors="replace").startswith(text)
    again = tokenize_texts(texts, ref)
    assert abs(len(again) - 768) <= 2 and again[:760] == ids[:760]  # a cut may re-merge the last token
    theirs = tokenize_texts(texts, other)
    assert len(theirs) != len(ids)  # another segmentation of the same characters
    eos = other.convert_ids_to_tokens(other.eos_token_id)
    assert other.decode(theirs).replace(eos, "") == "".join(text for text, _ in texts)


# --- metrics and prompt files -------------------------------------------------------------------------
def test_lcs_and_rouge_l():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length([1, 2, 3], []) == 0
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)  # LCS 1,3,4: P = R = 3/4
    assert rouge_l([1, 2], [1, 2, 3, 4]) == pytest.approx(2 / 3)  # P = 1, R = 1/2
    assert rouge_l([4, 3, 2, 1], [1, 2, 3, 4]) == pytest.approx(0.25)  # order matters
    assert rouge_l([5, 6], [1, 2]) == 0.0
    assert rouge_l([], []) == 1.0 and rouge_l([], [1]) == 0.0 and rouge_l([1], []) == 0.0


def test_prompt_files(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "def f():", "max_tokens": 5, "task": "code"}\n\n{"prompt": "Hello"}\n')
    assert load_prompts(jsonl) == [Prompt("def f():", 5, "code"), Prompt("Hello")]
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  \nsecond {not json}\n")
    assert load_prompts(txt) == [Prompt("first prompt"), Prompt("second {not json}")]

    bad = {
        '{"prompt": "ok"}\n{"prompt": "x",\n': "bad.jsonl:2: invalid JSON",
        '{"prompt": "ok"}\n\n{"text": "x"}\n': 'bad.jsonl:3: expected an object with a non-empty string "prompt"',
        '["prompt"]\n': "bad.jsonl:1: expected an object",
        '{"prompt": "x", "max_tokens": 0}\n': 'bad.jsonl:1: "max_tokens" must be a positive integer',
        '{"prompt": "x", "max_tokens": "5"}\n': 'bad.jsonl:1: "max_tokens" must be a positive integer',
        "\n\n": "has no prompts",
    }
    for content, message in bad.items():
        (tmp_path / "bad.jsonl").write_text(content)
        with pytest.raises(ValueError, match=message):
            load_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(tmp_path / "nope.txt")


# --- the simulated exit decision is the engine's -------------------------------------------------------
@pytest.mark.parametrize("num_layers, measure, threshold, gate", [(None, "max_prob", 0.5, None),
                                                                  (4, "max_prob", 0.5, None),
                                                                  (None, "cosine", 0.95, None),
                                                                  (None, "max_prob", 0.5, 0.3)])
def test_teacher_forced_exits_match_the_engine(num_layers, measure, threshold, gate):
    heads = str(CODE / "exit_probes.safetensors") if gate is not None else None
    exit_config = ExitConfig(threshold=threshold, measure=measure, probe_gate=gate, heads_path=heads)
    engine = LLMEngine(EngineConfig(model=str(CODE), dtype="float32", num_layers=num_layers, exit=exit_config))
    outs = engine.generate(PROMPTS[:3], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    depths = set()
    for out in outs:
        start = len(out.prompt_token_ids) - 1  # the last prompt token is fed by the first decode step
        tokens = torch.tensor([out.prompt_token_ids + out.token_ids[:-1]])
        trace = simulate_exits(engine.model, engine.heads, tokens, exit_config, start=start)
        assert trace.depth[0, start:].tolist() == out.exit_layers
        assert trace.forced[0, start:].tolist() == out.forced
        assert trace.logits[0, start:].argmax(-1).tolist() == out.token_ids  # greedy: the exit layer's top-1
        assert trace.confidence[0, start:].tolist() == pytest.approx([r.confidence for r in out.records], abs=1e-4)
        assert (trace.depth[0, :start] == 0).all()
        depths |= set(out.exit_layers)
    # Early and late exits mixed in one sequence: later tokens see K/V from frozen exit states.
    assert len(depths) >= 3


# --- generation vs full depth --------------------------------------------------------------------------
def test_threshold_above_one_is_the_full_model(tiny_llama):
    prompts = [Prompt("def main():", 10, "code"), Prompt("x = 1", 6)]
    report = evaluate(str(tiny_llama), prompts, threshold=1.5, max_tokens=8, dtype="float32")
    assert report.token_agreement == report.exact_match == report.rouge_l == 1.0
    assert report.exit_histogram == {6: 16} and report.tokens_full == report.tokens_early == 16
    assert report.forced_share == report.breach_rate == 0.0
    assert report.perplexity_early == pytest.approx(report.perplexity_full)
    assert [len(r.full_ids) for r in report.results] == [10, 6] and report.results[0].task == "code"

    # Perplexity under the full model, recomputed independently with transformers.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(tiny_llama)
    nll = []
    for prompt, result in zip(prompts, report.results):
        ids = tokenizer(prompt.text).input_ids
        assert result.prompt_tokens == len(ids)
        with torch.no_grad():
            logits = hf(torch.tensor([ids + result.full_ids])).logits[0, len(ids) - 1 : -1]
        token_nll = -torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(result.full_ids)[:, None])[:, 0]
        assert result.perplexity_full == pytest.approx(math.exp(float(token_nll.mean())), rel=1e-4)
        nll += token_nll.tolist()
    assert report.perplexity_full == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_threshold_zero_and_partial_loading(tiny_llama):
    zero = evaluate(str(tiny_llama), ["def main():", "x = 1"], threshold=0.0, max_tokens=8, dtype="float32")
    assert zero.exit_histogram == {1: 16} and zero.forced_share == 0.0
    assert zero.loaded_layers == zero.num_layers == 6

    forced = evaluate(str(tiny_llama), ["def main():", "x = 1"], threshold=1.5, layers=3, max_tokens=8,
                      dtype="float32")
    assert forced.loaded_layers == 3 and forced.exit_histogram == {3: 16}
    assert forced.forced_share == forced.breach_rate == 1.0  # every token forced at K, all below threshold
    assert 0.0 <= forced.token_agreement <= 1.0 and forced.perplexity_early > 0
    for r in forced.results:
        assert r.rouge_l == rouge_l(r.early_ids, r.full_ids) and len(r.full_ids) == 8
    with pytest.raises(ValueError, match=r"layers must be in \[1, 6\], got 7"):
        evaluate(str(tiny_llama), ["x"], layers=7)


# --- teacher-forced analysis on text -------------------------------------------------------------------
def test_quality_report_on_held_out_code(code_model, code_chunks):
    model, heads = code_model
    report = analyze(model, heads, code_chunks, ExitConfig(threshold=0.8), name="code")
    n, table = report.tokens, report.table
    assert n == 6 * 127 and report.num_layers == 6 and len(report.depths) == 6
    last = report.depths[-1]
    assert last.agreement == 1.0 and last.below_threshold_agreement in (1.0, None)
    assert report.depths[0].agreement < 1.0 and report.depths[0].perplexity > last.perplexity
    e = report.exit
    assert sum(e.histogram.values()) == n and e.exit_share_within[6] == 1.0
    assert e.forced_share == e.breach_rate == 0.0  # every layer loaded: the last one is no forced exit
    assert 0 < e.early_share < 1 and 1 < e.mean_exit_layer < 6
    # Tokens that leave early were confident there; the others were not, at any exit point.
    early = table.exit_depth < 6
    assert (table.exit_confidence[early] >= 0.8).all()
    assert table.top1.shape == (n, 6) and table.targets.tolist()[:5] == code_chunks[0][1:6]
    json.dumps(report.to_dict())

    # Perplexity at the last depth is the model's: transformers on the same chunks.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(CODE), dtype=torch.float32).eval()
    with torch.no_grad():
        tokens = torch.tensor(code_chunks)
        logits = hf(tokens).logits[:, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert last.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_thresholds_and_partial_loading_on_text(code_model, code_chunks):
    model, heads = code_model
    chunks = code_chunks[:2]
    never = analyze(model, heads, chunks, ExitConfig(threshold=1.5))
    n = never.tokens
    assert never.exit.histogram == {6: n} and never.exit.agreement == 1.0
    assert never.exit.perplexity == pytest.approx(never.depths[-1].perplexity, rel=1e-5)

    always = analyze(model, heads, chunks, ExitConfig(threshold=0.0))
    assert always.exit.histogram == {1: n} and always.exit.exit_share_within[1] == 1.0
    # Every token leaves at depth 1, which no earlier exit can have changed: the depth-1 numbers.
    assert always.exit.perplexity == pytest.approx(always.depths[0].perplexity, rel=1e-5)
    assert always.exit.accuracy == always.depths[0].accuracy

    gaps = analyze(model, heads, chunks, ExitConfig(threshold=0.0, exit_layers=(2, 4)))
    assert gaps.exit.histogram == {2: n}

    three = analyze(model, heads, chunks, ExitConfig(threshold=1.5), loaded_layers=3)
    assert three.exit.histogram == {3: n} and three.exit.loaded_layers == 3
    assert three.exit.forced_share == three.exit.breach_rate == 1.0
    assert three.exit.perplexity == pytest.approx(three.depths[2].perplexity, rel=1e-5)
    assert three.depths[-1].agreement == 1.0  # per-depth numbers still use every layer

    with pytest.raises(ValueError, match="needs every layer loaded"):
        analyze(load_model(CODE, num_layers=3), heads, chunks)


def test_cross_tab_of_two_models_sharing_a_tokenizer(code_model, code_chunks):
    model, heads = code_model
    chunks = code_chunks[:2]
    prose = load_model(PROSE)
    a = analyze(model, heads, chunks, ExitConfig(threshold=0.6))
    b = analyze(prose, ExitHeads(prose), chunks, ExitConfig(threshold=0.6))
    tab = cross_tab(a.table.exit_depth, 6, b.table.exit_depth, 12)
    assert tab.both_early + tab.a_only + tab.b_only + tab.neither == tab.tokens == a.tokens
    assert tab.both_early == int(((a.table.exit_depth <= 3) & (b.table.exit_depth <= 6)).sum())
    d = tab.to_dict()
    assert d["b_early_given_a_late"] == pytest.approx(tab.b_only / (tab.b_only + tab.neither))

    hand = cross_tab(torch.tensor([1, 2, 4, 6]), 6, torch.tensor([12, 3, 5, 12]), 12, early_fraction=0.5)
    assert (hand.both_early, hand.a_only, hand.b_only, hand.neither) == (1, 1, 1, 1)
    assert hand.b_early_given_a_late == 0.5 and hand.a_early_given_b_late == 0.5
    with pytest.raises(ValueError, match="different tokens"):
        cross_tab(torch.tensor([1, 2]), 6, torch.tensor([1]), 12)


# --- `helios eval` -------------------------------------------------------------------------------------
def test_cli_json_and_errors(tiny_llama, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def main():", "task": "code"}\n{"prompt": "x = 1", "max_tokens": 3}\n')
    assert main(["eval", "--model", str(tiny_llama), "--prompts", str(prompts), "--threshold", "0.5",
                 "--layers", "4", "--max-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"mode", "model", "prompts_file", "num_layers", "loaded_layers", "threshold", "measure", "prompts",
            "tokens_full", "tokens_early", "token_agreement", "exact_match", "rouge_l", "perplexity_full",
            "perplexity_early", "exit_histogram", "mean_exit_layer", "forced_share", "breach_rate",
            "tokens_per_s_full", "tokens_per_s_early", "per_prompt"} == set(out)
    assert out["mode"] == "prompts" and out["loaded_layers"] == 4 and out["tokens_early"] == 8
    assert [len(p["early_ids"]) for p in out["per_prompt"]] == [5, 3]

    text = tmp_path / "text.py"
    text.write_text("def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n" * 8)
    assert main(["eval", "--model", str(CODE), "--text", str(text), "--limit", "100", "--chunk-len", "64",
                 "--layers", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"mode", "model", "source", "num_layers", "tokens", "depths", "exit"} == set(out)
    assert out["mode"] == "text" and out["tokens"] == 63 + 35 and len(out["depths"]) == 6
    assert {"depth", "perplexity", "accuracy", "agreement", "mean_confidence", "below_threshold",
            "below_threshold_agreement", "below_half", "below_half_agreement"} == set(out["depths"][0])
    assert {"threshold", "measure", "loaded_layers", "histogram", "exit_share_within", "mean_exit_layer",
            "early_share", "perplexity", "accuracy", "agreement", "forced_share", "breach_rate"} == set(out["exit"])
    assert out["exit"]["loaded_layers"] == 4 and set(out["exit"]["histogram"]) <= {"1", "2", "3", "4"}

    assert main(["eval", "--model", str(CODE), "--text", str(text), "--limit", "100"]) == 0
    table = capsys.readouterr().out
    assert "helios-demo-code-6l" in table and "early exit: ppl" in table and len(table.splitlines()) == 9

    errors = {
        ("--prompts", str(tmp_path / "missing.jsonl")): "missing.jsonl does not exist",
        ("--prompts", str(prompts), "--threshold", "-1"): "threshold must be >= 0",
        ("--prompts", str(prompts), "--layers", "9"): r"layers must be in [1, 6], got 9",
        ("--text", str(tmp_path / "missing_dir")): "does not exist",
    }
    for args, message in errors.items():
        with pytest.raises(SystemExit) as exc:
            main(["eval", "--model", str(tiny_llama), *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("helios: error: ") and message in err
        assert len(err.strip().splitlines()) == 1


def test_quality_oracle_gives_another_familys_perplexity_per_reference_token(tiny_llama, tmp_path):
    """The bench's oracle over two tokenizer families: the reference's figures are those of an oracle of
    its family alone; the other model's perplexity is its NLL of the same text (transformers' logits)
    over the reference's token count."""
    from tiny_models import hf_logits

    from helios_core.benchmark.quality import NO_EXIT, QualityOracle
    from helios_core.policy import Registry

    def registry(models: dict) -> Registry:
        path = tmp_path / f"{len(models)}.yaml"
        path.write_text(yaml.safe_dump({"models": [{"name": n, "path": str(p), "exit_layers": []}
                                                   for n, p in models.items()]}))
        return Registry.load(str(path), "float32")

    both = QualityOracle(registry({"demo": CODE, "tiny": tiny_llama}), ["stdlib"], 256, chunk_len=128,
                         reference="demo")
    alone = QualityOracle(registry({"demo": CODE}), ["stdlib"], 256, chunk_len=128)
    assert both.tokens == alone.tokens
    assert both.mixture({("demo", 6, None): 1}, {"demo": NO_EXIT}) == alone.mixture({("demo", 6, None): 1},
                                                                                     {"demo": NO_EXIT})
    chunks = [c for c in both._chunks["tiny"] if len(c) > 1]
    nll = sum(float(F.cross_entropy(hf_logits(tiny_llama, c)[0, :-1], torch.tensor(c[1:]), reduction="sum"))
              for c in chunks)
    hf = both.transformers("tiny")
    assert hf["perplexity"] == pytest.approx(math.exp(nll / both.tokens), rel=1e-4)
    ours = both.mixture({("tiny", 6, None): 1}, {"tiny": NO_EXIT})
    assert ours["perplexity"] == pytest.approx(hf["perplexity"], rel=1e-3)
    assert ours["agreement_with_full_depth"] == 1.0


def test_cli_eval_measures_the_int8_weights(capsys):
    """`helios eval --quantization int8` scores the int8 model: on held-out code its full-depth
    perplexity moves, by little (int8 keeps each weight within half a step of its row's scale)."""
    def full_depth(*extra: str) -> dict:
        assert main(["eval", "--model", str(CODE), "--text", "stdlib", "--limit", "512", "--chunk-len", "128",
                     "--dtype", "float32", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["depths"][-1]

    plain, int8 = full_depth(), full_depth("--quantization", "int8")
    assert int8["perplexity"] != plain["perplexity"]
    assert int8["perplexity"] == pytest.approx(plain["perplexity"], rel=0.05)
    assert abs(int8["accuracy"] - plain["accuracy"]) < 0.03
