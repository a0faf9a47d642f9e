"""Engine behaviour: continuous batching, the KV budget and capacity, stops, streaming, aborts."""

import random

import pytest
import torch

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.exits import ExitConfig
from helios_core.kv_cache import MemoryBudgetError
from helios_core.sampling import SamplingParams
from tiny_models import hf_logits, run_to_completion

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 33, 2, 9], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 3], [40], [100, 101, 102], [3] * 30]


def make(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), **{"dtype": "float32", **kw}))  # the oracle's numerics


def test_requests_join_and_leave_between_steps(tiny_llama):
    eng = make(tiny_llama, exit=ExitConfig(threshold=0.5), max_prefill_tokens=4)
    alone = {i: eng.generate([p], GREEDY)[0].token_ids for i, p in enumerate(PROMPTS)}
    # Staggered arrivals with different lengths: some finish while others are still prefilling.
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True) for i in range(len(PROMPTS))]
    got: dict[str, list[int]] = {}
    ids = {}
    for i, prompt in enumerate(PROMPTS):
        ids[eng.add_request(prompt, params[i])] = i
        for _ in range(2):
            for out in eng.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
    for rid, toks in run_to_completion(eng).items():
        got.setdefault(rid, []).extend(toks)
    for rid, i in ids.items():
        assert got[rid] == alone[i][: params[i].max_tokens]


def test_more_requests_than_capacity_queue_and_complete(tiny_llama):
    eng = make(tiny_llama, max_num_seqs=2, early_exit=False)
    assert eng.capacity == 2
    outs = eng.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == make(tiny_llama, early_exit=False).generate([prompt], GREEDY)[0].token_ids


def test_memory_stays_within_budget_and_capacity_follows_depth(tiny_llama):
    budget = 6 * 2**20
    eng = make(tiny_llama, memory_budget=budget, max_model_len=128, max_num_seqs=10_000, block_size=16)
    caps = {}
    for layers in (6, 3, 1, 4, 6):
        eng.set_num_layers(layers)
        m = eng.memory
        assert eng.num_layers == layers == eng.cache.num_layers
        assert m.weight_bytes == eng.model.weight_bytes()
        assert m.kv_bytes == eng.cache.nbytes
        assert m.total_bytes <= budget
        assert m.total_bytes == m.budget_for_blocks(m.num_blocks)
        # The pool is the largest the budget allows: one more block would not fit.
        assert m.budget_for_blocks(m.num_blocks + 1) > budget
        assert eng.capacity_tokens == m.num_blocks * 16 == eng.scheduler.blocks.num_blocks * 16
        caps[layers] = eng.capacity_tokens
        # In sequences: as many max_model_len ones as fit, before any request has set a mean length.
        assert eng.capacity == m.sequences(128) == m.num_blocks // (128 // 16)
    assert caps[1] > caps[3] > caps[6]
    assert eng.layer_events[1].capacity_after == eng.layer_events[2].capacity_before


def test_budget_too_small_is_a_clear_error(tiny_llama):
    with pytest.raises(MemoryBudgetError, match="MiB"):
        make(tiny_llama, memory_budget=2**20, max_model_len=256)


def test_depth_changes_keep_running_sequences(tiny_llama):
    full = make(tiny_llama, early_exit=False)
    # A budget where growing back to full depth leaves room for fewer sequences than are running.
    probe = make(tiny_llama, early_exit=False, max_model_len=64)
    budget = probe.memory.budget_for_blocks(3)  # 3 blocks of 64 positions: 3 sequences at full depth
    eng = make(tiny_llama, early_exit=False, num_layers=2, memory_budget=budget, max_model_len=64)
    assert eng.capacity > len(PROMPTS)
    ids = [eng.add_request(p, GREEDY) for p in PROMPTS]
    got = {rid: [] for rid in ids}
    for _ in range(3):
        for out in eng.step():
            got[out.request_id] += out.new_token_ids
    event = eng.set_num_layers(6)  # back to full depth: capacity 3 < 5 running -> 2 preempted
    assert event.capacity_after == 3 and event.preempted == 2
    for _ in range(3):
        for out in eng.step():
            got[out.request_id] += out.new_token_ids
    eng.set_num_layers(4)
    eng.set_num_layers(6)
    for rid, toks in run_to_completion(eng).items():
        got[rid] += toks
    # 3 tokens from the 2-layer model, then full depth from a recomputed cache: exactly what the full
    # model generates when given the prompt plus those 3 tokens.
    two = [o.token_ids for o in make(tiny_llama, early_exit=False, num_layers=2).generate(PROMPTS, GREEDY)]
    rest = SamplingParams(max_tokens=GREEDY.max_tokens - 3, temperature=0, ignore_eos=True)
    for rid, prompt, head in zip(ids, PROMPTS, two):
        assert got[rid][:3] == head[:3]
        assert got[rid][3:] == full.generate([prompt + head[:3]], rest)[0].token_ids


