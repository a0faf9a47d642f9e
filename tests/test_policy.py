"""The HELIOS policy on synthetic telemetry: monitor, PHT, loading rule, capacity, shortlist, control loop."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.policy import (BreachMonitor, HeliosPolicy, Limits, PerformanceHistoryTable, PolicyConfig, ProfileRow,
                                Registry, RegistryError, StepFit, Target, estimate, exit_walk, fit_steps, partial_depth,
                                shortlist, thin_exits)
from helios_core.policy.pht import STEP_SAMPLES
from helios_core.policy.planner import wilson_upper
from helios_core.sampling import SamplingParams
from helios_core.telemetry import RequestSummary, StepRecord, TokenRecord
from tiny_models import make_pickle_checkpoint, make_tiny_checkpoint

MAX_LEN = 128
BUDGET = 8 << 20
LIMITS = Limits(BUDGET, MAX_LEN)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Three tiny llamas of 4, 6 and 8 layers sharing one tokenizer, and their registry file."""
    root = tmp_path_factory.mktemp("family")
    for layers in (4, 6, 8):
        make_tiny_checkpoint("llama_gqa", root / f"tiny-{layers}l", num_layers=layers, seed=layers)
    registry = root / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": [{"name": f"tiny-{n}l", "path": f"tiny-{n}l"} for n in (4, 6, 8)]}))
    return registry


def summary(model: str, depths: list[int], breaches: int = 0, tpot: float = 0.01, prompt: int = 4) -> RequestSummary:
    records = [TokenRecord(d, 0.9, False, False, -0.1) for d in depths]
    s = RequestSummary.from_records("r", model, prompt, records, "length", 0.0, 0.0, tpot * (len(depths) - 1))
    s.breaches = s.forced = breaches
    return s


def tokens(n: int, breach_every: int = 0) -> list[TokenRecord]:
    return [TokenRecord(1, 0.1, True, bool(breach_every) and i % breach_every == 0, -1.0) for i in range(n)]


def steps(per_layer: float, per_row_layer: float, depth: int, rows=(1, 2, 4, 8), layers_per_row: float = 0.0,
          repeat: int = 3) -> list[StepRecord]:
    """Decode steps timed exactly by the step-time model; rows run `layers_per_row` blocks (0: all loaded)."""
    out = []
    for _ in range(repeat):
        for n in rows:
            layer_rows = round(n * (layers_per_row or depth))
            out.append(StepRecord(per_layer * depth + per_row_layer * layer_rows, n, depth, layer_rows))
    return out


# --- breach monitor -------------------------------------------------------------------------------
def test_monitor_fires_above_the_limit_not_at_it():
    m = BreachMonitor(window=100, limit=50, cooldown=0)
    assert not m.add([False] * 50 + [True] * 50)
    assert m.breaches == 50 and m.breach_rate == 0.5
    assert m.add([True])  # the oldest (clean) token slides out: 51 breaches in the window
    assert m.breaches == 0  # reset after firing


def test_monitor_counts_only_the_last_window():
    m = BreachMonitor(window=10, limit=5, cooldown=0)
    assert not m.add([True] * 5 + [False] * 10)  # the breaches slide out
    assert m.breaches == 0
    assert not m.add([True] * 5)
    assert m.add([True])  # 6 > 5 within the window


def test_monitor_is_quiet_for_the_cooldown_after_firing():
    m = BreachMonitor(window=10, limit=5, cooldown=10)
    assert m.add([True] * 6)
    assert not m.add([True] * 10)  # cooldown: the window refills but cannot fire yet
    assert m.add([True])


@pytest.mark.parametrize("window,limit", [(0, 0), (10, 10), (10, -1)])
def test_monitor_rejects_bad_settings(window, limit):
    with pytest.raises(ValueError, match="window"):
        BreachMonitor(window, limit)


# --- PHT rows -------------------------------------------------------------------------------------
def test_profile_row_predicts_breaches_and_layers_from_the_histogram():
    row = ProfileRow("m", 4)
    row.add(summary("m", [1] * 3 + [2] * 3 + [4] * 4, tpot=0.02), depth=4)
    assert row.share_within(1) == pytest.approx(0.3)
    assert row.share_within(2) == pytest.approx(0.6)
    assert row.mean_layers(2) == pytest.approx((3 * 1 + 7 * 2) / 10)
    assert row.mean_layers(4) == pytest.approx((3 + 6 + 16) / 10)
    assert row.time_per_token_s == pytest.approx(0.02)
    assert row.perplexity == pytest.approx(2.718281828 ** 0.1)


