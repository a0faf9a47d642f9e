"""Incremental detokenization for streaming, with stop-string detection.

Decoding the whole sequence every step is O(n) per token. Instead we decode a short window
(prefix_offset .. end) and emit only what it adds over (prefix_offset .. read_offset), the
technique used by TGI and vLLM. Starting the window inside the prompt gives the first generated
tokens the same context that a full decode would (leading-space rules of SentencePiece and
byte-level tokenizers depend on it).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# How many prompt tokens seed the decode window.
_PROMPT_CONTEXT = 5
# A window that ends mid-character (a UTF-8 sequence split across tokens) decodes to this.
_REPLACEMENT_CHAR = "\ufffd"


class TextStream:
    """Turns generated token ids into text deltas that are safe to stream."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        self._tokens = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._prefix_text = self._decode(self._tokens)
        self._read_chars = 0  # chars of the unread tokens' text already emitted
        self._pending = ""  # decoded but held back: it may be the start of a stop string
        self._chunks: list[str] = []  # emitted deltas; joined lazily by `text`
        self._stopped = False

    @property
    def text(self) -> str:
        """All text emitted so far (after stop truncation)."""
        return "".join(self._chunks)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one generated token; return (text delta safe to emit now, stopped_by_stop_string)."""
        if self._stopped:
            return "", True
        self._tokens.append(token_id)
        return self._emit(self._decode_new(final=False), final=False)

    def finish(self) -> str:
        """End of generation (not by stop string): return any held-back text."""
        if self._stopped:
            return ""
        delta, _ = self._emit(self._decode_new(final=True), final=True)
        return delta

    def _decode(self, ids: Sequence[int]) -> str:
        # Cleanup (e.g. " ." -> ".") would make a window's decode disagree with its prefix's.
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _decode_new(self, final: bool) -> str:
        """Text the unread tokens add, up to the last complete character."""
        new_text = self._decode(self._tokens[self._prefix_offset :])
        start = len(self._prefix_text) + self._read_chars
        if new_text.endswith(_REPLACEMENT_CHAR) and not final:
            # The tokens end inside a character. Characters before it are final, so emit
            # them now (stop strings are then caught at the token that completes them), but
            # keep the window, whose tail will decode differently once the character completes.
            delta = new_text.rstrip(_REPLACEMENT_CHAR)[start:]
            self._read_chars += len(delta)
            return delta
        if len(new_text) <= len(self._prefix_text):
            return ""  # e.g. a skipped special token
        # Slide the window: what was unread becomes the new context.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        self._prefix_text = self._decode(self._tokens[self._prefix_offset :])
        self._read_chars = 0
        return new_text[start:]

    def _emit(self, delta: str, final: bool) -> tuple[str, bool]:
        # A stop string that ends in `delta` can only start inside `_pending`, because
        # `_pending` always holds the longest tail that could begin one; so this is O(delta).
        window = self._pending + delta
        cut = self._find_stop(window)
        if cut is not None:
            self._stopped = True
            end = cut
        elif final:
            end = len(window)
        else:
            end = len(window) - self._stop_prefix_len(window)
        self._pending = window[end:]
        out = window[:end]
        if out:
            self._chunks.append(out)
        return out, self._stopped

    def _find_stop(self, window: str) -> int | None:
        """Where to truncate `window` for the stop string that completes first, if any."""
        best: tuple[int, int] | None = None  # (end, start) of the earliest-completing match
        for s in self._stop:
            start = window.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        if best is None:
            return None
        end, start = best
        return end if self._include_stop else start

    def _stop_prefix_len(self, window: str) -> int:
        """Length of the longest tail of `window` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(window)), longest, -1):
                if window.endswith(s[:n]):
                    longest = n
                    break
        return longest