def test_stop_conditions(tiny_llama):
    eng = make(tiny_llama, early_exit=False)
    [free] = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert free.finish_reason == "length" and len(free.token_ids) == 12

    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    [by_id] = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_id]))
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: first + 1]

    eng.eos_token_ids = {stop_id}
    [by_eos] = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0))
    assert by_eos.token_ids == free.token_ids[: first + 1] and by_eos.finish_reason == "stop"

    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    [by_str] = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]))
    assert by_str.finish_reason == "stop"
    assert by_str.text == text[: text.index(stop)]

    short = make(tiny_llama, early_exit=False, max_model_len=16)
    [capped] = short.generate([PROMPTS[1]], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    assert capped.finish_reason == "length" and len(PROMPTS[1]) + len(capped.token_ids) == 16


def test_streaming_deltas_add_up(tiny_llama):
    eng = make(tiny_llama, exit=ExitConfig(threshold=0.5))
    deltas = list(eng.stream("def main():", GREEDY))
    [done] = eng.generate(["def main():"], GREEDY)
    assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
    assert [t for d in deltas for t in d.new_token_ids] == done.token_ids
    assert "".join(d.new_text for d in deltas) == done.text
    assert [r.exit_layer for d in deltas for r in d.new_records] == done.exit_layers
    assert deltas[-1].summary.output_tokens == GREEDY.max_tokens


def test_abort_frees_the_slot_and_others_continue(tiny_llama):
    eng = make(tiny_llama, early_exit=False, max_num_seqs=2)
    keep = eng.add_request(PROMPTS[0], GREEDY)
    drop = eng.add_request(PROMPTS[1], GREEDY)
    eng.step()
    eng.abort(drop)
    outs = eng.step()
    aborted = [o for o in outs if o.request_id == drop]
    assert aborted and aborted[0].finished and aborted[0].finish_reason == "abort"
    later = eng.add_request(PROMPTS[2], GREEDY)
    got = run_to_completion(eng)
    ref = make(tiny_llama, early_exit=False)
    assert len(got[keep]) == GREEDY.max_tokens - 2  # two tokens came in the first two steps
    assert got[later] == ref.generate([PROMPTS[2]], GREEDY)[0].token_ids


def test_seeded_sampling_is_reproducible_in_any_batch(tiny_llama):
    eng = make(tiny_llama, exit=ExitConfig(threshold=0.5))
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    [alone] = eng.generate([PROMPTS[0]], seeded)
    others = SamplingParams(max_tokens=16, temperature=0.8, ignore_eos=True)
    mixed = eng.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others, seeded, others])
    assert mixed[1].token_ids == alone.token_ids
    [other_seed] = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True))
    assert other_seed.token_ids != alone.token_ids


def test_telemetry_aggregates(tiny_llama):
    eng = make(tiny_llama, exit=ExitConfig(threshold=0.5), num_layers=4)
    outs = eng.generate(PROMPTS, GREEDY)
    stats = eng.stats.drain()
    assert stats.tokens == sum(len(o.token_ids) for o in outs) == sum(stats.histogram.values())
    assert stats.requests == len(PROMPTS)
    assert stats.forced == sum(sum(o.forced) for o in outs)
    assert stats.exit_share_within(4) == 1.0
    assert eng.stats.tokens == 0  # drained
    s = outs[0].summary
    assert s.output_tokens == 16 and sum(s.exit_histogram.values()) == 16
    assert s.time_to_first_token_s is not None and s.latency_s >= s.time_to_first_token_s


