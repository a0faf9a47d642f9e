"""The compiled decode step (`EngineConfig.compile`, helios_core/runner.py): compiled before serving,
token for token transformers' greedy decoding in fp32 at one row and at several, recompiled for a new
depth, steps with exits left eager, and weight-only int8 traceable."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from tiny_models import SAMPLE_PROMPT, hf_greedy, make_tiny_checkpoint
from torch._dynamo.utils import counters

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.exits import ExitConfig
from helios_core.models.quantize import int8_linear, quantize_rows, scale_dtype
from helios_core.runner import COMPILED_ROWS
from helios_core.sampling import SamplingParams

PROMPTS = [SAMPLE_PROMPT, "def add(a, b):", "The quick brown fox"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
# inductor compiles C++ on the CPU; without a compiler the engine decodes eagerly (the last test).
needs_cxx = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="no C++ compiler")


@pytest.fixture(scope="module", autouse=True)
def fresh_compiler():
    """Compiled graphs are process-wide state: start from none and leave none behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_checkpoint("llama_gqa", tmp_path_factory.mktemp("compile") / "llama", num_layers=4)


def _engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", early_exit=False, **kw))


@needs_cxx
def test_compiled_engine_decodes_as_transformers_and_compiled_before_serving(llama):
    graphs = counters["stats"]["unique_graphs"]
    engine = _engine(llama, compile=True)
    assert counters["stats"]["unique_graphs"] > graphs  # warm_up compiled at construction
    compiled = counters["stats"]["unique_graphs"]
    step, rows = engine.runner._compiled, []
    engine.runner._compiled = lambda tokens, *rest: rows.append(len(tokens)) or step(tokens, *rest)
    # One row, then several (one graph serves 2..COMPILED_ROWS rows).
    done = engine.generate([PROMPTS[0]], GREEDY) + engine.generate(PROMPTS, GREEDY)
    assert counters["stats"]["unique_graphs"] == compiled  # serving did not wait on the compiler
    assert {1, len(PROMPTS)} <= set(rows) and len(PROMPTS) <= COMPILED_ROWS  # the compiled step served both
    for d in done:
        assert d.token_ids == hf_greedy(llama, d.prompt_token_ids, GREEDY.max_tokens)


@needs_cxx
def test_new_depth_is_compiled_when_loaded_and_decodes_as_the_eager_engine(llama):
    compiled, eager = _engine(llama, compile=True), _engine(llama)
    for engine in (compiled, eager):
        engine.set_num_layers(2)
    graphs = counters["stats"]["unique_graphs"]
    compiled.set_num_layers(3)
    assert counters["stats"]["unique_graphs"] > graphs
    eager.set_num_layers(3)
    want = [d.token_ids for d in eager.generate(PROMPTS, GREEDY)]
    assert [d.token_ids for d in compiled.generate(PROMPTS, GREEDY)] == want


def test_steps_with_exits_run_eagerly_and_exit_as_without_compile(llama):
    """A row that may exit branches on its confidence: those steps are not compiled, and exit exactly
    where the eager engine's do."""
    exits = ExitConfig(exit_layers=(1, 2, 3), threshold=0.2)
    runs = []
    for compile in (True, False):
        engine = LLMEngine(EngineConfig(model=str(llama), dtype="float32", exit=exits, compile=compile))
        done = engine.generate(PROMPTS, GREEDY)
        runs.append(([d.token_ids for d in done], dict(engine.stats.histogram)))
    assert runs[0] == runs[1]
    assert sum(n for depth, n in runs[0][1].items() if depth < 4) > 0  # some tokens did exit early


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_product_compiles_after_elementwise_ops(dtype):
    """An int8 product whose input is a fused elementwise result (a norm, a cast) compiles, and computes
    what the eager kernel does."""
    torch.manual_seed(0)
    q, scale = quantize_rows(torch.randn(48, 32), scale_dtype(dtype))
    x = torch.randn(3, 32, dtype=dtype)

    def norm_then_product(x):
        return int8_linear(F.rms_norm(x, (32,)) * 2, q, scale)

    got = torch.compile(norm_then_product, dynamic=True)(x)
    want = norm_then_product(x)
    assert got.dtype == dtype and got.shape == (3, 48)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-5)


def test_without_a_cxx_compiler_the_engine_says_so_and_decodes_eagerly(llama, caplog):
    torch._dynamo.reset()  # no graph from another test may serve this one
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
        engine = _engine(llama, compile=True)
    assert engine.runner._compiled is None
    assert "torch.compile failed, decoding eagerly" in caplog.text and "nonexistent" in caplog.text
    [done] = engine.generate([PROMPTS[0]], GREEDY)
    assert done.token_ids == hf_greedy(llama, done.prompt_token_ids, GREEDY.max_tokens)
