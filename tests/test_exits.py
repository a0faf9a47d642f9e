"""Early exits: thresholds, greedy exit at the last loaded layer, K/V propagation, exit heads."""

import pytest
import torch

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.exits import ExitConfig, ExitHead, ExitHeads, load_exit_heads, make_probe, save_exit_heads
from helios_core.models.transformer import attend
from helios_core.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 33, 2, 9], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 3], [40], [100, 101, 102]]


def engine(path, **kw) -> LLMEngine:
    exit_kw = {k: kw.pop(k) for k in ("threshold", "measure", "exit_layers", "heads_path", "probe_gate") if k in kw}
    return LLMEngine(EngineConfig(model=str(path), exit=ExitConfig(**exit_kw), **{"dtype": "float32", **kw}))


def test_threshold_zero_exits_at_first_exit_point(tiny_llama):
    for exit_layers, first in ((None, 1), ((2, 4), 2)):
        outs = engine(tiny_llama, threshold=0.0, exit_layers=exit_layers).generate(PROMPTS, GREEDY)
        assert all(layer == first for o in outs for layer in o.exit_layers)
        assert not any(f for o in outs for f in o.forced)


def test_threshold_above_one_equals_full_depth(tiny_llama):
    full = engine(tiny_llama, early_exit=False).generate(PROMPTS, GREEDY)
    never = engine(tiny_llama, threshold=1.5).generate(PROMPTS, GREEDY)
    layers = full[0].summary.exit_histogram
    assert [o.token_ids for o in never] == [o.token_ids for o in full]
    assert all(set(o.exit_layers) == set(layers) == {6} for o in never)
    assert not any(f for o in never for f in o.forced)  # the full model's last layer is no forced exit


def test_partial_model_forces_every_remaining_token_at_last_loaded_layer(tiny_llama):
    eng = engine(tiny_llama, threshold=1.5, num_layers=3)
    outs = eng.generate(PROMPTS, GREEDY)
    records = [r for o in outs for r in o.records]
    assert all(r.exit_layer == 3 and r.forced and r.breach for r in records)
    assert eng.stats.forced == eng.stats.breaches == len(records)
    # The same tokens as a full-depth run of a 3-layer model: forcing changes where, not what, is computed.
    three = engine(tiny_llama, early_exit=False, num_layers=3).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in three]


def test_forced_exit_above_threshold_is_not_a_breach(tiny_llama):
    outs = engine(tiny_llama, threshold=0.5, num_layers=3, exit_layers=(1,)).generate(PROMPTS, GREEDY)
    records = [r for o in outs for r in o.records]
    forced = [r for r in records if r.forced]
    assert forced and all(r.exit_layer == 3 for r in forced)
    assert all(r.breach == (r.confidence < 0.5) for r in forced)
    assert any(r.exit_layer == 1 for r in records)


@pytest.mark.parametrize("measure", ["max_prob", "margin", "cosine"])
def test_batch_invariance_with_mixed_exits(tiny_llama, measure):
    threshold = {"max_prob": 0.5, "margin": 0.3, "cosine": 0.9}[measure]
    eng = engine(tiny_llama, threshold=threshold, measure=measure)
    together = eng.generate(PROMPTS, GREEDY)
    depths = {layer for o in together for layer in o.exit_layers}
    assert len(depths) > 1, f"threshold should give a mix of exits, got {depths}"
    assert all(0.0 <= r.confidence <= 1.0 + 1e-6 for o in together for r in o.records)
    for prompt, batched in zip(PROMPTS, together):
        [alone] = eng.generate([prompt], GREEDY)
        assert alone.token_ids == batched.token_ids
        assert alone.exit_layers == batched.exit_layers


def test_per_request_threshold_overrides_model_default(tiny_llama):
    eng = engine(tiny_llama, threshold=0.0)
    low, high = eng.generate([PROMPTS[0]] * 2, [GREEDY, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                                        threshold=1.5)])
    assert set(low.exit_layers) == {1} and set(high.exit_layers) == {6}
    off = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, early_exit=False))
    assert off[0].token_ids == high.token_ids


