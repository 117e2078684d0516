"""Tests for kit/quantization/path_choice.py: the faster of equivalent fast paths, timed once per key."""

from __future__ import annotations

import pytest
import torch

from kit.quantization.path_choice import CHOOSER, PathChooser


class FakeTimer:
    """Returns each candidate's fixed 'ms' and counts the calls."""

    def __init__(self, ms: dict[str, float]) -> None:
        self.ms, self.calls = ms, []

    def __call__(self, fn) -> float:
        name = fn()
        self.calls.append(name)
        return self.ms[name]


def candidates() -> dict:
    return {"stream": lambda: "stream", "scaled_mm": lambda: "scaled_mm"}


def test_chooser_picks_the_faster_and_times_each_key_once():
    timer = FakeTimer({"stream": 2.0, "scaled_mm": 1.5})
    c = PathChooser(timer)
    assert c.choose(("FP8", 1, 4096, 4096), candidates(), default="stream") == "scaled_mm"
    assert c.choose(("FP8", 1, 4096, 4096), candidates(), default="stream") == "scaled_mm"
    assert timer.calls == ["stream", "scaled_mm"]  # the second call reads the remembered choice
    timer.ms = {"stream": 1.0, "scaled_mm": 1.5}
    assert c.choose(("FP8", 16, 4096, 4096), candidates(), default="scaled_mm") == "stream"  # another key
    assert c.table() == [{"key": ["FP8", 1, 4096, 4096], "choice": "scaled_mm", "stream_ms": 2.0, "scaled_mm_ms": 1.5},
                         {"key": ["FP8", 16, 4096, 4096], "choice": "stream", "stream_ms": 1.0, "scaled_mm_ms": 1.5}]
    assert "2 shapes" in c._repr_html_()
    c.clear()
    assert c.table() == []


def test_chooser_keeps_the_default_on_a_tie():
    c = PathChooser(FakeTimer({"stream": 1.0, "scaled_mm": 1.0}))
    assert c.choose("k", candidates(), default="scaled_mm") == "scaled_mm"


def test_chooser_times_nothing_off_cuda_and_returns_the_default():
    c = PathChooser()  # CUDA-event timer: the CPU cannot be timed with it
    calls = []
    got = c.choose("k", {"stream": lambda: calls.append(1), "scaled_mm": lambda: calls.append(2)}, default="stream",
                   device=torch.device("cpu"))
    assert got == "stream" and calls == [] and c.table() == []


def test_chooser_rejects_a_default_that_is_not_a_candidate():
    with pytest.raises(ValueError, match="default 'dequant' is not one of"):
        PathChooser(FakeTimer({})).choose("k", candidates(), default="dequant")


def test_the_process_chooser_starts_without_timer():
    assert isinstance(CHOOSER, PathChooser) and CHOOSER.timer is None