def test_breaches_at_a_partial_depth_are_censored():
    row = ProfileRow("m", 2)
    row.add(summary("m", [1] * 4 + [2] * 6, breaches=5), depth=2)  # 5 of the 6 at depth 2 were forced low
    assert row.censored == 5
    assert row.share_within(2) == pytest.approx(0.5)  # only the confident ones count as exited
    assert row.mean_layers(2) == pytest.approx((4 + 2 + 10) / 10)


# --- step-time model -----------------------------------------------------------------------------
def test_step_fit_recovers_the_coefficients_and_ignores_stray_slow_steps():
    records = steps(1e-3, 4e-4, 6, layers_per_row=3.5) + steps(1e-3, 4e-4, 3, rows=(1, 3, 5), layers_per_row=2.2)
    fit = fit_steps([(r.seconds, r.depth, r.layer_rows, r.check_rows, r.rows) for r in records])
    assert fit.per_layer_s == pytest.approx(1e-3) and fit.per_row_layer_s == pytest.approx(4e-4)
    # A few steps 10x slow (another process had the core): one trimming pass drops them.
    noisy = [(r.seconds * (10 if i % 9 == 0 else 1 + 0.02 * (i % 3)), r.depth, r.layer_rows, 0, r.rows)
             for i, r in enumerate(records)]
    fit = fit_steps(noisy)
    assert fit.per_layer_s == pytest.approx(1e-3, rel=0.1) and fit.per_row_layer_s == pytest.approx(4e-4, rel=0.1)
    assert fit.seconds(12, 40) == pytest.approx(12 * fit.per_layer_s + 40 * fit.per_row_layer_s)


def test_step_fit_needs_steps_that_separate_the_terms():
    same_shape = [(0.01, 6, 24, 0, 4)] * 20  # one batch size, no exits: depth and layer-rows move together
    assert fit_steps(same_shape) is None
    assert fit_steps([(0.01, 6, 6 * n, 0, n) for n in (1, 2, 4)]) is None  # too few steps
    # Time that does not grow with the batch: all per-layer, never a negative per-row cost.
    flat = fit_steps([(0.006 - 1e-5 * n, 6, 6 * n, 0, n) for n in (1, 2, 4, 8) * 3])
    assert flat.per_row_layer_s == 0.0 and flat.per_layer_s > 0


def test_step_fit_prices_a_check_only_where_the_steps_checked_at_different_densities():
    def step(n, checks_per_row):  # depth 6, every row runs 4 blocks (exited rows cost nothing here)
        return 1e-3 * 6 + 4e-4 * 4 * n + 3e-4 * checks_per_row * n, 6, 4 * n, checks_per_row * n, n

    every_layer = [step(n, 4) for n in (1, 2, 4, 8)] * 3
    fit = fit_steps(every_layer)  # checks per block never vary: the check stays inside the block cost
    assert fit.per_check_row_s is None and fit.per_row_layer_s == pytest.approx(4e-4 + 3e-4)
    both = fit_steps(every_layer + [step(n, 1) for n in (1, 2, 4, 8)] * 3)  # served thinned, at 1 check
    assert both.per_layer_s == pytest.approx(1e-3) and both.per_row_layer_s == pytest.approx(4e-4)
    assert both.per_check_row_s == pytest.approx(3e-4)
    assert both.seconds(6, 8, 2) == pytest.approx(6e-3 + 8 * 4e-4 + 2 * 3e-4)
    given = fit_steps(every_layer, check_ratio=0.75)  # until then, the offline profile's check in blocks
    assert given.per_row_layer_s == pytest.approx(4e-4) and given.per_check_row_s == pytest.approx(3e-4)
    slower = fit_steps([(2 * t, d, r, k, n) for t, d, r, k, n in every_layer], check_ratio=0.75)  # the machine slowed
    assert slower.per_row_layer_s == pytest.approx(8e-4) and slower.per_check_row_s == pytest.approx(6e-4)


def test_sparse_exit_points_against_none_separate_the_check_cost():
    """A 30-layer model with 5 exit points, profiled with them and without (`helios profile`)."""
    def step(n, checks_per_row):
        return 1e-3 * 30 + 4e-4 * 30 * n + 2e-4 * checks_per_row * n, 30, 30 * n, checks_per_row * n, n

    fit = fit_steps([step(n, 5) for n in (1, 2, 4, 8)] * 3 + [step(n, 0) for n in (1, 2, 4, 8)] * 3)
    assert fit.per_check_row_s == pytest.approx(2e-4) and fit.per_row_layer_s == pytest.approx(4e-4)