@pytest.fixture(params=["llama", "gemma3"])
def exit_model(request, tiny_llama, tiny_model_dirs):
    """The 6-layer llama, and the 4-layer Gemma 3 (sliding-window layers, q/k norms, Gemma norms in the heads)."""
    return tiny_llama if request.param == "llama" else tiny_model_dirs["gemma3"]


class ListKV:
    """Reference KV: per-layer lists of (1, 1, KV, D) tensors for one sequence. windows: per layer
    (None = attend to every earlier position)."""

    def __init__(self, windows):
        self.windows = windows
        self.k = [[] for _ in windows]
        self.v = [[] for _ in windows]

    def write(self, layer, k, v):
        self.k[layer].append(k)
        self.v[layer].append(v)

    def attend(self, layer, q, k, v, scale):
        self.write(layer, k, v)
        keys = torch.cat(self.k[layer], dim=1).transpose(1, 2)
        values = torch.cat(self.v[layer], dim=1).transpose(1, 2)
        distance = torch.arange(keys.shape[2], device=keys.device).flip(0)  # query is the last position
        window = self.windows[layer]
        return attend(q, keys, values, (distance < (window or keys.shape[2] + 1))[None, None, None], scale)


def reference_decode(model, prompt, steps, threshold):
    """One sequence, one token at a time, written for clarity: exits at every layer by max prob;
    exited tokens' deeper K/V come from their exit hidden state."""
    kv = ListKV(model.config.layer_windows[: model.num_loaded_layers])
    last = model.num_loaded_layers
    tokens, depths = list(prompt), []
    device = model.device  # the engine picks CUDA when there is one
    for pos in range(len(prompt) + steps - 1):
        t = torch.tensor([[tokens[pos]]], device=device)
        p = torch.tensor([[pos]], device=device)
        x = model.embed_tokens(t, p)
        rope = model.rope(p)
        generating = pos >= len(prompt) - 1
        exited = None
        for layer in model.layers:
            if exited is not None:
                layer.fill_kv(exited, rope, kv)
                continue
            x = layer(x, rope, kv)
            depth = layer.index + 1
            logits = model.lm_head(model.norm(x[:, 0]))
            if generating and (depth == last or torch.softmax(logits, -1).max() >= threshold):
                exited, token, exit_depth = x, int(logits.argmax()), depth
        if generating:
            tokens.append(token)
            depths.append(exit_depth)
    return tokens[len(prompt):], depths


def test_decode_matches_unbatched_reference_with_kv_propagation(exit_model):
    eng = engine(exit_model, threshold=0.5)
    outs = eng.generate(PROMPTS, GREEDY)
    with torch.inference_mode():
        for prompt, out in zip(PROMPTS, outs):
            tokens, depths = reference_decode(eng.model, prompt, GREEDY.max_tokens, 0.5)
            assert out.token_ids == tokens
            assert out.exit_layers == depths
    assert len({d for o in outs for d in o.exit_layers}) > 1


def test_trained_exit_heads_roundtrip(exit_model, tmp_path):
    tiny_llama = exit_model
    eng = engine(tiny_llama, threshold=0.5)
    model = eng.model
    # A head that copies the final norm and shares the LM head computes exactly the shared head.
    identity = ExitHead(model, proj=True, lm_head=False)
    identity.norm.load_state_dict(model.norm.state_dict())
    torch.nn.init.zeros_(identity.proj.weight)
    # A head with its own LM head that scores every token alike: argmax picks token 0.
    flat = ExitHead(model, proj=False, lm_head=True)
    torch.nn.init.zeros_(flat.lm_head.weight)
    path = tmp_path / "heads.safetensors"
    save_exit_heads(path, ExitHeads(model, {2: identity, 3: flat}))

    same = engine(tiny_llama, threshold=0.5, exit_layers=(2,), heads_path=str(path)).generate(PROMPTS, GREEDY)
    shared = engine(tiny_llama, threshold=0.5, exit_layers=(2,)).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in same] == [o.token_ids for o in shared]

    # Threshold 0 at depth 3 only: every token comes from the flat head.
    flat_out = engine(tiny_llama, threshold=0.0, exit_layers=(3,), heads_path=str(path)).generate(PROMPTS, GREEDY)
    assert all(set(o.token_ids) == {0} and set(o.exit_layers) == {3} for o in flat_out)
    assert {t for o in shared for t in o.token_ids} != {0}


