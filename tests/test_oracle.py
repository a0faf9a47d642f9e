"""transformers as the numerical oracle: our decoder and engine against HF, every family.

With early exit off, the engine must reproduce HF's greedy decoding token for token: short prompts,
prompts longer than the prefill chunk (chunked prefill; longer than Mistral's sliding window),
and several prompts of different lengths batched together (continuous batching, block reuse), with
KV blocks small enough that prompts and decodes cross many block boundaries.
Sliding windows: Mistral's (every layer) and Gemma 3's (local layers between global ones).
Logits are compared too: the full-sequence forward and the engine's decode step (fp32, atol 1e-4),
and a loose bf16 check.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.models import load_model
from helios_core.sampling import SamplingParams

from tiny_models import FAMILIES, GEMMA3_SLIDING_WINDOW, MISTRAL_SLIDING_WINDOW, hf_greedy, hf_logits


NEW_TOKENS = 32
CHUNK = 8  # max_prefill_tokens: small, so the long prompts are prefilled in several chunks
BLOCK = 3  # KV block size: not a divisor of CHUNK, so chunks start and end inside blocks
MAX_MODEL_LEN = 128
SHORT_LEN = 5
LONG_LEN = 40  # > CHUNK and > the sliding windows (16): prefill and decode both cross the window
BATCH_LENS = (1, SHORT_LEN, 12, LONG_LEN)  # shares the short/long prompts (HF results are cached)
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
ATOL = 1e-4

assert LONG_LEN > CHUNK and LONG_LEN > max(MISTRAL_SLIDING_WINDOW, GEMMA3_SLIDING_WINDOW)


def prompt(length: int, vocab: int = 300, seed: int = 0) -> list[int]:
    """Deterministic pseudo-random token ids (the tiny vocab has ~385 ids)."""
    g = torch.Generator().manual_seed(1000 * seed + length)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


@functools.lru_cache(maxsize=None)
def _hf_greedy_cached(path: str, ids: tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(hf_greedy(path, list(ids), n))


def hf_ref(path, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    """HF greedy continuation (cached: the short and long prompts recur across tests)."""
    return list(_hf_greedy_cached(str(path), tuple(ids), n))


def _hf_model(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


@functools.lru_cache(maxsize=None)
def _hf_model_cached(path: str):
    return _hf_model(path, torch.float32)


def assert_hf_greedy_by_teacher_forcing(path, ids: list[int], out: list[int]) -> None:
    """`out` is HF's greedy continuation of `ids` iff every output token is HF's argmax given the prompt and
    the outputs before it: one HF forward over ids + out checks all positions at once (much cheaper than a
    second `generate`; equivalent to comparing with hf_greedy, the tiny models have no near-ties)."""
    model = _hf_model_cached(str(path))
    x = torch.tensor([ids + out[:-1]])
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0]
    assert logits[len(ids) - 1 :].argmax(-1).tolist() == out, f"prompt of {len(ids)} tokens"


@pytest.fixture(scope="module", params=FAMILIES)
def family_ckpt(request, tiny_model_dirs):
    return request.param, tiny_model_dirs[request.param]


def make_engine(path, **overrides) -> LLMEngine:
    kwargs = dict(model=str(path), early_exit=False, max_model_len=MAX_MODEL_LEN, max_prefill_tokens=CHUNK,
                  device="cpu", block_size=BLOCK, dtype="float32")  # the oracle is transformers in fp32
    kwargs.update(overrides)
    return LLMEngine(EngineConfig(**kwargs))


# --- greedy generation, early exit off --------------------------------------------------------------------
def test_greedy_short_prompt_matches_hf(family_ckpt):
    _, path = family_ckpt
    ids = prompt(SHORT_LEN)
    [out] = make_engine(path).generate([ids], GREEDY)
    assert out.prompt_token_ids == ids
    assert out.token_ids == hf_ref(path, ids)
    assert out.finish_reason == "length"
    # early_exit=False: every token ran the whole (fully loaded) model, nothing forced
    assert out.exit_layers == [4] * NEW_TOKENS
    assert not any(out.forced)


def test_greedy_long_prompt_chunked_prefill_matches_hf(family_ckpt):
    _, path = family_ckpt
    ids = prompt(LONG_LEN)
    engine = make_engine(path)
    chunks = []
    prefill = engine.runner.prefill

    def spy(packed):
        chunks.extend((start, tokens.shape[0]) for _, tokens, start in packed)
        return prefill(packed)

    engine.runner.prefill = spy
    [out] = engine.generate([ids], GREEDY)
    assert out.token_ids == hf_ref(path, ids)
    # the prompt (minus its last token, fed by the first decode) was prefilled in CHUNK-sized pieces
    assert len(chunks) == math.ceil((LONG_LEN - 1) / CHUNK) > 1
    assert all(n <= CHUNK for _, n in chunks)
    assert [s for s, _ in chunks] == list(range(0, LONG_LEN - 1, CHUNK))
    assert sum(n for _, n in chunks) == LONG_LEN - 1


def test_batch_of_different_lengths_matches_hf(family_ckpt):
    """Several prompts in one generate(): each must equal its own HF greedy result."""
    _, path = family_ckpt
    prompts = [prompt(n) for n in BATCH_LENS]
    outs = make_engine(path).generate(prompts, GREEDY)
    for ids, out in zip(prompts, outs):
        assert out.prompt_token_ids == ids
        assert len(out.token_ids) == NEW_TOKENS
        if len(ids) in (SHORT_LEN, LONG_LEN):
            assert out.token_ids == hf_ref(path, ids), f"prompt of {len(ids)} tokens"
        else:
            assert_hf_greedy_by_teacher_forcing(path, ids, out.token_ids)


def test_continuous_batching_with_queueing_and_uneven_finishes(family_ckpt):
    """Fewer batch rows than requests and different max_tokens: requests finish at different steps,
    waiting ones join mid-flight into the blocks others freed. Each result is a prefix of its HF result."""
    _, path = family_ckpt
    prompts = [prompt(n) for n in BATCH_LENS] * 2
    max_tokens = [3, NEW_TOKENS, 17, 1, NEW_TOKENS, 9, 2, 20]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
    engine = make_engine(path, max_num_seqs=3)
    assert engine.capacity == 3
    outs = engine.generate(prompts, params)
    for ids, m, out in zip(prompts, max_tokens, outs):
        assert len(out.token_ids) == m
        assert_hf_greedy_by_teacher_forcing(path, ids, out.token_ids)
    assert not engine.has_unfinished()
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.num_blocks  # every block back


# --- logits --------------------------------------------------------------------------------------------
def test_full_sequence_logits_match_hf(family_ckpt):
    _, path = family_ckpt
    ids = torch.tensor([prompt(LONG_LEN), prompt(LONG_LEN, seed=3)])
    ours = load_model(path)(ids)
    ref = hf_logits(path, ids)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_decode_step_logits_match_hf(family_ckpt):
    """The runner's DecodeOutput.logits for a batch (first and second generated token) equal HF's
    last-position logits for each row's context."""
    _, path = family_ckpt
    engine = make_engine(path, max_prefill_tokens=256)
    captured = []
    decode = engine.runner.decode

    def spy(*args, **kwargs):
        out = decode(*args, **kwargs)
        captured.append(out)
        return out

    engine.runner.decode = spy
    prompts = [prompt(n) for n in (SHORT_LEN, LONG_LEN, 12)]
    rids = [engine.add_request(p, GREEDY) for p in prompts]
    seqs = [engine._requests[r] for r in rids]

    engine.step()  # prefill all three (fits in one chunk budget), then decode the first token
    assert len(captured) == 1 and captured[0].logits.shape == (3, engine.model_config.vocab_size)
    engine.step()  # second token: decode over the cache only
    assert len(captured) == 2

    for r, (ids, seq) in enumerate(zip(prompts, seqs)):  # decode rows are in admission order
        assert len(seq.output_ids) == 2
        ref = hf_logits(path, ids + seq.output_ids[:1])[0]
        torch.testing.assert_close(captured[0].logits[r], ref[len(ids) - 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(captured[1].logits[r], ref[len(ids)], atol=ATOL, rtol=0)
        assert seq.output_ids[0] == int(ref[len(ids) - 1].argmax())
        assert seq.output_ids[1] == int(ref[len(ids)].argmax())
    assert (captured[0].depth == 4).all() and not captured[0].forced.any()


# --- Gemma 3 configs as older transformers wrote them ------------------------------------------------------
def test_gemma3_legacy_config_keys_read_as_transformers_reads_them(tiny_model_dirs, tmp_path):
    """Before transformers 5, Gemma 3 configs had flat RoPE keys (rope_theta and rope_scaling for the
    global layers, rope_local_base_freq for the local ones) and sliding_window_pattern instead of
    layer_types. Our model of such a directory must match transformers' model of it."""
    import json
    import shutil

    path = shutil.copytree(tiny_model_dirs["gemma3"], tmp_path / "gemma3_legacy")
    config = json.loads((path / "config.json").read_text())
    for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        del config[key]
    config.update(rope_theta=20000.0, rope_local_base_freq=5000.0, sliding_window_pattern=2,
                  rope_scaling={"rope_type": "linear", "factor": 4.0})
    (path / "config.json").write_text(json.dumps(config))

    model = load_model(path)
    c = model.config
    assert c.layer_windows == (GEMMA3_SLIDING_WINDOW, None) * 2  # every 2nd layer global
    assert (c.rope.theta, c.rope.scaling, c.rope.factor) == (20000.0, "linear", 4.0)
    assert (c.local_rope.theta, c.local_rope.scaling) == (5000.0, "default")
    ids = torch.tensor([prompt(LONG_LEN)])
    torch.testing.assert_close(model(ids), hf_logits(path, ids), atol=ATOL, rtol=0)


# --- bf16 ----------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("family", ["llama_gqa", "gemma3"])  # gemma3: fp32 norms, embedding scale in bf16
def test_bfloat16_matches_hf_bfloat16(tiny_model_dirs, family):
    path = tiny_model_dirs[family]
    ids = prompt(20)
    model = load_model(path, dtype="bfloat16")
    assert model.embed.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    fp32_bytes = load_model(path).weight_bytes()
    assert model.weight_bytes() * 2 == fp32_bytes

    hf16 = _hf_model(path, torch.bfloat16)
    x = torch.tensor([ids])
    ours = model(x).float()
    ref16 = hf16(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()
    ref32 = hf_logits(path, ids)
    scale = ref32.abs().max().item()
    # bf16 keeps ~3 significant digits; the two bf16 implementations should agree far more closely
    # than either agrees with fp32, and both stay within a few % of the logit scale of fp32.
    assert (ours - ref16).abs().max().item() <= 0.02 * scale
    assert (ours - ref32).abs().max().item() <= 0.1 * scale
    assert (ours.argmax(-1) == ref16.argmax(-1)).float().mean().item() >= 0.9

    # greedy generation in bf16 through the engine (cached decode) vs HF bf16 generate
    engine = LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", early_exit=False,
                                    max_model_len=MAX_MODEL_LEN, max_prefill_tokens=CHUNK, device="cpu"))
    assert engine.cache.k[0].dtype == torch.bfloat16
    [out] = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    gen = hf16.generate(x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1, max_new_tokens=8,
                        eos_token_id=None, pad_token_id=hf16.config.pad_token_id)[0, len(ids):].tolist()
    assert out.token_ids[:4] == gen[:4]
    # and the first token agrees with fp32 HF too (the tiny models have large top-1 margins)
    assert out.token_ids[0] == hf_ref(path, ids)[0]


def test_bfloat16_norm_and_rope_round_as_transformers_does():
    """In bf16, RMSNorm (fp32 normalisation, rounded, then scaled in bf16) and RoPE give transformers'
    Llama values bit for bit: cheaper formulations must keep every rounding step."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from helios_core.models.config import RopeConfig
    from helios_core.models.transformer import RMSNorm, apply_rope, rope_tables

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 64, generator=g) * 3).bfloat16()
    ours, ref = RMSNorm(64, 1e-5), LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(64, generator=g) + 0.5)
        ref.weight.copy_(ours.weight)
    assert torch.equal(ours.bfloat16()(x), ref.bfloat16()(x))

    q = torch.randn(2, 5, 4, 16, generator=g).bfloat16()  # (N, T, heads, D)
    cos, sin = (t.bfloat16() for t in rope_tables(RopeConfig(), 16, 5))
    hf_cos = torch.cat([torch.outer(torch.arange(5.0), 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16))] * 2, -1)
    expected, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), hf_cos.cos().bfloat16()[None],
                                       hf_cos.sin().bfloat16()[None])
    assert torch.equal(apply_rope(q, (cos[None, :, None], sin[None, :, None])), expected.transpose(1, 2))