def test_a_row_that_exited_still_pays_the_attention_half_of_every_deeper_layer():
    """Exited rows write K/V and run attention in the layers above their exit: the fit prices those
    layers at the model's attention share of a block, so exits save only the rest."""
    share = 0.25
    def step(n, layers_per_row):  # depth 8: n rows, each through `layers_per_row` blocks, the rest exited
        exited = n * (8 - layers_per_row)
        return 1e-3 * 8 + 4e-4 * (n * layers_per_row + share * exited), 8, n * layers_per_row, 0, n

    samples = [step(n, k) for n in (1, 2, 4, 8) for k in (3, 5, 8)] * 2
    fit = fit_steps(samples, exited_share=share)
    assert fit.per_layer_s == pytest.approx(1e-3) and fit.per_row_layer_s == pytest.approx(4e-4)
    assert fit.seconds(8, 24, 0, 8) == pytest.approx(step(8, 3)[0])
    assert fit.exit_saving_s == pytest.approx(3e-4)
    free = fit_steps(samples)  # counted as free, exits look cheaper than they are at the big batch
    assert free.seconds(8, 24, 0, 8) < step(8, 3)[0]
    # The estimate charges the exited rows too: 8 rows through 2.2 of 6 layers, 3.8 layers exited.
    entry_fit = StepFit(1e-3, 4e-4, None, 20, exited_share=share)
    assert entry_fit.seconds(6, 8 * 2.2, 0, 8) == pytest.approx(6e-3 + 4e-4 * 8 * (2.2 + share * 3.8))
    assert entry_fit.seconds(6, 8 * 6) == pytest.approx(6e-3 + 4e-4 * 48)  # no rows given: none exited


def test_the_attention_share_is_the_attention_halfs_weights(family):
    c = Registry.load(family, "float32")["tiny-6l"].config
    attention = c.hidden_size * (2 * c.q_size + 2 * c.kv_size)
    mlp = (3 if c.gated_mlp else 2) * c.hidden_size * c.intermediate_size
    assert c.attention_share == pytest.approx(attention / (attention + mlp))
    assert 0 < c.attention_share < 1


def test_exit_points_are_kept_only_where_their_exits_pay_for_the_check():
    shares = {1: 0.02, 2: 0.03, 3: 0.05, 4: 0.5, 5: 0.02, 6: 0.38}  # most tokens leave at 4
    kept = thin_exits((1, 2, 3, 4, 5), 6, shares, block_s=1.0, check_s=0.7)
    assert kept == (4,)
    assert exit_walk(kept, 6, shares) == pytest.approx((4 * 0.6 + 6 * 0.4, 1.0))
    # every point kept is the engine's usual walk: E[min(exit depth, 6)] layers, a check per point passed
    layers, checks = exit_walk((1, 2, 3, 4, 5), 6, shares)
    assert layers == pytest.approx(sum(d * v for d, v in shares.items()))
    assert checks == pytest.approx(1 + 0.98 + 0.95 + 0.9 + 0.4)
    assert thin_exits((1, 2, 3, 4, 5), 6, shares, block_s=1.0, check_s=0.0) == (1, 2, 3, 4, 5)  # free checks
    assert thin_exits((1, 2, 3, 4, 5), 6, shares, block_s=1.0, check_s=10.0) == ()  # dear ones: none
    assert thin_exits((1, 2, 3, 4, 5), 3, shares, block_s=1.0, check_s=0.01) == (1, 2)  # below the depth only
    # the choice is the cheapest of all 32 subsets
    def cost(kept):
        layers, checks = exit_walk(kept, 6, shares)
        return layers + 0.7 * checks
    subsets = [tuple(p for p in (1, 2, 3, 4, 5) if mask >> (p - 1) & 1) for mask in range(32)]
    assert cost(kept) == pytest.approx(min(cost(k) for k in subsets))


def test_the_policy_serves_with_the_exit_points_that_pay(family):
    """Profiled at every exit point, it serves checking where tokens leave; the estimate prices
    the checks it keeps, and the target carries them to the engine."""
    registry = Registry.load(family, "float32")
    fit = StepFit(per_layer_s=1e-3, per_row_layer_s=4e-4, prefill_token_layer_s=None, samples=20,
                  per_check_row_s=3e-4)
    entry = registry["tiny-6l"]
    row = ProfileRow("tiny-6l", 6)
    row.add(summary("tiny-6l", [4] * 8 + [6] * 2, tpot=0.05), depth=6)
    e = estimate(entry, row, 6, LIMITS, steps=fit)
    assert e.exits == (4,) and e.layers == pytest.approx(4.4) and e.checks == pytest.approx(1.0)
    n = e.batch(8)
    assert e.step_s(n) == pytest.approx(1e-3 * 6 + 4e-4 * n * 4.4 + 3e-4 * n * 1.0)
    every = estimate(entry, row, 6, LIMITS, steps=StepFit(1e-3, 4e-4, None, 20))  # no check price: keep all
    assert every.exits is None and every.checks == pytest.approx(4 + 0.2)