def test_new_trained_head_starts_as_the_shared_head(exit_model):
    """train-exits starts every head from the model's final norm and LM head (Gemma: a Gemma norm)."""
    from helios_core.train_exits import make_head

    model = engine(exit_model, pack_weights=False).model  # as train-exits loads it: the same products
    head = make_head(model, proj=True, lm_head=True)
    assert type(head.norm) is type(model.norm)
    h = torch.randn(3, model.config.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(head(h, model.lm_head), model.lm_head(model.norm(h)), atol=0, rtol=0)


def test_exit_heads_beside_the_weights_are_not_read_as_weights(tiny_llama, tmp_path):
    import shutil

    from helios_core.models.checkpoint import Checkpoint

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama, model_dir)
    model = engine(tiny_llama).model
    head = ExitHead(model, proj=False, lm_head=True)  # its lm_head.weight must not shadow the model's
    torch.nn.init.zeros_(head.lm_head.weight)
    save_exit_heads(model_dir / "exit_heads.safetensors", ExitHeads(model, {2: head}))
    assert {f.name for f in Checkpoint(model_dir)._file_of.values()} == {"model.safetensors"}
    inside = engine(model_dir, early_exit=False).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in inside] == [o.token_ids for o in engine(tiny_llama, early_exit=False).generate(PROMPTS, GREEDY)]


def test_exit_heads_file_is_checked(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    eng = engine(tiny_llama)
    bogus = tmp_path / "bogus.safetensors"
    save_file({"x": torch.zeros(2)}, str(bogus), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a Helios exit-heads file"):
        load_exit_heads(bogus, eng.model)
    with pytest.raises(ValueError, match=".safetensors"):
        load_exit_heads(tmp_path / "heads.bin", eng.model)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"exit.2.norm.weight": torch.ones(8)}, str(wrong),
              metadata={"format": "helios-exit-heads", "version": "1", "hidden_size": "8", "vocab_size": "10"})
    with pytest.raises(ValueError, match="hidden_size=8"):
        load_exit_heads(wrong, eng.model)


def constant_probes(model, bias: float, depths=range(1, 6)) -> dict:
    """Probes that ignore the hidden state: confidence sigmoid(bias) at every depth."""
    probes = {d: make_probe(model) for d in depths}
    for probe in probes.values():
        torch.nn.init.zeros_(probe.weight)
        torch.nn.init.constant_(probe.bias, bias)
    return probes


def test_exit_probes_roundtrip(tiny_llama, tmp_path):
    model = engine(tiny_llama).model
    torch.manual_seed(0)
    probes = {d: make_probe(model) for d in (1, 3, 5)}
    head = ExitHead(model, proj=False, lm_head=False)
    path = tmp_path / "probes.safetensors"
    save_exit_heads(path, ExitHeads(model, {3: head}, probes))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["version"] == "3"
        assert sorted(f.keys()) == ["exit.1.probe.bias", "exit.1.probe.weight", "exit.3.norm.weight",
                                    "exit.3.probe.bias", "exit.3.probe.weight", "exit.5.probe.bias",
                                    "exit.5.probe.weight"]
    loaded = load_exit_heads(path, model)
    assert loaded.probe_depths() == (1, 3, 5) and list(loaded.trained) == ["3"]  # probes alone add no head
    h = torch.randn(4, model.config.hidden_size)
    for d, probe in probes.items():
        assert torch.equal(loaded.probe_logit(d, h), probe(model.norm(h))[:, 0].detach())


