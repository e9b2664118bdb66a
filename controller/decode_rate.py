"""How fast the head node decodes, from its progress reports (pure; the controller's clock is passed in).

The re-plan gate turns seconds into tokens with it: how many tokens a condition lasts, how many
a migration's pre-copy overlaps. Reports come every few steps, so single reports say little;
tokens are counted over windows of at least DECODE_RATE_WINDOW_SECONDS and each window's rate
goes into an EWMA. After DECODE_RATE_STALE_SECONDS without progress (no generation running)
the rate is unknown (0) again, and the next generation starts from its own first window.
"""

from __future__ import annotations

from edgeheads.controller.replan_gate import ewma

DECODE_RATE_WINDOW_SECONDS = 1.0  # progress is turned into a decode rate over windows this long
DECODE_RATE_STALE_SECONDS = 10.0  # with no progress for this long the decode rate is unknown again
DECODE_RATE_WEIGHT = 0.5  # of each new window in the EWMA


class DecodeRate:
    def __init__(self) -> None:
        self.tokens_per_second = 0.0
        self._window: tuple[float, int] | None = None  # (window start, tokens in it)
        self._last = 0.0  # when progress was last reported

    def note(self, tokens: int, now: float) -> None:
        """``tokens`` decoded, reported at ``now`` (seconds, monotonic)."""
        if self._window is None or now - self._last > DECODE_RATE_STALE_SECONDS:
            self._window, self.tokens_per_second = (now, 0), 0.0
        start, count = self._window
        count += tokens
        self._last = now
        if now - start >= DECODE_RATE_WINDOW_SECONDS:
            rate = count / (now - start)
            self.tokens_per_second = ewma(self.tokens_per_second or None, rate, DECODE_RATE_WEIGHT)
            self._window = (now, 0)
        else:
            self._window = (start, count)

    def rate(self, now: float) -> float:
        """Tokens/s lately; 0 when nothing was decoded for DECODE_RATE_STALE_SECONDS."""
        return self.tokens_per_second if now - self._last <= DECODE_RATE_STALE_SECONDS else 0.0