def test_pht_keeps_steps_per_model_and_depth_across_profiling_rounds():
    pht = PerformanceHistoryTable()
    pht.start("m", 6, 0)
    pht.add_steps("m", steps(1e-3, 4e-4, 6) + [StepRecord(0.5, 2, 6, 12, prefill_tokens=100, prefill_seconds=0.012)])
    pht.add_steps("m", steps(1e-3, 4e-4, 2, repeat=2 * STEP_SAMPLES))  # long serving at depth 2
    assert len(pht.steps[("m", 2)]) == STEP_SAMPLES and len(pht.steps[("m", 6)]) == 13  # full depth kept
    pht.start("m", 6, 150)  # a new profiling round: the model's speed is still known
    fit = pht.step_fit("m")
    assert fit.per_layer_s == pytest.approx(1e-3, rel=0.05) and fit.per_row_layer_s == pytest.approx(4e-4, rel=0.05)
    assert fit.prefill_token_layer_s == pytest.approx(0.012 / (100 * 6))
    assert pht.step_fit("other") is None


def test_estimate_predicts_the_step_at_the_batch_the_objective_assumes(family):
    entry = Registry.load(family, "float32")["tiny-6l"]
    row = ProfileRow("tiny-6l", 6)
    row.add(summary("tiny-6l", [1] * 4 + [3] * 4 + [6] * 2, tpot=0.05), depth=6)
    fit = StepFit(per_layer_s=1e-3, per_row_layer_s=4e-4, prefill_token_layer_s=2e-5, samples=20)
    e = estimate(entry, row, 3, LIMITS, steps=fit)
    assert e.layers == pytest.approx(2.2) and e.measured
    n = min(e.capacity, 16)
    assert e.batch(16) == n and e.batch(2) == 2
    assert e.step_s(n) == pytest.approx(1e-3 * 3 + 4e-4 * n * 2.2)
    assert e.objective("throughput", 16, None) == pytest.approx(e.step_s(n) / n)
    assert e.objective("latency", 2, None) == pytest.approx(1e-3 * 3 + 4e-4 * 2 * 2.2)
    assert e.token_layer_s == 2e-5  # measured prefill refills new layers' K/V
    # A bigger batch shares the per-layer cost: seconds per token fall, step time rises.
    assert e.objective("throughput", 8, None) < e.objective("throughput", 2, None) < e.step_s(2) < e.step_s(8)
    # The throughput objective carries the prompts' prefill per output token, through the loaded layers.
    long_prompts = estimate(entry, row, 3, replace(LIMITS, prompt_per_output=8.0), steps=fit)
    assert long_prompts.prefill_s == pytest.approx(8.0 * 3 * 2e-5)
    assert long_prompts.objective("throughput", 16, None) == pytest.approx(e.step_s(n) / n + 8.0 * 3 * 2e-5)
    assert long_prompts.objective("latency", 2, None) == e.objective("latency", 2, None)  # the step alone
    # Without step samples: the request-based TPOT, scaled by layers run, at any batch.
    old = estimate(entry, row, 3, LIMITS)
    assert old.step is None and old.step_s(8) == old.step_s(1) == pytest.approx(0.05 * 2.2 / 2.8)
    assert old.objective("throughput", 4, None) == pytest.approx(old.tpot_s / 4)


# --- registry -------------------------------------------------------------------------------------
def test_registry_sizes_match_the_engine_exactly(family):
    registry = Registry.load(family, "float32")
    assert registry.names() == ["tiny-4l", "tiny-6l", "tiny-8l"]
    entry = registry["tiny-8l"]
    for depth in (2, 5, 8):
        engine = LLMEngine(EngineConfig(model=str(entry.path), dtype="float32", num_layers=depth, memory_budget=BUDGET,
                                        max_model_len=MAX_LEN))
        plan = entry.plan(depth, BUDGET, MAX_LEN)
        assert plan == engine.memory
        assert entry.weight_bytes(depth) == engine.memory.weight_bytes == engine.model.weight_bytes()
    # Partial loading turns weights and KV of the dropped layers into KV blocks: the largest pool that fits.
    full, half = entry.plan(8, BUDGET, MAX_LEN), entry.plan(4, BUDGET, MAX_LEN)
    assert half.total_bytes <= BUDGET < half.budget_for_blocks(half.num_blocks + 1)
    assert half.num_blocks > full.num_blocks and half.sequences(MAX_LEN) > full.sequences(MAX_LEN)
    assert half.kv_bytes_per_block * 2 == full.kv_bytes_per_block


