"""Exit analysis across models: tokens aligned by text between two tokenizers, early-exit cross tabs,
the full pass at chosen depths (quality.py and bench/exit_analysis_real.py)."""

import pathlib
import sys

import pytest
import torch

from helios_core.engine import load_tokenizer
from helios_core.exits import ExitConfig, ExitHeads
from helios_core.models import load_model
from helios_core.quality import aligned_positions, cross_tab, full_pass, token_starts
from tiny_models import build_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from exit_analysis_real import tokenize  # noqa: E402

DEMO = ROOT / "models" / "helios-demo-code-6l"
TEXTS = [{"text": "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"},
         {"text": "The module provides naïve helpers — see “Usage” below.\n"}]


def test_token_starts_skip_special_tokens_and_pieces_of_a_character():
    # <bos>, "def", " foo", then a character split into three byte-level pieces, then "x"
    offsets = [(0, 0), (0, 3), (3, 7), (7, 9), (8, 9), (8, 9), (9, 10)]
    assert token_starts(offsets) == [-1, 0, 3, 7, -1, -1, 9]


def test_aligned_positions_pair_predictions_of_tokens_starting_at_the_same_character():
    # "def foo(x):" as A = def| foo|(|x|): and B = de|f| foo(|x|)|: ; positions predict tokens 1..
    a = [3, 7, 8, 9]
    b = [2, 3, 8, 9, 10]
    ia, ib = aligned_positions(a, b)
    assert ia.tolist() == [0, 2, 3] and ib.tolist() == [1, 2, 3]  # " foo", "x", "):" in A
    assert [a[i] for i in ia] == [b[i] for i in ib]
    ia, ib = aligned_positions([-1, 5], [-1, 6])  # -1 (no start) never aligns
    assert ia.numel() == ib.numel() == 0


def test_two_tokenizers_align_exactly_where_both_start_a_token(tmp_path):
    demo = load_tokenizer(DEMO)
    other = build_tokenizer(tmp_path / "tok", add_bos=True)  # another byte-level BPE, with a BOS like Gemma's
    chunk_len = 16  # several chunks per text: a chunk's first token is read, never predicted
    (chunks_a, starts_a), (chunks_b, starts_b) = tokenize(TEXTS, demo, chunk_len), tokenize(TEXTS, other, chunk_len)
    assert len(starts_a) == sum(len(c) - 1 for c in chunks_a) and len(starts_b) == sum(len(c) - 1 for c in chunks_b)
    assert chunks_a != chunks_b  # the tokenizations differ
    ia, ib = aligned_positions(starts_a, starts_b)
    shared = set(starts_a) & set(starts_b) - {-1}
    assert 0 < len(ia) == len(shared) < min(len(starts_a), len(starts_b))
    assert [starts_a[i] for i in ia] == [starts_b[i] for i in ib]
    text = "\n".join(t["text"] for t in TEXTS)  # tokenize lays texts end to end, one character apart
    assert all(0 <= c < len(text) for c in shared)

    ia, ib = aligned_positions(starts_a, starts_a)  # one tokenizer: every predicted text token aligns with itself
    assert ia.tolist() == ib.tolist() == [i for i, c in enumerate(starts_a) if c >= 0]


def test_cross_tab_early_before_the_last_layer():
    depth_a, depth_b = torch.tensor([16, 30, 28, 30]), torch.tensor([8, 18, 18, 16])
    half = cross_tab(depth_a, 30, depth_b, 18)  # early: <= 15 and <= 9
    assert (half.both_early, half.a_only, half.b_only, half.neither) == (0, 0, 1, 3)
    any_exit = cross_tab(depth_a, 30, depth_b, 18, early_fraction=None)  # early: < 30 and < 18
    assert (any_exit.both_early, any_exit.a_only, any_exit.b_only, any_exit.neither) == (1, 1, 1, 1)
    assert any_exit.b_early_given_a_late == 0.5 and any_exit.to_dict()["early_fraction"] is None


@pytest.mark.parametrize("measure", ["max_prob", "cosine"])
def test_full_pass_at_chosen_depths_is_those_columns_of_every_depth(measure):
    # cosine compares with the state at the previous exit point (2), decoded or not
    model = load_model(DEMO)
    heads, config = ExitHeads(model), ExitConfig(measure=measure, exit_layers=(2, 4))
    tokens = torch.tensor([load_tokenizer(DEMO)(TEXTS[0]["text"]).input_ids[:24]])
    every = full_pass(model, heads, tokens, config)
    some = full_pass(model, heads, tokens, config, depths=[4, 6])
    for all_depths, chosen in zip(every, some):
        assert chosen.shape == (23, 2)
        torch.testing.assert_close(chosen, all_depths[:, [3, 5]])