def test_exit_points_change_between_steps_and_only_those_are_checked(tiny_llama):
    eng = make(tiny_llama, exit=ExitConfig(threshold=0.3))
    every = eng.generate(PROMPTS, GREEDY)
    assert eng.exit_layers is None and {r.exit_layer for o in every for r in o.records} - {4, 6}
    eng.drain_steps()
    eng.set_exit_layers((4,))  # the policy thinned them: a token may leave at 4 or run all 6
    thinned = eng.generate(PROMPTS, GREEDY)
    assert eng.exit_layers == (4,) and {r.exit_layer for o in thinned for r in o.records} <= {4, 6}
    assert all(o.summary.exit_layers == (4,) for o in thinned)
    assert sum(s.check_rows for s in eng.drain_steps()) == sum(len(o.records) for o in thinned)  # one check each
    eng.set_exit_layers(())  # no checks at all: full depth, the same tokens as exits disabled
    none = eng.generate(PROMPTS, GREEDY)
    assert {r.exit_layer for o in none for r in o.records} == {6}
    plain = make(tiny_llama, early_exit=False).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in none] == [o.token_ids for o in plain]
    eng.set_exit_layers(None)  # back to the configured points
    assert eng.exit_layers is None
    assert [o.token_ids for o in eng.generate(PROMPTS, GREEDY)] == [o.token_ids for o in every]


def test_step_records_time_each_decode_with_its_shape(tiny_llama):
    eng = make(tiny_llama, exit=ExitConfig(threshold=0.5), num_layers=4, max_prefill_tokens=8)
    outs = eng.generate(PROMPTS, GREEDY)
    steps = eng.drain_steps()
    assert not eng.steps and eng.drain_steps() == []  # drained
    decodes = [s for s in steps if s.rows]
    assert all(s.depth == 4 and s.rows <= len(PROMPTS) and s.rows <= s.layer_rows <= 4 * s.rows and s.seconds > 0
               for s in decodes)
    assert all(s.prefill_tokens and s.seconds == 0 for s in steps if not s.rows)  # a step that only prefilled
    assert sum(s.rows for s in steps) == sum(len(o.token_ids) for o in outs)  # one token per row per step
    assert sum(s.layer_rows for s in steps) == sum(r.exit_layer for o in outs for r in o.records)
    # every exit point (1-3 of 4 loaded) up to the depth a token left at checked it
    assert sum(s.check_rows for s in steps) == sum(min(r.exit_layer, 3) for o in outs for r in o.records)
    assert len({s.rows for s in decodes}) > 1  # requests joined and left: the batch varied
    # The last prompt token is fed by the decode step; the rest is prefilled (in 8-token chunks), timed apart.
    assert sum(s.prefill_tokens for s in steps) == sum(len(p) - 1 for p in PROMPTS)
    assert all(s.prefill_seconds > 0 for s in steps if s.prefill_tokens)
    eng.set_num_layers(2)
    eng.generate([PROMPTS[0]], GREEDY)
    assert {s.depth for s in eng.drain_steps()} == {2}


def test_token_logprobs_match_transformers_and_give_the_output_perplexity(tiny_llama):
    import math

    eng = make(tiny_llama, early_exit=False)
    [out] = eng.generate([PROMPTS[0]], GREEDY)
    logits = hf_logits(tiny_llama, [PROMPTS[0] + out.token_ids[:-1]])[0, len(PROMPTS[0]) - 1 :]
    logp = torch.log_softmax(logits.double(), -1)
    expected = logp.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert [r.logprob for r in out.records] == pytest.approx(expected.tolist(), abs=1e-4)
    # The greedy exit's confidence is the max softmax probability, read from the same log-softmax.
    assert [r.confidence for r in out.records] == pytest.approx(logp.amax(-1).exp().tolist(), abs=1e-5)
    assert out.summary.perplexity == pytest.approx(math.exp(-expected.mean().item()), rel=1e-4)


