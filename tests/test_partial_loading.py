"""Partial layer loading: a model holding only layers [0, K), exactly sized, reading only what it holds.

Expected byte counts are computed independently of helios_core, from the safetensors file headers
(8-byte little-endian header length, then a JSON map name -> {dtype, shape, data_offsets}).
Reference logits/tokens for a depth-K model come from transformers loaded with num_hidden_layers=K
(it keeps the first K layers and still applies the final norm and LM head).
"""

from __future__ import annotations

import functools
import json
import re
import struct
from pathlib import Path

import pytest
import torch

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.models import CheckpointError, load_layers, load_model, unload_layers
from helios_core.sampling import SamplingParams

from tiny_models import FAMILIES, hf_greedy, make_tiny_checkpoint


FULL = 4  # layers in every tiny checkpoint
MAX_MODEL_LEN = 128
GREEDY16 = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def prompt(length: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(1000 * seed + length)
    return torch.randint(0, 300, (length,), generator=g).tolist()


IDS = torch.tensor([prompt(24)])


# --- independent byte accounting from the safetensors headers ----------------------------------------------
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
_GLOBAL = re.compile(r"(embed_tokens|embed_positions|wte|wpe|norm|ln_f|final_layer_norm|lm_head)\.(weight|bias)$")


def header_sizes(path) -> dict[str, tuple[int, str]]:
    """tensor name -> (byte size, file name) over every *.safetensors file in the directory."""
    sizes = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                sizes[name] = (end - start, file.name)
    return sizes


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def expected_bytes(path, num_layers: int, first: int = 0) -> int:
    """Bytes of the globals (embeddings, final norm, untied lm_head) when first == 0, plus layers
    [first, num_layers)."""
    total = 0
    for name, (size, _) in header_sizes(path).items():
        layer = layer_of(name)
        if layer is None:
            assert _GLOBAL.search(name), f"unexpected non-layer tensor {name} in the checkpoint"
            total += size if first == 0 else 0
        elif first <= layer < num_layers:
            total += size
    return total


@functools.lru_cache(maxsize=None)
def hf_truncated(path: str, num_layers: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, num_hidden_layers=num_layers)
    assert model.config.num_hidden_layers == num_layers
    return model.eval()


@torch.no_grad()
def hf_truncated_logits(path, num_layers: int, ids: torch.Tensor) -> torch.Tensor:
    return hf_truncated(str(path), num_layers)(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               use_cache=False).logits


@torch.no_grad()
def hf_truncated_greedy(path, num_layers: int, ids: list[int], n: int) -> list[int]:
    model = hf_truncated(str(path), num_layers)
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1, max_new_tokens=n,
                         eos_token_id=None, pad_token_id=model.config.pad_token_id)
    return out[0, len(ids):].tolist()


# --- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tiny_model_dirs):
    return tiny_model_dirs  # family -> 4-layer checkpoint (conftest); never modified here


@pytest.fixture(scope="module")
def llama(ckpts):
    return ckpts["llama_gqa"]


def make_engine(path, **overrides) -> LLMEngine:
    kwargs = dict(model=str(path), early_exit=False, max_model_len=MAX_MODEL_LEN, device="cpu", dtype="float32")
    kwargs.update(overrides)
    return LLMEngine(EngineConfig(**kwargs))


# --- model level -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_partial_model_holds_k_blocks_with_exact_bytes(ckpts, family):
    path = ckpts[family]
    full = load_model(path)
    assert full.weight_bytes() == expected_bytes(path, FULL)
    assert full.checkpoint.bytes_read == expected_bytes(path, FULL)
    for k in (1, 2):
        model = load_model(path, num_layers=k)
        assert model.num_loaded_layers == k
        assert [b.index for b in model.layers] == list(range(k))
        assert not any(p.is_meta for p in model.parameters())
        # exact: embeddings + final norm (+ untied lm_head) + layers < k, tied weights counted once
        assert model.weight_bytes() == expected_bytes(path, k) < full.weight_bytes()
        # and it read exactly those tensors, nothing of the layers it does not hold
        assert model.checkpoint.bytes_read == expected_bytes(path, k) < full.checkpoint.bytes_read


