"""Bad input gets a clear error: the right exception type, and a message that names the problem.

And a rejected request or setting leaves the engine able to serve everything else correctly.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.kv_cache import MemoryBudgetError
from helios_core.models import SUPPORTED_MODEL_TYPES, CheckpointError, UnsupportedModelError, load_model
from helios_core.sampling import SamplingParams

from tiny_models import make_pickle_checkpoint, run_to_completion


MAX_MODEL_LEN = 64
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return tiny_model_dirs["llama_gqa"]  # shared: tests that edit a model work on a copy


@pytest.fixture(scope="module")
def opt(tiny_model_dirs):
    return tiny_model_dirs["opt"]


@pytest.fixture(scope="module")
def engine(llama):
    return LLMEngine(EngineConfig(model=str(llama), dtype="float32", max_model_len=MAX_MODEL_LEN, device="cpu",
                                  early_exit=False))


@pytest.fixture
def idle(engine):
    """The shared engine, checked idle before and after each test (a rejected request must not linger)."""
    assert not engine.has_unfinished()
    yield engine
    assert not engine.has_unfinished() and not engine.scheduler.has_work()


def copy_model(src, dst, edit=None):
    """A copy of a model directory, optionally with config.json edited by `edit(dict)`."""
    shutil.copytree(src, dst)
    if edit is not None:
        config = json.loads((dst / "config.json").read_text())
        edit(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def make(path, **kwargs):
    return LLMEngine(EngineConfig(model=str(path), device="cpu",
                                  **{"max_model_len": MAX_MODEL_LEN, "dtype": "float32", **kwargs}))


# --- prompts -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("empty", ["", []], ids=["text", "ids"])
def test_empty_prompt(idle, empty):
    with pytest.raises(ValueError, match="empty"):
        idle.add_request(empty, GREEDY)


@pytest.mark.parametrize("extra", [0, 1, 50])
def test_prompt_too_long(idle, extra):
    ids = [5] * (MAX_MODEL_LEN + extra)
    with pytest.raises(ValueError, match=r"max_model_len") as err:
        idle.add_request(ids, GREEDY)
    assert str(MAX_MODEL_LEN) in str(err.value) and str(len(ids)) in str(err.value)


def test_prompt_one_below_max_model_len_is_accepted(idle):
    [out] = idle.generate([[5] * (MAX_MODEL_LEN - 1)], GREEDY)
    assert len(out.token_ids) == 1 and out.finish_reason == "length"  # no room for more


@pytest.mark.parametrize("bad_id", [-1, "vocab", 10**9, 1.0, True, "7"])
def test_token_ids_out_of_vocab(idle, bad_id):
    vocab = idle.model_config.vocab_size
    bad = vocab if bad_id == "vocab" else bad_id
    with pytest.raises(ValueError) as err:
        idle.add_request([1, 2, bad, 3], GREEDY)
    msg = str(err.value)
    assert "token" in msg and str(vocab) in msg, msg


def test_text_prompt_without_tokenizer(llama, tmp_path):
    path = copy_model(llama, tmp_path / "no_tok")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).unlink()
    engine = make(path)
    assert engine.tokenizer is None
    with pytest.raises(ValueError, match="tokenizer") as err:
        engine.add_request("hello", GREEDY)
    assert "token ids" in str(err.value)
    # token ids still work
    [out] = engine.generate([[5, 6, 7]], GREEDY)
    assert len(out.token_ids) == 6


# --- sampling params and request ids ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"threshold": -0.5}, "threshold"),
])
def test_invalid_sampling_params_through_add_request(idle, kwargs, field):
    with pytest.raises(ValueError, match=field):
        idle.add_request([1, 2, 3], SamplingParams(**kwargs))


def test_duplicate_request_id(idle):
    idle.add_request([1, 2, 3], GREEDY, request_id="dup")
    with pytest.raises(ValueError, match="dup") as err:
        idle.add_request([4, 5, 6], GREEDY, request_id="dup")
    assert "already" in str(err.value)
    outs = []
    while idle.has_unfinished():
        outs += idle.step()
    assert [o.request_id for o in outs if o.finished] == ["dup"]
    # once finished, the id may be reused
    idle.add_request([1, 2, 3], GREEDY, request_id="dup")
    while idle.has_unfinished():
        idle.step()


def test_bad_request_does_not_corrupt_engine(idle):
    """good, bad (each kind), good: the bad ones raise, the good ones finish exactly as when run alone."""
    vocab = idle.model_config.vocab_size
    a, b = [11, 12, 13, 14, 15], [21, 22, 23]
    alone_a = idle.generate([a], GREEDY)[0].token_ids
    alone_b = idle.generate([b], GREEDY)[0].token_ids

    ra = idle.add_request(a, GREEDY, request_id="a")
    bad_requests = [
        lambda: idle.add_request([], GREEDY),
        lambda: idle.add_request([1, vocab], GREEDY),
        lambda: idle.add_request([3] * MAX_MODEL_LEN, GREEDY),
        lambda: idle.add_request([1, 2], GREEDY, request_id="a"),
        lambda: idle.add_request([1, 2], SamplingParams(max_tokens=-1)),
    ]
    for bad in bad_requests:
        with pytest.raises(ValueError):
            bad()
    first = idle.step()  # a starts
    assert [o.request_id for o in first] == ["a"]
    for bad in bad_requests:  # rejected mid-flight too
        with pytest.raises(ValueError):
            bad()
    rb = idle.add_request(b, GREEDY, request_id="b")
    assert set(idle._requests) == {"a", "b"}
    tokens = run_to_completion(idle)
    tokens[ra] = first[0].new_token_ids + tokens[ra]
    assert set(tokens) == {ra, rb}
    assert tokens[ra] == alone_a and tokens[rb] == alone_b


# --- model directories -----------------------------------------------------------------------------------
def test_nonexistent_model_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    for load in (lambda: make(missing), lambda: load_model(missing)):
        with pytest.raises(FileNotFoundError) as err:
            load()
        assert str(missing) in str(err.value)


def test_directory_without_config(llama, tmp_path):
    path = copy_model(llama, tmp_path / "no_config")
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json") as err:
        make(path)
    assert str(path) in str(err.value)


def test_missing_weights(llama, tmp_path):
    path = copy_model(llama, tmp_path / "no_weights")
    (path / "model.safetensors").unlink()
    for load in (lambda: make(path), lambda: load_model(path)):
        with pytest.raises(CheckpointError, match="safetensors") as err:
            load()
        assert str(path) in str(err.value)


def test_missing_tensor(llama, tmp_path):
    """A safetensors file that lacks a tensor the config implies: the error names the tensor."""
    from safetensors.torch import load_file, save_file

    path = copy_model(llama, tmp_path / "missing_tensor")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert load_model(path, num_layers=1).num_loaded_layers == 1  # layer 1 is not needed
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.k_proj"):
        load_model(path)


def test_pickle_checkpoint_refused(tmp_path):
    path = make_pickle_checkpoint(tmp_path / "pickled")
    assert (path / "pytorch_model.bin").is_file()
    for load in (lambda: make(path), lambda: load_model(path)):
        with pytest.raises(CheckpointError) as err:
            load()
        msg = str(err.value)
        assert "pytorch_model.bin" in msg and "pickle" in msg.lower() and "safetensors" in msg, msg


@pytest.mark.parametrize("model_type", ["bert", "falcon", None])
def test_unsupported_architecture(llama, tmp_path, model_type):
    def edit(config):
        if model_type is None:
            del config["model_type"]
        else:
            config["model_type"] = model_type

    path = copy_model(llama, tmp_path / f"arch_{model_type}", edit)
    with pytest.raises(UnsupportedModelError) as err:
        make(path)
    msg = str(err.value)
    assert str(model_type) in msg
    assert all(t in msg for t in SUPPORTED_MODEL_TYPES), msg


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_scaling(llama, tmp_path, style, kind):
    def edit(config):
        config.pop("rope_parameters", None)
        if style == "rope_parameters":
            config["rope_parameters"] = {"rope_type": kind, "rope_theta": 10000.0, "factor": 4.0}
        else:  # transformers 4 style
            config["rope_theta"] = 10000.0
            config["rope_scaling"] = {"type": kind, "factor": 4.0}

    path = copy_model(llama, tmp_path / f"rope_{style}_{kind}", edit)
    with pytest.raises(UnsupportedModelError, match="rope") as err:
        make(path)
    assert kind in str(err.value)


@pytest.mark.parametrize("option, value", [("final_logit_softcapping", 30.0), ("attn_logit_softcapping", 50.0),
                                           ("use_bidirectional_attention", True)])
def test_gemma3_unimplemented_options_refused(tiny_model_dirs, tmp_path, option, value):
    path = copy_model(tiny_model_dirs["gemma3"], tmp_path / f"gemma3_{option}", lambda c: c.update({option: value}))
    for load in (lambda: make(path), lambda: load_model(path)):
        with pytest.raises(UnsupportedModelError, match=option):
            load()


def test_multimodal_gemma3_refused_with_a_pointer_to_gemma3_text(llama, tmp_path):
    path = copy_model(llama, tmp_path / "gemma3_mm", lambda c: c.update(model_type="gemma3"))
    with pytest.raises(UnsupportedModelError, match="gemma3_text") as err:
        load_model(path)
    assert "multimodal" in str(err.value)


def test_opt_post_norm_refused(opt, tmp_path):
    path = copy_model(opt, tmp_path / "opt_post", lambda c: c.update(do_layer_norm_before=False))
    with pytest.raises(UnsupportedModelError, match="do_layer_norm_before"):
        make(path)
    with pytest.raises(UnsupportedModelError, match="do_layer_norm_before"):
        load_model(path)


# --- engine settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers", [0, -1, 5, 100])
def test_num_layers_out_of_range(llama, num_layers):
    for load in (lambda: load_model(llama, num_layers=num_layers), lambda: make(llama, num_layers=num_layers)):
        with pytest.raises(ValueError, match="num_layers") as err:
            load()
        assert "[1, 4]" in str(err.value) and str(num_layers) in str(err.value)


@pytest.mark.parametrize("num_layers", [0, -1, 5])
def test_set_num_layers_out_of_range(llama, num_layers):
    """A rejected depth names the problem and leaves the engine unchanged (same depth, capacity, pool)."""
    engine = make(llama, num_layers=2, early_exit=False)
    before = (engine.num_layers, engine.capacity, engine.scheduler.blocks.num_blocks, engine.cache.num_blocks,
              engine.cache.num_layers)
    with pytest.raises(ValueError, match="num_layers") as err:
        engine.set_num_layers(num_layers)
    assert "[1, 4]" in str(err.value)
    after = (engine.num_layers, engine.capacity, engine.scheduler.blocks.num_blocks, engine.cache.num_blocks,
             engine.cache.num_layers)
    assert after == before, "(num_layers, capacity, scheduler blocks, cache blocks, cache.num_layers)"
    assert engine.layer_events == []


def test_set_num_layers_rejected_then_serving_is_unharmed(llama):
    """Regression for a crash: after set_num_layers(0) is rejected, the scheduler must not hand out more
    blocks than the KV pool has. Budget: 2 sequences' worth of blocks at depth 2, more at depth 0."""
    small = dict(num_layers=2, max_num_seqs=8, block_size=4)
    blocks = 2 * -(-MAX_MODEL_LEN // 4)
    budget = make(llama, **small).memory.budget_for_blocks(blocks)
    engine = make(llama, memory_budget=budget, early_exit=False, **small)
    assert engine.capacity == 2 and engine.memory.num_blocks == blocks
    prompts = [[5 + i, 6, 7, 8 + i] * (MAX_MODEL_LEN // 5) for i in range(5)]  # 3/4 of max_model_len: 2 fit
    alone = [engine.generate([p], GREEDY)[0].token_ids for p in prompts]
    with pytest.raises(ValueError, match="num_layers"):
        engine.set_num_layers(0)
    outs = engine.generate(prompts, GREEDY)  # 5 requests, blocks for 2 at a time
    assert [o.token_ids for o in outs] == alone
    assert engine.scheduler.blocks.num_blocks == engine.cache.num_blocks == blocks
    assert engine.scheduler.blocks.num_free == blocks  # all returned


def test_max_model_len_above_max_position_embeddings(llama):
    max_pos = json.loads((llama / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ValueError, match="max_position_embeddings") as err:
        make(llama, max_model_len=max_pos + 1)
    assert str(max_pos) in str(err.value) and str(max_pos + 1) in str(err.value)
    assert make(llama, max_model_len=max_pos).max_model_len == max_pos  # the bound itself is fine


def test_memory_budget_too_small(llama):
    with pytest.raises(MemoryBudgetError) as err:
        make(llama, memory_budget=2**20)  # 1 MiB: less than the fp32 weights alone
    msg = str(err.value)
    assert "memory_budget" in msg
    figures = re.findall(r"(\d+(?:\.\d+)?) MiB", msg)
    assert len(figures) >= 2, msg  # the budget and what is needed
    assert float(figures[0]) == pytest.approx(1.0)
    need = float(figures[-1])
    assert need > 1.0
    # the figure is right: a budget of the stated need (rounded up) is enough
    engine = make(llama, memory_budget=int((need + 0.1) * 2**20))
    assert engine.capacity >= 1


def test_memory_budget_too_small_for_set_num_layers(llama):
    """Growing the depth beyond what the budget holds is refused up front, and nothing changes."""
    small = make(llama, num_layers=1, max_num_seqs=1)
    budget = small.memory.total_bytes  # exactly one sequence at depth 1
    engine = make(llama, num_layers=1, max_num_seqs=1, memory_budget=budget)
    with pytest.raises(MemoryBudgetError, match="MiB"):
        engine.set_num_layers(4)
    assert engine.num_layers == 1 and engine.cache.num_layers == 1
    assert engine.scheduler.blocks.num_blocks == engine.cache.num_blocks == engine.memory.num_blocks
    assert engine.capacity == 1
    [out] = engine.generate([[1, 2, 3]], GREEDY)
    assert len(out.token_ids) == 6


@pytest.mark.parametrize("dtype", ["float64", "int8", "half-precision"])
def test_unknown_dtype(llama, dtype):
    with pytest.raises(ValueError, match="dtype") as err:
        make(llama, dtype=dtype)
    assert dtype in str(err.value)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_prefill_tokens": 0}, "max_prefill_tokens"),  # no prompt could ever be prefilled: generate() would spin
    ({"max_prefill_tokens": -5}, "max_prefill_tokens"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_model_len": 0}, "max_model_len"),
    ({"max_model_len": 1}, "max_model_len"),  # no room for a prompt and a generated token
])
def test_invalid_engine_config(llama, kwargs, field):
    """Nonsensical limits are rejected when the engine is built, naming the setting (never a hang later)."""
    with pytest.raises(ValueError, match=field):
        make(llama, **kwargs)