def test_memory_budget_changes_keep_running_requests(tiny_llama):
    ref = make(tiny_llama, early_exit=False).generate(PROMPTS, GREEDY)
    eng = make(tiny_llama, early_exit=False, memory_budget=4 << 20, max_model_len=64)
    big = eng.capacity
    ids = [eng.add_request(p, GREEDY) for p in PROMPTS]
    early = {i: [] for i in ids}
    for _ in range(2):
        for out in eng.step():
            early[out.request_id] += out.new_token_ids
    two = eng.memory.budget_for_blocks(2)  # one 64-position block each: three of the five running are preempted
    assert eng.set_memory_budget(two) == 2 < big
    assert eng.memory.total_bytes <= eng.memory_budget
    rest = run_to_completion(eng)
    assert [early[i] + rest[i] for i in ids] == [r.token_ids for r in ref]
    assert eng.set_memory_budget(4 << 20) == big
    with pytest.raises(MemoryBudgetError):
        eng.set_memory_budget(1 << 10)
    assert eng.capacity == big  # a refused budget changes nothing


def test_release_waiting_hands_back_the_queue_and_the_rest_runs_on(tiny_llama):
    eng = make(tiny_llama, early_exit=False, max_num_seqs=2)
    ids = [eng.add_request(p, GREEDY) for p in PROMPTS]
    got: dict[str, list[int]] = {}
    eng.step()  # the first two hold the slots; three wait
    eng.abort(ids[0])
    for out in eng.step():  # the abort frees a slot: the third starts
        got.setdefault(out.request_id, []).extend(out.new_token_ids)
    released = eng.release_waiting({ids[1], ids[3]})  # ids[1] is running: it stays
    assert [s.request_id for s in released] == [ids[3]] and released[0].token_ids == PROMPTS[3]
    assert [s.request_id for s in eng.release_waiting()] == [ids[4]]
    for rid, tokens in run_to_completion(eng).items():
        got.setdefault(rid, []).extend(tokens)
    assert set(got) == {ids[0], ids[1], ids[2]}  # the released ones leave without an output
    ref = make(tiny_llama, early_exit=False)
    assert got[ids[2]] == ref.generate([PROMPTS[2]], GREEDY)[0].token_ids
    assert not eng.has_unfinished()


def _matmul_shapes(fn) -> set[tuple]:
    """(op, rows, operand shapes) of every matmul `fn()` runs; rows: the input's rows for linear (plain
    or with a packed weight), the leading (batch) dimension for matmul. The engine runs in inference
    mode, where these reach the dispatcher whole."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    linears = (aten.linear.default, torch.ops.mkldnn._linear_pointwise.default)

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in linears or func is aten.matmul.default:
                x = args[0]
                rows = x.numel() // x.shape[-1] if func in linears else x.shape[0]
                shapes.add((str(func), rows, *(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
            return func(*args, **(kwargs or {}))

    shapes: set[tuple] = set()
    with Record():
        fn()
    return shapes


def test_onednn_products_on_cpu_run_a_bounded_set_of_matmul_shapes(tiny_llama):
    """oneDNN keeps a primitive per matmul shape it runs (bf16, and any product with a packed weight), so
    the engine rounds row counts (batch rows, running rows after exits, prompt tokens) and, in bf16, KV
    blocks up to `padded_rows`: random batches meet only those, and fewer shapes than plain fp32
    weights, whose products run at the exact sizes."""
    from helios_core.models.transformer import packs_weights, padded_rows

    rng = random.Random(0)
    batches = [[rng.choice(PROMPTS) + [rng.randrange(300)] * rng.randrange(40) for _ in range(n)]
               for n in rng.sample(range(1, 30), 12)]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    shapes = {}
    for name, kw in (("bfloat16", {"dtype": "bfloat16"}), ("packed", {}), ("plain", {"pack_weights": False})):
        eng = make(tiny_llama, exit=ExitConfig(threshold=0.3), block_size=4, **kw)
        shapes[name] = _matmul_shapes(lambda: [eng.generate(b, params) for b in batches])
    rows = {n for _, n, *_ in shapes["bfloat16"]}
    assert all(padded_rows(n) == n for n in rows), sorted(rows)
    packed = {n for op, n, *_ in shapes["packed"] if "_linear_pointwise" in op}
    assert bool(packed) == packs_weights(torch.float32, torch.device("cpu"))  # no oneDNN: plain products
    assert all(padded_rows(n) == n for n in packed), sorted(packed)
    assert any(padded_rows(n) != n for _, n, *_ in shapes["plain"])  # the workload meets other counts
    assert len(shapes["bfloat16"]) < len(shapes["plain"])
