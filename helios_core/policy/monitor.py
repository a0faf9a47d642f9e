"""The confidence-breach monitor: a sliding window over the active model's most recent tokens.

A breach is a forced exit below the confidence threshold (the engine marks it per token). More than
`limit` breaches among the last `window` tokens triggers adaptation. After it fires (and after any
change of model or depth) it is reset and stays quiet for `cooldown` tokens, so one burst of hard
tokens produces one adaptation, not one per token, and a change gets a full window to show whether
it worked.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable


class BreachMonitor:
    def __init__(self, window: int = 100, limit: int = 50, cooldown: int | None = None):
        if window < 1 or not 0 <= limit < window:
            raise ValueError(f"need window >= 1 and 0 <= limit < window, got window={window}, limit={limit}")
        self.window, self.limit = window, limit
        self.cooldown = window if cooldown is None else cooldown
        self._recent: deque[bool] = deque(maxlen=window)
        self._breaches = 0
        self._quiet = 0  # tokens left before the monitor may fire again

    @property
    def breaches(self) -> int:
        """Breaches among the last `window` tokens."""
        return self._breaches

    @property
    def breach_rate(self) -> float:
        return self._breaches / len(self._recent) if self._recent else 0.0

    def add(self, breaches: Iterable[bool]) -> bool:
        """Feed tokens in order; True when the window holds more than `limit` breaches (then resets)."""
        fired = False
        for breach in breaches:
            if len(self._recent) == self.window:
                self._breaches -= self._recent[0]
            self._recent.append(breach)
            self._breaches += breach
            if self._quiet:
                self._quiet -= 1
            elif self._breaches > self.limit:
                fired = True
                self.reset()
        return fired

    def reset(self) -> None:
        """Forget the window and wait `cooldown` tokens (after an adaptation)."""
        self._recent.clear()
        self._breaches = 0
        self._quiet = self.cooldown
