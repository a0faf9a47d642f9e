"""The paged KV cache: block allocation, attention over block tables, preemption, and the memory budget.

transformers stays the oracle through the engine tests (tests/test_oracle.py runs every family with
3-position blocks); here the attention over block tables is checked against plain attention over
the same keys gathered contiguously, and the engine against itself: a sequence decoded alone equals
it decoded in a crowded pool where blocks run out and sequences are preempted and recomputed.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helios_core.blocks import BlockAllocator, OutOfBlocks
from helios_core.engine import EngineConfig, LLMEngine
from helios_core.kv_cache import DecodeKV, KVCache, MemoryBudgetError, PrefillKV, blocks_for
from helios_core.models.config import ModelConfig
from helios_core.models.transformer import attend
from helios_core.sampling import SamplingParams

from tiny_models import run_to_completion


# --- the allocator ---------------------------------------------------------------------------------------
def test_allocator_hands_out_the_lowest_free_block_and_counts_holders():
    blocks = BlockAllocator(6)
    assert [blocks.allocate() for _ in range(4)] == [0, 1, 2, 3]
    blocks.free(1)
    blocks.free(0)
    assert blocks.num_free == 4 and blocks.allocate() == 0  # lowest first, not last freed
    blocks.refs[2] += 1  # a second holder (a shared prefix block)
    blocks.free(2)
    assert blocks.refs[2] == 1 and blocks.num_free == 3  # still held
    assert [blocks.allocate() for _ in range(3)] == [1, 4, 5]
    with pytest.raises(OutOfBlocks, match="6 KV blocks"):
        blocks.allocate()


def test_allocator_resize_renumbers_held_blocks_into_the_new_pool():
    blocks = BlockAllocator(10)
    for _ in range(10):
        blocks.allocate()
    for b in (1, 2, 3, 5, 6):
        blocks.free(b)
    tables = [[9, 0], [4, 8, 7]]  # held: 0, 4, 7, 8, 9
    moves = blocks.resize(6, tables)
    assert moves == {0: 0, 4: 4, 7: 1, 8: 2, 9: 3}
    assert tables == [[3, 0], [4, 2, 1]]
    assert blocks.num_blocks == 6 and blocks.num_free == 1 and blocks.allocate() == 5
    with pytest.raises(OutOfBlocks):
        blocks.resize(4, tables)  # five held blocks cannot fit in four


# --- attention over block tables ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma_config(tiny_model_dirs) -> ModelConfig:
    """Gemma 3's tiny config: GQA, local layers with a 16-position window and global ones."""
    return ModelConfig.from_pretrained(tiny_model_dirs["gemma3"])


def _random_pool(config: ModelConfig, num_blocks: int, block_size: int, seed: int,
                 dtype: torch.dtype = torch.float32) -> KVCache:
    cache = KVCache(config, config.num_layers, num_blocks, block_size, dtype, "cpu")
    g = torch.Generator().manual_seed(seed)
    for pool in cache.k + cache.v:
        pool.copy_(torch.randn(pool.shape, generator=g))
    return cache