@pytest.mark.parametrize("family", FAMILIES)
def test_partial_model_logits_match_truncated_hf(ckpts, family):
    path = ckpts[family]
    ours = load_model(path, num_layers=2)(IDS)
    torch.testing.assert_close(ours, hf_truncated_logits(path, 2, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_then_unload_layers(ckpts, family):
    path = ckpts[family]
    model = load_model(path, num_layers=1)
    direct = {k: load_model(path, num_layers=k)(IDS) for k in (1, 3, FULL)}

    read = load_layers(model, 3)
    assert read == expected_bytes(path, 3, first=1)  # only the new layers' tensors
    assert model.num_loaded_layers == 3
    assert torch.equal(model(IDS), direct[3])
    assert model.weight_bytes() == expected_bytes(path, 3)

    read = load_layers(model, FULL)
    assert read == expected_bytes(path, FULL, first=3)
    assert torch.equal(model(IDS), direct[FULL])
    assert model.weight_bytes() == expected_bytes(path, FULL)

    before = model.weight_bytes()
    unload_layers(model, 1)
    assert model.num_loaded_layers == 1
    assert before - model.weight_bytes() == expected_bytes(path, FULL, first=1)  # exactly the dropped blocks
    assert torch.equal(model(IDS), direct[1])

    assert load_layers(model, 2) == expected_bytes(path, 2, first=1)  # re-reading after an unload works


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, llama):
    """llama_gqa (same seed as `llama`) saved in ~26 shards, with every shard that holds only tensors of
    layers >= 2 deleted."""
    path = make_tiny_checkpoint("llama_gqa", tmp_path_factory.mktemp("sharded") / "m", max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    by_file: dict[str, list[str]] = {}
    for name, file in index.items():
        by_file.setdefault(file, []).append(name)
    assert len(by_file) > 4, "expected a sharded checkpoint"
    # while complete, the sharded checkpoint loads to the same model as the single-file one
    assert torch.equal(load_model(path)(IDS), load_model(llama)(IDS))
    deleted = sorted(f for f, names in by_file.items()
                     if all(layer_of(n) is not None and layer_of(n) >= 2 for n in names))
    assert deleted
    for file in deleted:
        (path / file).unlink()
    return path, deleted


def test_partial_loading_works_with_upper_shards_missing(sharded, llama):
    path, deleted = sharded
    model = load_model(path, num_layers=2)
    assert model.num_loaded_layers == 2
    assert torch.equal(model(IDS), load_model(llama, num_layers=2)(IDS))
    assert model.weight_bytes() == expected_bytes(llama, 2)
    assert model.checkpoint.bytes_read == expected_bytes(llama, 2)

    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert any(f in msg for f in deleted) and "missing" in msg, msg

    with pytest.raises(CheckpointError) as err:
        load_layers(model, 3)
    assert any(f in str(err.value) for f in deleted)
    assert model.num_loaded_layers == 2  # the failed read added nothing
    assert torch.equal(model(IDS), load_model(llama, num_layers=2)(IDS))

    with pytest.raises(CheckpointError, match="missing"):
        make_engine(path)  # full depth


def test_engine_consistent_after_failed_layer_load(sharded, llama):
    """set_num_layers that cannot read the new layers must raise and leave the engine as it was: same
    depth, capacity, KV pool, and in-flight requests finish with the right tokens."""
    path, _ = sharded
    engine = make_engine(path, num_layers=2)
    ids = prompt(10)
    rid = engine.add_request(ids, GREEDY16)
    tokens = []
    for _ in range(3):
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert len(tokens) == 3
    capacity, blocks, cache_layers = engine.capacity, engine.memory.num_blocks, engine.cache.num_layers
    with pytest.raises(CheckpointError):
        engine.set_num_layers(FULL)
    assert engine.num_layers == 2
    assert engine.capacity == capacity
    assert engine.scheduler.blocks.num_blocks == engine.cache.num_blocks == engine.memory.num_blocks == blocks
    assert engine.cache.num_layers == cache_layers == 2
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids if out.request_id == rid else []
    assert engine._requests == {}
    assert len(tokens) == 16
    assert tokens == hf_truncated_greedy(llama, 2, ids, 16)


# --- engine level ------------------------------------------------------------------------------------------
def test_engine_partial_depth_then_full_depth(llama):
    ids = prompt(12)
    engine = make_engine(llama, num_layers=2)
    assert engine.num_layers == 2 and engine.model.weight_bytes() == expected_bytes(llama, 2)
    [out] = engine.generate([ids], GREEDY16)
    assert out.token_ids == hf_truncated_greedy(llama, 2, ids, 16)
    assert out.exit_layers == [2] * 16 and all(out.forced)  # forced exit at the last loaded layer

    event = engine.set_num_layers(FULL)
    assert (event.from_layers, event.to_layers) == (2, FULL)
    assert event.bytes_read == expected_bytes(llama, FULL, first=2)
    assert engine.num_layers == FULL and engine.cache.num_layers == FULL
    assert engine.model.weight_bytes() == expected_bytes(llama, FULL)
    [out] = engine.generate([ids], GREEDY16)
    assert out.token_ids == hf_greedy(llama, ids, 16)
    assert out.exit_layers == [FULL] * 16 and not any(out.forced)

    engine.set_num_layers(1)
    assert engine.model.weight_bytes() == expected_bytes(llama, 1)
    assert engine.cache.num_layers == 1
    [out] = engine.generate([ids], GREEDY16)
    assert out.token_ids == hf_truncated_greedy(llama, 1, ids, 16)


def _assert_tokens_follow_depths(path, prompt_ids: list[int], outputs: list[int], depths: list[int]) -> None:
    """Each output token must be the greedy token of the model at the depth it was produced with, given
    everything before it (checked by one HF forward per depth over the final sequence)."""
    seq = torch.tensor([prompt_ids + outputs[:-1]])
    argmax = {d: hf_truncated_logits(path, d, seq)[0].argmax(-1).tolist() for d in set(depths)}
    for i, (token, depth) in enumerate(zip(outputs, depths)):
        assert token == argmax[depth][len(prompt_ids) - 1 + i], f"output {i} (depth {depth})"


def test_in_flight_requests_survive_depth_changes(llama):
    """Requests mid-generation survive growing (with preemption: fewer blocks at full depth) and shrinking
    the loaded depth, finish with max_tokens tokens, and every token is the greedy token of the depth
    it was generated at (depth per token from the telemetry records)."""
    small = dict(max_prefill_tokens=8, max_model_len=40, block_size=4)  # 10 blocks hold one whole sequence
    budget = make_engine(llama, **small).memory.budget_for_blocks(10)  # just one sequence at full depth
    engine = make_engine(llama, num_layers=2, memory_budget=budget, **small)
    assert engine.memory.num_blocks >= 3 * 10  # at 2 layers every sequence fits

    max_tokens = 20
    prompts = [prompt(n, seed=5) for n in (6, 17, 11)]
    rids = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
            for p in prompts]
    tokens = {r: [] for r in rids}
    depths = {r: [] for r in rids}
    finished = {}

    def run(steps: int | None) -> None:
        n = 0
        while engine.has_unfinished() and (steps is None or n < steps):
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
                depths[out.request_id] += [r.exit_layer for r in out.new_records]
                if out.finished:
                    finished[out.request_id] = out.finish_reason
            n += 1

    def consistent(depth: int) -> None:
        assert engine.num_layers == engine.cache.num_layers == depth
        assert engine.memory.num_blocks == engine.scheduler.blocks.num_blocks == engine.cache.num_blocks
        assert engine.scheduler.blocks.num_used <= engine.memory.num_blocks
        assert engine.model.weight_bytes() == expected_bytes(llama, depth)

    run(6)
    assert all(0 < len(t) < max_tokens for t in tokens.values())
    assert engine.scheduler.num_preempted == 0
    event = engine.set_num_layers(FULL)
    consistent(FULL)
    assert engine.memory.num_blocks == 10 and event.preempted >= 1  # the newest left for the queue
    assert len(engine.scheduler.running) == 3 - event.preempted == 3 - len(engine.scheduler.waiting)
    run(5)
    event = engine.set_num_layers(1)
    consistent(1)
    assert event.capacity_after > event.capacity_before
    run(4)
    engine.set_num_layers(3)
    consistent(3)
    run(None)

    assert finished == {r: "length" for r in rids}
    assert not engine.has_unfinished() and engine.scheduler.running == []
    for rid, ids in zip(rids, prompts):
        assert len(tokens[rid]) == len(depths[rid]) == max_tokens
        _assert_tokens_follow_depths(llama, ids, tokens[rid], depths[rid])
    assert set(depths[rids[0]]) == {1, 2, 3, FULL}


def test_loading_layers_does_not_stall_decoding_requests(llama):
    """Growing the depth under decoding requests: every one of them gets its next token in the very
    next step (at the depth its context has, forced) while its context is refilled for the new layers
    a chunk per step beside the decodes; then it runs at full depth. Every token is the greedy token
    of the depth it was produced at."""
    engine = make_engine(llama, num_layers=2, max_prefill_tokens=8)
    prompts = [prompt(n, seed=9) for n in (14, 20, 9)]
    rids = [engine.add_request(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)) for p in prompts]
    tokens = {r: [] for r in rids}
    depths = {r: [] for r in rids}

    def step() -> set[str]:
        emitted = set()
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            depths[out.request_id] += [r.exit_layer for r in out.new_records]
            emitted |= {out.request_id} if out.new_token_ids else set()
        return emitted

    while not all(tokens.values()):
        step()
    for _ in range(3):
        step()
    engine.set_num_layers(FULL)
    refilling = [s for s in engine.scheduler.running if s.depth_cap == 2]
    assert len(refilling) == 3  # every running sequence keeps its cache and decodes on
    steps = 0
    while any(s.depth_cap is not None for s in engine.scheduler.running):
        assert step() == set(rids)  # no stall: every request got a token this step
        steps += 1
    assert steps > 2  # the refill took several steps (8 prefill tokens per step)
    while engine.has_unfinished():
        step()
    for rid, ids in zip(rids, prompts):
        assert len(tokens[rid]) == 24
        assert depths[rid][-1] == FULL and 2 in depths[rid]
        _assert_tokens_follow_depths(llama, ids, tokens[rid], depths[rid])