def test_exit_probe_files_are_checked(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    model = engine(tiny_llama).model
    c = model.config
    meta = {"format": "helios-exit-heads", "version": "2", "hidden_size": str(c.hidden_size),
            "vocab_size": str(c.vocab_size)}
    good = {"exit.2.probe.weight": torch.zeros(1, c.hidden_size), "exit.2.probe.bias": torch.zeros(1)}
    cases = [
        ({"exit.2.probe.weight": torch.zeros(1, c.hidden_size + 1), "exit.2.probe.bias": torch.zeros(1)}, meta,
         r"exit probe at depth 2: wrong shapes \(file, model\) \{'weight': \(\(1, 65\), \(1, 64\)\)\}"),
        ({"exit.2.probe.weight": torch.zeros(1, c.hidden_size)}, meta, r"exit probe at depth 2: missing \['bias'\]"),
        ({**good, "exit.2.probe.scale": torch.zeros(1)}, meta, r"unexpected \['scale'\]"),
        ({"exit.6.probe.weight": torch.zeros(1, c.hidden_size), "exit.6.probe.bias": torch.zeros(1)}, meta,
         r"'exit.6.probe.(weight|bias)' is not exit.\{depth\}.<name> with depth in 1..5"),
        (good, meta | {"version": "5"}, r"version '5' is not supported \(this Helios reads 1, 2, 3, 4\)"),
    ]
    for i, (tensors, metadata, error) in enumerate(cases):
        path = tmp_path / f"bad{i}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(ValueError, match=error):
            load_exit_heads(path, model)


def test_probe_measure_needs_probes_at_every_exit_point(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="'probe' needs an exit probe at every exit point; no exit heads file"):
        engine(tiny_llama, measure="probe")
    model = engine(tiny_llama).model
    path = tmp_path / "probes.safetensors"
    save_exit_heads(path, ExitHeads(model, probes=constant_probes(model, 0.0, depths=(2, 4))))
    with pytest.raises(ValueError, match=r"has none at depth\(s\) \[1, 3, 5\].*train-exits --probes"):
        engine(tiny_llama, measure="probe", heads_path=str(path))
    outs = engine(tiny_llama, measure="probe", threshold=0.4, exit_layers=(2, 4), heads_path=str(path)).generate(
        PROMPTS, GREEDY)
    assert all(set(o.exit_layers) == {2} for o in outs)  # sigmoid(0) = 0.5 >= 0.4 at the first exit point


@pytest.mark.parametrize("bias, first", [(20.0, True), (-20.0, False)])
def test_probe_decides_the_exit(tiny_llama, tmp_path, bias, first):
    model = engine(tiny_llama).model
    path = tmp_path / "probes.safetensors"
    save_exit_heads(path, ExitHeads(model, probes=constant_probes(model, bias)))
    outs = engine(tiny_llama, measure="probe", threshold=0.5, heads_path=str(path)).generate(PROMPTS, GREEDY)
    if first:  # every token leaves at depth 1, with the shared head's token there
        shallow = engine(tiny_llama, threshold=0.0).generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == [o.token_ids for o in shallow]
        assert all(set(o.exit_layers) == {1} for o in outs)
        assert all(r.confidence == pytest.approx(1.0) for o in outs for r in o.records)
    else:  # nobody leaves early: full depth, confidence 1 at the model's own last layer
        full = engine(tiny_llama, early_exit=False).generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == [o.token_ids for o in full]
        assert all(set(o.exit_layers) == {6} and not any(o.forced) for o in outs)
        assert all(r.confidence == 1.0 for o in outs for r in o.records)


def test_probe_confidence_of_forced_exits(tiny_llama, tmp_path):
    model = engine(tiny_llama).model
    path = tmp_path / "probes.safetensors"
    save_exit_heads(path, ExitHeads(model, probes=constant_probes(model, -1.0)))  # confidence 0.269 everywhere
    eng = engine(tiny_llama, measure="probe", threshold=0.5, num_layers=3, heads_path=str(path))
    records = [r for o in eng.generate(PROMPTS, GREEDY) for r in o.records]
    assert all(r.exit_layer == 3 and r.forced and r.breach for r in records)
    assert all(r.confidence == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item()) for r in records)