def test_registry_save_load_roundtrip_and_stale_sizes(family, tmp_path):
    registry = Registry.load(family, "float32")
    out = family.parent / "saved.yaml"
    registry.save(out)
    again = Registry.load(out, "float32")
    assert [e.layer_weight_bytes for e in again] == [e.layer_weight_bytes for e in registry]
    doc = yaml.safe_load(out.read_text())
    doc["models"][0]["weight_bytes_per_layer"] += 1
    out.write_text(yaml.safe_dump(doc))
    with pytest.raises(RegistryError, match="disagree with the checkpoint"):
        Registry.load(out, "float32")
    stale = Registry.load(out, "float32", check_sizes=False)  # what `helios profile` reads before rewriting the sizes
    stale.save()
    assert [e.layer_weight_bytes for e in Registry.load(out, "float32")] == [e.layer_weight_bytes for e in registry]


@pytest.mark.parametrize("models,message", [
    ([], "non-empty list"),
    ([{"path": "tiny-4l"}], "string 'name'"),
    ([{"name": "a"}], "exactly one of 'path'"),
    ([{"name": "a", "path": "tiny-4l", "pull": "gemma-3-270m"}], "exactly one of 'path'"),
    ([{"name": "a", "pull": "nope"}], "unknown pull name 'nope'; the catalog has: gemma-3-270m, smollm2-135m-instruct"),
    ([{"name": "a", "path": "nowhere"}], "cannot load"),
    ([{"name": "a", "path": "tiny-4l", "colour": 1}], "unknown keys"),
    ([{"name": "a", "path": "tiny-4l"}, {"name": "a", "path": "tiny-6l"}], "appears twice"),
    ([{"name": "a", "path": "tiny-4l", "threshold": -1}], "threshold"),
    ([{"name": "a", "path": "tiny-4l", "exit_layers": [9]}], "exit"),
])
def test_registry_errors_name_the_problem(family, models, message):
    path = family.parent / "bad.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    with pytest.raises(RegistryError, match=message):
        Registry.load(path, "float32")


def test_registry_refuses_a_model_not_pulled_yet(tmp_path, monkeypatch):
    monkeypatch.setenv("HELIOS_HOME", str(tmp_path / "home"))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "g", "pull": "gemma-3-270m"}]}))
    with pytest.raises(RegistryError, match="gemma-3-270m is not pulled yet .*run `helios pull gemma-3-270m`"):
        Registry.load(path, "float32")


def test_an_empty_exit_list_means_full_depth_without_exit_checks(family):
    path = family.parent / "no-exits.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "a", "path": "tiny-4l", "exit_layers": [], "threshold": 0.0}]}))
    registry = Registry.load(path, "float32")
    entry = registry["a"]
    assert entry.exit_layers == () and entry.exit_config().exit_points(4) == ()
    assert partial_depth(entry, None, LIMITS, coverage=0.0) == 4  # nowhere to stop early: full depth
    registry.save(path)
    assert yaml.safe_load(path.read_text())["models"][0]["exit_layers"] == []
    assert Registry.load(path, "float32")["a"].exit_layers == ()
    engine = LLMEngine(EngineConfig(model=str(entry.path), dtype="float32", max_model_len=MAX_LEN,
                                    exit=entry.exit_config()))
    [out] = engine.generate(["def f(x):"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert out.exit_layers == [4] * 6  # threshold 0 would let every checked token leave at layer 1


def test_registry_refuses_pickle_checkpoints_and_unknown_names(family, tmp_path):
    make_pickle_checkpoint(tmp_path / "pickled")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "p", "path": "pickled"}]}))
    with pytest.raises(RegistryError, match="cannot load"):
        Registry.load(path, "float32")
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        Registry.load(family, "float32")["nope"]


# --- loading rule, estimates, shortlist -----------------------------------------------------------
def test_partial_depth_covers_the_configured_share(family):
    entry = Registry.load(family, "float32")["tiny-4l"]
    row = ProfileRow("tiny-4l", 4)
    for _ in range(30):  # 3000 tokens: the sampling margin is small
        row.add(summary("tiny-4l", [1] * 30 + [2] * 35 + [4] * 35), depth=4)
    assert partial_depth(entry, row, LIMITS, coverage=0.6) == 2
    assert partial_depth(entry, row, LIMITS, coverage=0.25) == 1
    assert partial_depth(entry, row, LIMITS, coverage=0.7) == 4
    assert partial_depth(entry, row, LIMITS, coverage=0.6, minimum=3) == 3  # 60% have exited by 3 as well
    # A workload twice as hard as profiled: 35% not exited by depth 2 becomes 70%.
    assert estimate(entry, row, 2, LIMITS, shift=2.0).breach_rate == pytest.approx(0.7)
    assert estimate(entry, row, 4, LIMITS, shift=2.0).breach_rate == 0.0  # nothing is forced at full depth
    # The same shares seen on only 100 tokens could be luck: the rule loads deeper.
    small = ProfileRow("tiny-4l", 4)
    small.add(summary("tiny-4l", [1] * 30 + [2] * 35 + [4] * 35), depth=4)
    assert partial_depth(entry, small, LIMITS, coverage=0.6) == 4
    assert wilson_upper(0.35, 100) > 0.4 > wilson_upper(0.35, 3000) > 0.35