def _reference(cache: KVCache, layer: int, q, table: list[int], position: int) -> torch.Tensor:
    """One row's attention over its blocks gathered contiguously, in fp32: causal and within the layer's
    window."""
    bs = cache.block_size
    blocks = torch.tensor(table[: position // bs + 1])
    keys = cache.k[layer][blocks].transpose(0, 1).flatten(1, 2)[None].float()  # (1, KV, S, D)
    values = cache.v[layer][blocks].transpose(0, 1).flatten(1, 2)[None].float()
    q = q.float()
    k_pos = torch.arange(keys.shape[2])
    allowed = k_pos <= position
    window = cache.config.layer_windows[layer]
    if window is not None:
        allowed &= position - k_pos < window
    return attend(q, keys, values, allowed[None, None, None], cache.config.attn_scale)


@pytest.mark.parametrize("block_size, dtype", [(1, torch.float32), (4, torch.float32), (7, torch.float32),
                                               (4, torch.bfloat16)])
def test_decode_attention_over_block_tables_equals_contiguous_attention(gemma_config, block_size, dtype):
    """Rows of different lengths over scattered blocks, rows 1 and 2 sharing their first blocks (a common
    prefix: read in place by one, gathered for the other), on local (windowed) and global layers."""
    c = gemma_config
    positions = [0, 37, 20, 5]
    rng = random.Random(block_size)
    num_blocks = 80
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(blocks_for(p + 1, block_size))] for p in positions]
    shared = min(len(tables[1]), len(tables[2])) - 1  # full blocks below row 2's own position
    tables[2][:shared] = tables[1][:shared]
    cache = _random_pool(c, num_blocks, block_size, seed=block_size, dtype=dtype)
    kv = DecodeKV(cache, positions, tables)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(len(positions), 1, c.num_heads, c.head_dim, generator=g).to(dtype)
    k = torch.randn(len(positions), 1, c.num_kv_heads, c.head_dim, generator=g).to(dtype)
    v = torch.randn(len(positions), 1, c.num_kv_heads, c.head_dim, generator=g).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: against fp32 math on the same bf16 values
    assert len(set(c.layer_windows)) == 2  # both kinds of layer are covered
    for layer in range(c.num_layers):
        out = kv.attend(layer, q, k, v, c.attn_scale)
        for row, (table, p) in enumerate(zip(tables, positions)):
            # the new token's K/V went to its position's block and offset
            torch.testing.assert_close(cache.k[layer][table[p // block_size], :, p % block_size], k[row, 0])
            ref = _reference(cache, layer, q[row : row + 1], table, p)
            assert out.dtype == dtype
            torch.testing.assert_close(out[row : row + 1].float(), ref, atol=tolerance, rtol=tolerance)


def test_packed_prefill_writes_each_sequence_into_its_own_blocks(gemma_config):
    """Two sequences' chunks in one packed forward: one from position 0, one continuing its context;
    each attends only to its own positions, and K/V lands in each table's blocks."""
    c, bs = gemma_config, 4
    cache = _random_pool(c, 16, bs, seed=1)
    tables = [[5, 2, 9], [0, 7, 3, 11, 12, 13]]
    chunks = [(tables[0], 0, 10), (tables[1], 6, 21)]  # the second continues cached positions 0..5
    kv = PrefillKV(cache, chunks)
    g = torch.Generator().manual_seed(3)
    t = 10 + 15
    q = torch.randn(1, t, c.num_heads, c.head_dim, generator=g)
    k = torch.randn(1, t, c.num_kv_heads, c.head_dim, generator=g)
    v = torch.randn(1, t, c.num_kv_heads, c.head_dim, generator=g)
    for layer in range(c.num_layers):  # local layers: position 20 sees only the last 16 positions
        out = kv.attend(layer, q, k, v, c.attn_scale)
        for i, (table, start, end) in enumerate(chunks):
            first = 0 if i == 0 else 10
            for j, p in enumerate(range(start, end)):
                torch.testing.assert_close(cache.k[layer][table[p // bs], :, p % bs], k[0, first + j])
                ref = _reference(cache, layer, q[:, first + j : first + j + 1], table, p)
                torch.testing.assert_close(out[:, first + j : first + j + 1], ref, atol=1e-5, rtol=1e-5)


# --- the engine: preemption and recompute -----------------------------------------------------------------
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(300) for _ in range(rng.randrange(3, 30))] for _ in range(n)]


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3"])
def test_crowded_pool_preempts_and_recomputes_without_changing_any_output(tiny_model_dirs, family):
    """Eight requests into a pool that holds about two of them: sequences are admitted by free blocks,
    the newest is preempted when the running ones run out, and recomputes later. Every output equals
    the sequence decoded alone (greedy), token for token."""
    path = str(tiny_model_dirs[family])
    settings_ = dict(model=path, dtype="float32", early_exit=False, max_model_len=64, block_size=4,
                     max_prefill_tokens=16)
    alone = LLMEngine(EngineConfig(**settings_))
    prompts = _prompts(8)
    expected = [alone.generate([p], GREEDY)[0].token_ids for p in prompts]
    budget = alone.memory.budget_for_blocks(blocks_for(64, 4) + 3)  # one max_model_len sequence, and a bit
    crowded = LLMEngine(EngineConfig(memory_budget=budget, **settings_))
    assert crowded.memory.num_blocks == 19
    outs = crowded.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert crowded.scheduler.num_preempted > 0
    assert crowded.scheduler.blocks.num_free == crowded.memory.num_blocks  # every block came back


def test_requests_longer_than_one_block_span_several_and_free_them(tiny_llama):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), early_exit=False, max_model_len=64, block_size=4))
    rid = engine.add_request(list(range(10)), SamplingParams(max_tokens=9, temperature=0, ignore_eos=True))
    seq = engine._requests[rid]
    engine.step()  # prefill 9 positions and decode at position 9: blocks for positions 0..9
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    for _ in range(6):
        engine.step()  # 16 tokens: decoding position 15 still fits 4 blocks
    assert len(seq.block_table) == 4
    held = set(seq.block_table)
    run_to_completion(engine)
    assert seq.block_table == [] and engine.scheduler.blocks.num_free == engine.memory.num_blocks
    assert held <= set(range(engine.memory.num_blocks))


def test_a_budget_below_one_max_length_sequence_is_refused(tiny_llama):
    probe = LLMEngine(EngineConfig(model=str(tiny_llama), max_model_len=64, block_size=8))
    budget = probe.memory.budget_for_blocks(7)  # 8 blocks of 8 hold one 64-token sequence
    with pytest.raises(MemoryBudgetError, match="one 64-token sequence"):
        LLMEngine(EngineConfig(model=str(tiny_llama), max_model_len=64, block_size=8, memory_budget=budget))
    assert LLMEngine(EngineConfig(model=str(tiny_llama), max_model_len=64, block_size=8,
                                  memory_budget=probe.memory.budget_for_blocks(8))).memory.num_blocks == 8


# --- never over budget -------------------------------------------------------------------------------------
def _check_accounting(engine: LLMEngine) -> None:
    m, sched = engine.memory, engine.scheduler
    assert m.total_bytes <= engine.memory_budget
    assert engine.cache.nbytes == m.kv_bytes and engine.cache.num_blocks == m.num_blocks == sched.blocks.num_blocks
    assert engine.model.weight_bytes() + engine.heads.weight_bytes() == m.weight_bytes
    held = [b for s in sched.running for b in s.block_table]
    assert all(sched.blocks.refs[b] == held.count(b) for b in set(held))  # shared prefix blocks counted
    assert len(set(held)) + sched.blocks.num_free == m.num_blocks  # none leaked
    assert all(0 <= b < m.num_blocks for b in held)
    assert len(sched.running) <= m.max_seqs
    for s in sched.running:
        assert len(s.block_table) * engine.config.block_size >= s.num_cached


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 20)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("layers"), st.integers(1, 6)),
    st.tuples(st.just("budget"), st.integers(0, 40)),
), min_size=1, max_size=25))
def test_weights_blocks_and_workspace_stay_within_budget_through_any_run(tiny_llama, ops):
    """A random program of arrivals, steps, layer loads/unloads and budget changes: at every step the
    plan fits the budget, the real tensors are what the plan counts, no block is held twice, and in
    the end every request finishes with all its tokens."""
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), early_exit=False, max_model_len=48, block_size=4,
                                    max_prefill_tokens=16))
    smallest = engine._plan(6, 2**40).budget_for_blocks(blocks_for(48, 4))  # one sequence at full depth
    wanted: dict[str, int] = {}
    got: dict[str, int] = {}

    def step() -> None:
        for out in engine.step():
            got[out.request_id] = got.get(out.request_id, 0) + len(out.new_token_ids)
        _check_accounting(engine)

    for op, *args in ops:
        if op == "add":
            length, max_tokens = args
            rid = engine.add_request([7] * length, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                  ignore_eos=True))
            wanted[rid] = min(max_tokens, 48 - length)
        elif op == "step":
            for _ in range(args[0]):
                step()
        elif op == "layers":
            try:
                engine.set_num_layers(args[0])
            except MemoryBudgetError:
                pass  # refused up front: nothing changed
        else:
            try:
                engine.set_memory_budget(smallest + args[0] * engine.memory.kv_bytes_per_block)
            except MemoryBudgetError:
                pass
        _check_accounting(engine)
    while engine.has_unfinished():
        step()
    assert got == wanted


