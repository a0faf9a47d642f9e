import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from helios_core.detokenizer import TextStream

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Stop here, then continue reading the story.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "Hello world! Hello there. END OF STORY. ### Once upon a time there was a small model.",
    "Café crème brûlée, naïve façade, jalapeño piñata, Zürich Straße, São Paulo, Kraków.",
    "東京は日本の首都です。北京是中国的首都。我们今天去公园散步。日本語を勉強しています。",
    "서울은 한국의 수도입니다. Привет, как дела? Γειά σου κόσμε.",
    "Emoji time 🎉🚀🙂👍🏽 and flags 🇫🇷 with text 😀 ok. Party 🎉 rocket 🚀 smile 🙂.",
]

# Rearranged, so the trained merges only partly cover them and characters split across tokens.
TEXTS = [
    "Emoji party: 🚀🎉 then 🙂👍🏽 and 🇫🇷 😀!",
    "日本の首都は東京です。中国的首都是北京。",
    "Café crème brûlée — naïve Zürich 🍰 東京 🙂",
    "Unseen: 🦀🧪 Ωμέγα ₿ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # chars not in the training corpus -> raw byte tokens
]

PROMPT = "User: tell me something.\nAssistant:"


def _train(pre_tokenizer, decoder) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style): one character can span several tokens."""
    return _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(tokenizer, text: str, prompt: str = PROMPT, **kwargs):
    """Push every token of `text`; return (stream, per-token deltas, per-token stopped flags)."""
    stream = TextStream(tokenizer, _encode(tokenizer, prompt), **kwargs)
    deltas, flags = [], []
    for token_id in _encode(tokenizer, text):
        delta, stopped = stream.push(token_id)
        deltas.append(delta)
        flags.append(stopped)
    return stream, deltas, flags


def test_tokenizer_actually_splits_characters(tokenizer):
    # Guards the tests below: they are only meaningful if some characters span several tokens.
    for text in TEXTS:
        pieces = [tokenizer.decode([i]) for i in _encode(tokenizer, text)]
        assert any("\ufffd" in p for p in pieces), text


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", [PROMPT, ""])
def test_stream_never_emits_partial_characters(tokenizer, text, prompt):
    stream, deltas, flags = _stream(tokenizer, text, prompt=prompt)
    tail = stream.finish()
    assert not any(flags)
    assert all("\ufffd" not in d for d in deltas)
    assert tail == ""  # every character completes by the last token
    assert "".join(deltas) == stream.text == tokenizer.decode(_encode(tokenizer, text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_arrive_as_soon_as_characters_complete(tokenizer, text):
    # Without stop strings, only the trailing incomplete character is ever held back.
    ids = _encode(tokenizer, text)
    stream = TextStream(tokenizer, _encode(tokenizer, PROMPT))
    emitted = ""
    for n, token_id in enumerate(ids, start=1):
        emitted += stream.push(token_id)[0]
        assert emitted == tokenizer.decode(ids[:n]).rstrip("\ufffd")


def test_special_tokens(tokenizer):
    ids = _encode(tokenizer, "Hello world") + [tokenizer.eos_token_id]
    skipping = TextStream(tokenizer, [])
    assert [skipping.push(i)[0] for i in ids][-1] == ""
    assert skipping.text == "Hello world"

    keeping = TextStream(tokenizer, [], skip_special_tokens=False)
    for i in ids:
        keeping.push(i)
    assert keeping.text == "Hello world<|endoftext|>"


def test_finish_flushes_trailing_partial_character(tokenizer):
    ids = _encode(tokenizer, "ok 🦀")[:-1]  # the crab's last byte never arrives
    stream = TextStream(tokenizer, [])
    assert "".join(stream.push(i)[0] for i in ids) == "ok "
    assert stream.finish() == "\ufffd"
    assert stream.text == tokenizer.decode(ids) == "ok \ufffd"


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("Hello world! Hello there.", "lo wor", "Hel"),
        ("The quick brown fox jumps over the lazy dog.", "fox jumps", "The quick brown "),
        (TEXTS[2], "🍰 東", "Café crème brûlée — naïve Zürich "),
        (TEXTS[1], "首都は東", "日本の"),
        (TEXTS[0], "🙂👍", "Emoji party: 🚀🎉 then "),
    ],
)
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tokenizer, text, stop, expected, include):
    ids = _encode(tokenizer, text)
    assert not any(stop in tokenizer.decode([i]) for i in ids)  # it really spans tokens
    final = expected + stop if include else expected

    stream = TextStream(tokenizer, _encode(tokenizer, PROMPT), stop=[stop], include_stop_str_in_output=include)
    emitted = ""
    for n, token_id in enumerate(ids, start=1):
        delta, stopped = stream.push(token_id)
        emitted += delta
        # Emitted text only ever grows toward the final answer: the stop string (or its
        # beginning) is never shown and then retracted.
        assert final.startswith(emitted)
        assert stopped == (stop in tokenizer.decode(ids[:n]))
        if stopped:
            break
    assert stopped
    assert emitted == stream.text == final
    assert stream.push(ids[0]) == ("", True)  # tokens after the stop are ignored
    assert stream.finish() == ""


def test_stop_prefix_is_held_back_then_released(tokenizer):
    stream = TextStream(tokenizer, [], stop=["END OF"])
    ids = _encode(tokenizer, "Hello there. EN")
    emitted = "".join(stream.push(i)[0] for i in ids)
    assert emitted == "Hello there. "  # "EN" could start "END OF"
    assert stream.finish() == "EN"
    assert stream.text == "Hello there. EN"

    stream = TextStream(tokenizer, [], stop=["END OF"])
    deltas = [stream.push(i) for i in _encode(tokenizer, "Hello there. END. OK")]
    assert not any(stopped for _, stopped in deltas)
    assert "".join(d for d, _ in deltas) + stream.finish() == "Hello there. END. OK"


def test_earliest_completing_stop_string_wins(tokenizer):
    ids = _encode(tokenizer, "Hello world! Hello there.")
    for stops, expected in [(["there", "world"], "Hello "), (["o w", "Hello world"], "Hell")]:
        stream = TextStream(tokenizer, [], stop=stops)
        for i in ids:
            if stream.push(i)[1]:
                break
        assert stream.text == expected, stops


def test_leading_space_decodes_relative_to_prompt():
    """SentencePiece-style decoders drop the space of a sequence's first word; streaming
    must not, because the generated text continues the prompt."""
    spm = _train(pre_tokenizers.Metaspace(), decoders.Metaspace())
    prompt, reply = _encode(spm, "Hello"), _encode(spm, "Hello world there")[1:]
    assert spm.decode(reply) == "world there"  # a standalone decode loses the space
    stream = TextStream(spm, prompt)
    text = "".join(stream.push(i)[0] for i in reply) + stream.finish()
    assert text == " world there"