def test_probe_exits_are_batch_invariant(tiny_llama, tmp_path):
    model = engine(tiny_llama).model
    torch.manual_seed(1)
    probes = {d: make_probe(model) for d in range(1, 6)}
    for probe in probes.values():
        probe.weight.data.mul_(20.0)  # spread the confidences around 0.5
    path = tmp_path / "probes.safetensors"
    save_exit_heads(path, ExitHeads(model, probes=probes))
    eng = engine(tiny_llama, measure="probe", threshold=0.5, heads_path=str(path))
    together = eng.generate(PROMPTS, GREEDY)
    assert len({d for o in together for d in o.exit_layers}) > 2
    for prompt, batched in zip(PROMPTS, together):
        [alone] = eng.generate([prompt], GREEDY)
        assert (alone.token_ids, alone.exit_layers) == (batched.token_ids, batched.exit_layers)


def test_exit_config_validation():
    with pytest.raises(ValueError, match="confidence measure"):
        ExitConfig(measure="entropy")
    with pytest.raises(ValueError, match="threshold"):
        ExitConfig(threshold=-0.1)
    with pytest.raises(ValueError, match="1-based"):
        ExitConfig(exit_layers=(0, 2))
    assert ExitConfig(exit_layers=(4, 2, 2, 9)).exit_points(6) == (2, 4)
    assert ExitConfig().exit_points(4) == (1, 2, 3)


def test_registry_measure_selects_the_probe(tiny_llama, tmp_path):
    from helios_core.policy import Registry

    model = engine(tiny_llama).model
    probes = tmp_path / "probes.safetensors"
    save_exit_heads(probes, ExitHeads(model, probes=constant_probes(model, 0.0)))
    path = tmp_path / "registry.yaml"
    path.write_text(f"models:\n- name: tiny\n  path: {tiny_llama}\n  exit_heads: {probes}\n  measure: probe\n")
    entry = Registry.load(path, "float32")["tiny"]
    assert entry.exit_config() == ExitConfig(threshold=0.8, measure="probe", heads_path=str(probes))
    Registry.load(path, "float32").save(tmp_path / "again.yaml")
    assert Registry.load(tmp_path / "again.yaml", "float32")["tiny"].measure == "probe"
    path.write_text(f"models:\n- name: tiny\n  path: {tiny_llama}\n  measure: entropy\n")
    with pytest.raises(ValueError, match="unknown confidence measure 'entropy'"):
        Registry.load(path, "float32")


def random_probes(model, scale: float = 20.0, seed: int = 1) -> dict:
    torch.manual_seed(seed)
    probes = {d: make_probe(model) for d in range(1, model.config.num_layers)}
    for probe in probes.values():
        probe.weight.data.mul_(scale)  # spread the probe's outputs around 0.5
    return probes


def test_probe_gate_only_delays_max_prob_exits(tiny_llama, tmp_path):
    model = engine(tiny_llama).model
    path = tmp_path / "probes.safetensors"
    save_exit_heads(path, ExitHeads(model, probes=random_probes(model)))
    plain = engine(tiny_llama, threshold=0.3).generate(PROMPTS, GREEDY)
    # Gate 0: every row is a candidate, so the gate changes nothing.
    open_gate = engine(tiny_llama, threshold=0.3, heads_path=str(path), probe_gate=0.0).generate(PROMPTS, GREEDY)
    assert [(o.token_ids, o.exit_layers) for o in open_gate] == [(o.token_ids, o.exit_layers) for o in plain]
    # A probe that never reaches the gate: nobody leaves before the last layer.
    never = tmp_path / "never.safetensors"
    save_exit_heads(never, ExitHeads(model, probes=constant_probes(model, -20.0)))
    shut = engine(tiny_llama, threshold=0.3, heads_path=str(never), probe_gate=0.5).generate(PROMPTS, GREEDY)
    full = engine(tiny_llama, early_exit=False).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in shut] == [o.token_ids for o in full]
    assert all(set(o.exit_layers) == {6} for o in shut)
    # A gate in between: max_prob still decides, so every exit is a max_prob exit...
    eng = engine(tiny_llama, threshold=0.3, heads_path=str(path), probe_gate=0.5)
    gated = eng.generate(PROMPTS, GREEDY)
    records = [r for o in gated for r in o.records]
    assert all(r.confidence >= 0.3 for r in records if r.exit_layer < 6)
    assert len({r.exit_layer for r in records}) > 1
    # ...and batch invariant.
    for prompt, batched in zip(PROMPTS, gated):
        [alone] = eng.generate([prompt], GREEDY)
        assert (alone.token_ids, alone.exit_layers) == (batched.token_ids, batched.exit_layers)