# --- prefix reuse ------------------------------------------------------------------------------------------
SYSTEM = [(i * 37) % 300 for i in range(40)]  # a shared 40-token "system prompt": 10 full blocks of 4


def _engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", early_exit=False, max_model_len=96,
                                  block_size=4, max_prefill_tokens=32, **kw))


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3"])
def test_a_shared_prefix_is_prefilled_once_and_outputs_do_not_change(tiny_model_dirs, family):
    path = tiny_model_dirs[family]
    prompts = [SYSTEM + tail for tail in ([5, 6, 7], [9] * 11, [5, 6, 8, 1], [2])]
    expected = [o.token_ids for o in _engine(path, enable_prefix_caching=False).generate(prompts, GREEDY)]
    engine = _engine(path)
    stats = engine.scheduler.blocks.stats
    first = engine.generate(prompts[:1], GREEDY)
    assert stats.hits == 0 and engine.scheduler.blocks.num_cached == 10  # the prompt's full blocks
    prefilled = []
    prefill = engine.runner.prefill
    engine.runner.prefill = lambda chunks: prefilled.extend((s, len(t)) for _, t, s in chunks) or prefill(chunks)
    rest = engine.generate(prompts[1:], GREEDY)
    assert [o.token_ids for o in first + rest] == expected
    # Each later prompt found the 10 system blocks and prefilled only its own tail (prompt 4's tail is
    # its last token alone, which the decode step feeds: it prefilled nothing).
    assert stats.hits == 3 * 10 and stats.tokens_saved == 3 * 40
    assert all(start >= 40 for start, _ in prefilled)
    assert sum(n for _, n in prefilled) == (len(prompts[1]) - 41) + (len(prompts[2]) - 41)
    assert stats.hit_rate == pytest.approx(30 / (10 + 12 + 10 + 10))  # full prompt blocks looked up