def test_shortlist_keeps_models_that_fit_and_ranks_by_slo(family):
    entries = list(Registry.load(family, "float32"))
    by_batch = shortlist(entries, LIMITS, PolicyConfig(slo="batch", top_k=3))
    assert by_batch[0] == "tiny-4l"  # the smallest model leaves the most memory for KV
    assert shortlist(entries, LIMITS, PolicyConfig(slo="energy", top_k=2)) == ["tiny-4l", "tiny-6l"]
    p = entries[1].plan(6, 2**40, MAX_LEN)  # tiny-6l at full depth with exactly one sequence
    tight = Limits(p.budget_for_blocks(-(-MAX_LEN // p.block_size)), MAX_LEN)
    fits = shortlist(entries, tight, PolicyConfig(slo="batch"))
    assert fits == ["tiny-4l", "tiny-6l"]


def test_policy_config_validation():
    for bad in ({"slo": "speed"}, {"mode": "both"}, {"coverage": 0}, {"window": 0}, {"breach_limit": 100}):
        with pytest.raises(ValueError):
            PolicyConfig(**bad)


# --- the control loop, global mode ----------------------------------------------------------------
PROFILES = {  # model -> (exit depths of 10 tokens at full depth, TPOT)
    "tiny-4l": ([1, 1, 2, 2, 2, 2, 4, 4, 4, 4], 0.010),
    "tiny-6l": ([1, 1, 1, 1, 1, 1, 1, 6, 6, 6], 0.012),
    "tiny-8l": ([8] * 10, 0.030),
}


def serve_profiles(policy: HeliosPolicy, profiles=PROFILES, prompt: int = 4) -> None:
    """Drive one profiling round: each candidate gets exactly N requests of `prompt` tokens, then the
    policy holds."""
    for _ in policy.candidates:
        [(model, target)] = policy.targets.items()
        assert target.profiling and target.depth == policy.registry[model].num_layers
        for _ in range(policy.config.profile_requests):
            assert policy.choose() == model
            policy.assigned(model)
        assert policy.choose() is None  # this candidate has its N requests
        depths, tpot = profiles[model]
        for _ in range(policy.config.profile_requests):
            policy.observe_request(model, target.depth, summary(model, depths, tpot=tpot, prompt=prompt))


def test_profiling_round_then_serving_the_best_at_partial_depth(family):
    policy = HeliosPolicy(Registry.load(family, "float32"), LIMITS, PolicyConfig(slo="latency"))
    assert policy.candidates == ["tiny-4l", "tiny-6l", "tiny-8l"]
    serve_profiles(policy)
    # latency: tpot(d) = TPOT x layers(d) / layers(L). tiny-4l at depth 2 (60% by 2): 0.010 x 1.8/2.8;
    # tiny-6l at depth 1 (70% by 1): 0.012 x 1/2.5.  tiny-6l wins.
    assert policy.targets == {"tiny-6l": policy.targets["tiny-6l"]}
    assert policy.targets["tiny-6l"].depth == 1 and not policy.targets["tiny-6l"].profiling
    assert [e.kind for e in policy.events] == ["profile", "profile", "profile", "serve"]


def test_stable_workload_never_adapts_and_reprofiles_every_r_requests(family):
    config = PolicyConfig(slo="latency", reprofile_every=40)
    policy = HeliosPolicy(Registry.load(family, "float32"), LIMITS, config)
    serve_profiles(policy)
    served = len(policy.events)
    for _ in range(24):  # 24 requests x 10 tokens, 30% breaches (the profile predicted 30% at depth 1)
        policy.observe_tokens("tiny-6l", tokens(10, breach_every=3))
        policy.observe_request("tiny-6l", 1, summary("tiny-6l", [1] * 10, breaches=3))
    assert len(policy.events) == served  # no load, no switch
    for _ in range(40 - 24 - 15):
        policy.observe_request("tiny-6l", 1, summary("tiny-6l", [1] * 10, breaches=3))
    assert policy.events[-1].kind == "profile" and policy.events[-1].reason.startswith("40 requests")
    serve_profiles(policy)
    assert policy.events[-1].kind == "serve" and policy.events[-1].model == "tiny-6l"  # same choice: no flap


def test_breaches_trigger_within_cooldown_plus_a_window_and_load_layers(family):
    config = PolicyConfig(slo="latency")
    policy = HeliosPolicy(Registry.load(family, "float32"), LIMITS, config)
    serve_profiles(policy)
    events = len(policy.events)
    seen = 0
    while len(policy.events) == events:
        policy.observe_tokens("tiny-6l", tokens(10, breach_every=1))  # every token breaches
        seen += 10
        assert seen <= config.window + config.window  # cooldown (W) + the window (B+1 breaches)
    event = policy.events[-1]
    assert event.kind in ("load", "switch")
    assert seen == config.window + 10  # quiet for the cooldown, then the full window of breaches fires


def test_cost_model_switches_only_when_clearly_cheaper(family):
    # tiny-4l's profile: most tokens exit at 1, and it is fast; tiny-6l exits are spread out.
    profiles = {"tiny-4l": ([1] * 9 + [4], 0.004), "tiny-6l": ([1] * 7 + [6] * 3, 0.012), "tiny-8l": ([8] * 10, 0.03)}
    policy = HeliosPolicy(Registry.load(family, "float32"), LIMITS, PolicyConfig(slo="latency", switch_margin=0.1))
    serve_profiles(policy, profiles)
    assert "tiny-4l" in policy.targets  # the fastest at its depth
    policy.observe_tokens("tiny-4l", tokens(100))  # cooldown
    policy.observe_tokens("tiny-4l", tokens(60, breach_every=1))
    event = policy.events[-1]
    assert event.kind == "load" and event.model == "tiny-4l" and event.depth > 1  # more layers beat a switch
    assert "switch tiny-6l" in event.reason  # the alternatives were costed


def test_switch_when_the_current_model_is_slow_to_deepen(family):
    profiles = {"tiny-4l": ([1] * 9 + [4], 0.004), "tiny-6l": ([1] * 7 + [6] * 3, 0.012), "tiny-8l": ([8] * 10, 0.3)}
    registry = Registry.load(family, "float32")
    policy = HeliosPolicy(registry, LIMITS, PolicyConfig(slo="latency", top_k=3))
    serve_profiles(policy, profiles)
    # Force serving the slow deep model at a shallow depth, as after an earlier round, then breach.
    policy._replace("tiny-8l", Target(1, False), "serve", "test")
    policy.observe_tokens("tiny-8l", tokens(100))
    policy.observe_tokens("tiny-8l", tokens(60, breach_every=1))
    assert policy.events[-1].kind == "switch" and policy.events[-1].model != "tiny-8l"


def test_measured_steps_decide_when_request_tpot_cannot_tell_the_models_apart(family):
    """The headline failure: every profile's request TPOT is alike (other requests' prefill and the batch
    that happened to run blur it), but the steps say tiny-4l is fast and tiny-8l slow."""
    profiles = {m: ([1] * 8 + [n] * 2, 0.02) for m, n in (("tiny-4l", 4), ("tiny-6l", 6), ("tiny-8l", 8))}
    speed = {"tiny-4l": (2e-4, 1e-4), "tiny-6l": (6e-4, 3e-4), "tiny-8l": (2e-3, 1e-3)}  # (per layer, per row-layer)
    blind = HeliosPolicy(Registry.load(family, "float32"), LIMITS, PolicyConfig(slo="throughput"))
    policy = HeliosPolicy(Registry.load(family, "float32"), LIMITS, PolicyConfig(slo="throughput"))
    for p in (blind, policy):
        p.observe_load(4, 4, 0)
    for model, (a, b) in speed.items():
        policy.observe_steps(model, steps(a, b, policy.registry[model].num_layers, layers_per_row=2.8))
    serve_profiles(blind, profiles)
    serve_profiles(policy, profiles)
    # TPOT x layers(d) / layers(L) credits the deepest model with the biggest saving at depth 1.
    assert list(blind.targets) == ["tiny-8l"]
    assert policy.targets == {"tiny-4l": Target(1, False)}
    # On a breach trigger, loading more of the fast model beats switching to a slower one.
    policy.observe_tokens("tiny-4l", tokens(100))
    policy.observe_tokens("tiny-4l", tokens(60, breach_every=1))
    event = policy.events[-1]
    assert event.kind == "load" and event.model == "tiny-4l" and event.depth > 1, event.reason


def test_throughput_prices_prefill_so_long_prompts_pick_the_model_that_prefills_fast(family):
    """tiny-4l decodes fastest but prefills slowly (as int8 weights do on a CPU); tiny-6l prefills fast. The
    prompts' length per output token, observed from finished requests, decides between them."""
    speed = {"tiny-4l": (2e-4, 1e-4, 2e-4), "tiny-6l": (6e-4, 3e-4, 1e-5), "tiny-8l": (2e-3, 1e-3, 1e-3)}
    profiles = {m: ([n] * 10, 0.02) for m, n in (("tiny-4l", 4), ("tiny-6l", 6), ("tiny-8l", 8))}  # no exits
    chosen = {}
    for prompt in (4, 100):  # 0.4 and 10 prompt tokens per output token
        policy = HeliosPolicy(Registry.load(family, "float32"), LIMITS, PolicyConfig(slo="throughput"))
        policy.observe_load(4, 4, 0)
        for model, (a, b, prefill) in speed.items():
            depth = policy.registry[model].num_layers
            policy.observe_steps(model, steps(a, b, depth) + [
                StepRecord(0.0, 0, depth, 0, prefill_tokens=100, prefill_seconds=100 * depth * prefill)])
        serve_profiles(policy, profiles, prompt=prompt)
        assert policy.limits.prompt_per_output == pytest.approx(prompt / 10)
        [chosen[prompt]] = policy.targets
    assert chosen == {4: "tiny-4l", 100: "tiny-6l"}


# --- per-request mode -----------------------------------------------------------------------------
def test_per_request_mode_profiles_each_task_on_each_model_then_routes(family):
    policy = HeliosPolicy(Registry.load(family, "float32"), LIMITS, PolicyConfig(mode="per-request", slo="latency",
                                                                      profile_requests=2))
    assert set(policy.targets) == set(policy.candidates) and all(t.profiling for t in policy.targets.values())
    assert policy.limits.memory_budget == BUDGET // 3  # each live model plans with its share
    fast_for = {"code": "tiny-6l", "prose": "tiny-8l"}
    order = []
    for task in ("code", "prose"):
        for _ in range(6):
            model = policy.choose(task)
            policy.assigned(model, task)
            order.append(model)
            depth = policy.targets[model].depth
            good = model == fast_for[task]
            policy.observe_request(model, depth, summary(model, [1] * 10 if good else [depth] * 10,
                                                         tpot=0.001 if good else 0.05), task)
    assert sorted(order[:6]) == sorted(policy.candidates * 2)  # every model tried twice on code
    assert policy.choose("code") == "tiny-6l"
    assert policy.choose("prose") == "tiny-8l"
    assert all(not t.profiling for t in policy.targets.values())


def test_quality_guard_goes_deeper_when_output_perplexity_rises(family):
    for tolerance, expect_event in ((None, False), (0.2, True)):
        policy = HeliosPolicy(Registry.load(family, "float32"), LIMITS,
                              PolicyConfig(slo="latency", quality_tolerance=tolerance, quality_window=4))
        serve_profiles(policy)  # profiled perplexity e^0.1 (logprob -0.1 per token)
        [(model, target)] = policy.targets.items()
        events = len(policy.events)
        worse = [TokenRecord(1, 0.9, False, False, -0.5) for _ in range(10)]  # perplexity e^0.5
        for _ in range(4):
            s = RequestSummary.from_records("r", model, 4, worse, "length", 0.0, 0.0, 0.1)
            policy.observe_request(model, target.depth, s)
        fired = policy.events[events:]
        assert bool(fired) == expect_event
        if fired:
            assert fired[0].reason.startswith("quality guard") and fired[0].kind in ("load", "switch")


def test_helios_profile_fills_the_registry_and_the_shortlist_uses_it(family, tmp_path):
    from helios_core.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nServing many requests at once\n\nthe cat sat\n")
    out = tmp_path / "profiled.yaml"
    assert main(["profile", "--registry", str(family), "--prompts", str(prompts), "--max-tokens", "6",
                 "--out", str(out), "--device", "cpu"]) == 0
    doc = yaml.safe_load(out.read_text())
    assert [m["layers"] for m in doc["models"]] == [4, 6, 8]
    registry = Registry.load(out, "float32")
    for entry in registry:
        p = entry.profile
        assert p.tokens == 3 * 6 and p.tokens_per_s > 0 and p.perplexity >= 1
        assert sum(p.exit_shares.values()) == pytest.approx(1.0)
        assert max(p.exit_shares) <= entry.num_layers
    # The offline profile drives the estimate before any live traffic.
    entry = registry["tiny-8l"]
    e = estimate(entry, None, entry.num_layers, LIMITS)
    assert e.measured and e.tpot_s == pytest.approx(entry.profile.time_per_output_token_s)
    # ... with the step-time fit of its batch and of one prompt alone
    assert e.step == entry.profile.step_fit(entry.config.attention_share) and e.step.per_layer_s + e.step.per_row_layer_s > 0
    with pytest.raises(SystemExit):
        main(["profile", "--registry", str(family), "--prompts", str(tmp_path / "missing.txt")])
