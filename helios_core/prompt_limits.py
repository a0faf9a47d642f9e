"""Prompt bounds that are checked before a prompt costs work.

A token covers at most as many characters as the tokenizer's longest token has, so a text longer
than `max_model_len` such tokens cannot fit and is refused without being tokenized; a text under
that bound costs a bounded encode. Token-id prompts are measured by their length first, before any
id is looked at. NORMALIZER_SLACK covers normalizers that shrink text before it is split (NFC
composes a letter and its accent into one character).
"""

from __future__ import annotations

from typing import Any

NORMALIZER_SLACK = 4


class PromptTooLong(ValueError):
    """A prompt that cannot fit in a sequence of max_model_len tokens."""


def longest_token_chars(tokenizer: Any) -> int:
    """Characters in the tokenizer's longest token, as its vocabulary spells it (byte-level tokens
    spell each byte as one character, so this bounds the text a token covers)."""
    return max(len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if t is not None)


def max_prompt_chars(tokenizer: Any, max_model_len: int) -> int:
    """The longest text that could still be under `max_model_len` tokens."""
    return max_model_len * longest_token_chars(tokenizer) * NORMALIZER_SLACK


def check_prompt_size(prompt: str | list, max_model_len: int, max_chars: int | None) -> None:
    """Raise PromptTooLong for a token list of max_model_len or more ids (a prompt must leave room for
    a generated token) or a text over `max_chars` (None: texts are not bounded here)."""
    if isinstance(prompt, str):
        if max_chars is not None and len(prompt) > max_chars:
            raise PromptTooLong(f"prompt has {len(prompt)} characters, more than any prompt under max_model_len "
                                f"({max_model_len}) tokens can have ({max_chars})")
    elif len(prompt) >= max_model_len:
        raise PromptTooLong(f"prompt has {len(prompt)} tokens but max_model_len is {max_model_len}; "
                            "it must leave room for at least one generated token")