def test_prefix_blocks_match_by_every_token_before_them(tiny_llama):
    """A prompt that differs from a cached one in block 2 reuses blocks 0-1 only: a block's hash covers
    every earlier token, so equal later blocks after a difference never match."""
    engine = _engine(tiny_llama)
    a = list(range(1, 25))  # 6 blocks of 4; 5 full blocks before the last prompt token
    engine.generate([a], GREEDY)
    b = a[:8] + [99] + a[9:]
    [out] = engine.generate([b], GREEDY)
    assert engine.scheduler.blocks.stats.hits == 2
    assert out.token_ids == _engine(tiny_llama, enable_prefix_caching=False).generate([b], GREEDY)[0].token_ids


def test_loading_layers_forgets_cached_prefixes_and_unloading_keeps_them(tiny_llama):
    engine = _engine(tiny_llama, num_layers=3)
    stats = engine.scheduler.blocks.stats
    prompt = SYSTEM + [1, 2, 3]
    engine.generate([prompt], GREEDY)
    engine.set_num_layers(2)  # the cached blocks hold K/V for layers 0-2: still right for 0-1
    assert engine.scheduler.blocks.num_cached == 10
    [shallow] = engine.generate([prompt], GREEDY)
    assert stats.hits == 10
    assert shallow.token_ids == _engine(tiny_llama, num_layers=2).generate([prompt], GREEDY)[0].token_ids
    engine.set_num_layers(6)  # layers 2-5 have no K/V in those blocks: forgotten
    assert engine.scheduler.blocks.num_cached == 0
    [deep] = engine.generate([prompt], GREEDY)
    assert stats.hits == 10  # no new hit
    assert deep.token_ids == _engine(tiny_llama, enable_prefix_caching=False).generate([prompt], GREEDY)[0].token_ids


def test_cached_blocks_are_evicted_least_recently_used_when_the_pool_is_full(tiny_llama):
    """A pool of 30 blocks: after two 41-token prompts (10 full blocks cached each), a third different
    one needs blocks that only the cached, unheld ones can give; the least recently used go first."""
    probe = _engine(tiny_llama)
    engine = _engine(tiny_llama, memory_budget=probe.memory.budget_for_blocks(30))
    blocks = engine.scheduler.blocks
    one, two, three = ([k] * 41 for k in (11, 12, 13))
    short = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    engine.generate([one], short)
    engine.generate([two], short)
    assert blocks.num_cached == 20 and blocks.num_free == 30  # all unheld: 10 free + 20 evictable
    engine.generate([one], short)  # a hit: "one" becomes the most recently used
    assert blocks.stats.hits == 10
    engine.generate([three], short)  # 11 blocks: 10 free, then "two"'s oldest block is evicted
    engine.generate([one], short)
    assert blocks.stats.hits == 20  # "one" survived
    engine.generate([two], short)
    assert blocks.stats.hits == 20  # "two" lost its first block, so nothing of it matches
