"""The decode rate the live gate converts seconds with (controller/decode_rate.py)."""

from __future__ import annotations

import pytest

from edgeheads.controller.decode_rate import DECODE_RATE_STALE_SECONDS, DecodeRate


def test_unknown_until_a_whole_window_has_passed():
    rate = DecodeRate()
    assert rate.rate(0.0) == 0.0
    for i in range(4):  # 4 tokens in 0.75 s: shorter than a window
        rate.note(1, 0.25 * i)
    assert rate.rate(0.75) == 0.0
    rate.note(1, 1.0)  # 5 tokens over the first full second
    assert rate.rate(1.0) == pytest.approx(5.0)


def test_each_new_window_moves_the_rate_halfway():
    rate = DecodeRate()
    rate.note(0, 0.0)
    rate.note(10, 1.0)  # 10 tokens/s
    rate.note(20, 2.0)  # 20 tokens/s: halfway between
    assert rate.rate(2.0) == pytest.approx(15.0)


def test_a_pause_forgets_the_old_rate():
    rate = DecodeRate()
    rate.note(0, 0.0)
    rate.note(10, 1.0)
    assert rate.rate(1.0 + DECODE_RATE_STALE_SECONDS) == pytest.approx(10.0)
    assert rate.rate(1.1 + DECODE_RATE_STALE_SECONDS) == 0.0  # nothing decoded for too long
    start = 100.0  # the next generation: its own first window, not the old rate blended in
    rate.note(0, start)
    assert rate.rate(start) == 0.0
    rate.note(2, start + 1.0)
    assert rate.rate(start + 1.0) == pytest.approx(2.0)
