"""Early exits: thresholds, greedy exit at the last loaded layer, K/V propagation, exit heads."""

import pytest
import torch

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.exits import ExitConfig, ExitHead, ExitHeads, load_exit_heads, save_exit_heads
from helios_core.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 33, 2, 9], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 3], [40], [100, 101, 102]]


def engine(path, **kw) -> LLMEngine:
    exit_kw = {k: kw.pop(k) for k in ("threshold", "measure", "exit_layers", "heads_path") if k in kw}
    return LLMEngine(EngineConfig(model=str(path), exit=ExitConfig(**exit_kw), **kw))


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


class ListKV:
    """Reference KV: per-layer lists of (1, 1, KV, D) tensors for one sequence."""

    def __init__(self, layers):
        self.k = [[] for _ in range(layers)]
        self.v = [[] for _ in range(layers)]

    def write(self, layer, k, v):
        self.k[layer].append(k)
        self.v[layer].append(v)

    def update(self, layer, k, v):
        self.write(layer, k, v)
        keys = torch.cat(self.k[layer], dim=1).transpose(1, 2)
        values = torch.cat(self.v[layer], dim=1).transpose(1, 2)
        return keys, values, torch.zeros(1, 1, 1, keys.shape[2], device=keys.device)


def reference_decode(model, prompt, steps, threshold):
    """One sequence, one token at a time, written for clarity: exits at every layer by max prob;
    exited tokens' deeper K/V come from their exit hidden state."""
    kv = ListKV(model.num_loaded_layers)
    last = model.num_loaded_layers
    tokens, depths = list(prompt), []
    device = model.embed.weight.device  # the engine picks CUDA when there is one
    for pos in range(len(prompt) + steps - 1):
        t = torch.tensor([[tokens[pos]]], device=device)
        p = torch.tensor([[pos]], device=device)
        x = model.embed_tokens(t, p)
        cos, sin = model.rope(p)
        generating = pos >= len(prompt) - 1
        exited = None
        for layer in model.layers:
            if exited is not None:
                layer.fill_kv(exited, cos, sin, kv)
                continue
            x = layer(x, cos, sin, kv)
            depth = layer.index + 1
            logits = model.lm_head(model.norm(x[:, 0]))
            if generating and (depth == last or torch.softmax(logits, -1).max() >= threshold):
                exited, token, exit_depth = x, int(logits.argmax()), depth
        if generating:
            tokens.append(token)
            depths.append(exit_depth)
    return tokens[len(prompt):], depths


def test_decode_matches_unbatched_reference_with_kv_propagation(tiny_llama):
    eng = engine(tiny_llama, threshold=0.5)
    outs = eng.generate(PROMPTS, GREEDY)
    with torch.inference_mode():
        for prompt, out in zip(PROMPTS, outs):
            tokens, depths = reference_decode(eng.model, prompt, GREEDY.max_tokens, 0.5)
            assert out.token_ids == tokens
            assert out.exit_layers == depths
    assert len({d for o in outs for d in o.exit_layers}) > 1


def test_trained_exit_heads_roundtrip(tiny_llama, tmp_path):
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


def test_exit_config_validation():
    with pytest.raises(ValueError, match="confidence measure"):
        ExitConfig(measure="entropy")
    with pytest.raises(ValueError, match="threshold"):
        ExitConfig(threshold=-0.1)
    with pytest.raises(ValueError, match="1-based"):
        ExitConfig(exit_layers=(0, 2))
    assert ExitConfig(exit_layers=(4, 2, 2, 9)).exit_points(6) == (2, 4)
    assert ExitConfig().exit_points(4) == (1, 2, 3)