def test_probe_gate_validation(tiny_llama, tmp_path):
    from helios_core.policy import Registry

    with pytest.raises(ValueError, match=r"probe_gate is a probability in \[0, 1\], got 1.5"):
        ExitConfig(probe_gate=1.5)
    with pytest.raises(ValueError, match="probe_gate saves LM-head checks of max_prob or margin; 'probe' has none"):
        ExitConfig(measure="probe", probe_gate=0.5)
    with pytest.raises(ValueError, match="probe_gate needs an exit probe at every exit point; no exit heads file"):
        engine(tiny_llama, probe_gate=0.5)
    model = engine(tiny_llama).model
    probes = tmp_path / "probes.safetensors"
    save_exit_heads(probes, ExitHeads(model, probes=random_probes(model)))
    path = tmp_path / "registry.yaml"
    path.write_text(f"models:\n- name: tiny\n  path: {tiny_llama}\n  exit_heads: {probes}\n  probe_gate: 0.4\n")
    entry = Registry.load(path, "float32")["tiny"]
    assert entry.exit_config() == ExitConfig(threshold=0.8, heads_path=str(probes), probe_gate=0.4)
    Registry.load(path, "float32").save(tmp_path / "again.yaml")
    assert Registry.load(tmp_path / "again.yaml", "float32")["tiny"].probe_gate == 0.4
    path.write_text(f"models:\n- name: tiny\n  path: {tiny_llama}\n  probe_gate: 0.4\n")
    with pytest.raises(ValueError, match="probe_gate need exit_heads"):
        Registry.load(path, "float32")


def test_low_rank_heads_round_trip_and_start_as_the_shared_head(tiny_llama, tmp_path):
    from helios_core.train_exits import make_head

    model = engine(tiny_llama).model
    torch.manual_seed(0)
    head = make_head(model, proj=False, lm_head=False, rank=4)
    h = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(head(h, model.lm_head), model.lm_head(model.norm(h)))  # up starts at zero
        head.up.weight.normal_()
        path = tmp_path / "low_rank.safetensors"
        save_exit_heads(path, ExitHeads(model, {2: head}))
        loaded = load_exit_heads(path, model)
        assert loaded.trained["2"].down.weight.shape == (4, model.config.hidden_size)
        torch.testing.assert_close(loaded.logits(2, h), head(h, model.lm_head))
        assert not torch.allclose(loaded.logits(2, h), model.lm_head(model.norm(h)))
    with pytest.raises(ValueError, match="full-rank .* or low-rank"):
        ExitHead(model, proj=True, lm_head=False, rank=4)


def test_probe_exits_through_a_head_with_its_own_lm_head(tiny_llama, tmp_path):
    """The probe measure defers the shared LM head to one product per step; a head with its own LM
    head is applied where its rows leave."""
    model = engine(tiny_llama).model
    torch.manual_seed(2)
    head = ExitHead(model, proj=False, lm_head=True)
    torch.nn.init.normal_(head.lm_head.weight, std=0.5)
    path = tmp_path / "own_head.safetensors"
    save_exit_heads(path, ExitHeads(model, {2: head}, {2: constant_probes(model, 20.0)[2]}))
    eng = engine(tiny_llama, measure="probe", threshold=0.5, exit_layers=(2,), heads_path=str(path))
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    heads = load_exit_heads(path, eng.model)
    with torch.inference_mode():
        expected = [int(heads.logits(2, eng.model(torch.tensor([p]), output_hidden_states=True)[1][1][:, -1]).argmax())
                    for p in PROMPTS]
    assert [o.exit_layers[0] for o in outs] == [2] * len(PROMPTS)
    assert [o.token_ids[0] for o in outs] == expected
    shared = engine(tiny_llama, threshold=0.0, exit_layers=(2,)).generate(PROMPTS, GREEDY)
    assert [o.token_ids[0] for o in outs] != [o.token_ids[0] for o in shared]  # not the shared head's tokens
