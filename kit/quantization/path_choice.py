"""Pick the faster of a quantized linear's equivalent fast paths by timing both, once per shape.

Which kernel wins at a few tokens depends on the GPU and the shape: on an H200 the FP8
`torch._scaled_mm` (cuBLASLt, plus a fused activation-quantization kernel) and the
weight-streaming Triton kernel (activations quantized as it loads them) trade places
with M, N and K. Both compute the same product (fp8 codes times fp8 codes, scales after
the float32 accumulation), so the choice changes the time, not the numbers. A
`PathChooser` times each candidate the first time a key (scheme, M, N, K, dtype) is
seen, on its eager call before CUDA-graph capture, and remembers the winner:

    name = CHOOSER.choose(key, {"stream": f, "scaled_mm": g}, default="stream", device=x.device)

Times are medians of a few calls with L2 flushed before each (a 2 x 60 MB write), as a
decode step sees its weights: from HBM. Off CUDA, and while a CUDA graph is being
captured, nothing is timed: an unseen key gets `default`. `CHOOSER.table()` lists the
choices and times (the benchmark writes it to its JSON).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import torch

__all__ = ["PathChooser", "CHOOSER", "cuda_time_ms"]

_FLUSH_BYTES = 120 * 2**20  # twice an H100 / H200 L2 (50 / 60 MB)
_flush: dict[torch.device, torch.Tensor] = {}


def cuda_time_ms(fn: Callable[[], Any], reps: int = 10) -> float:
    """Median ms of `fn` on the current CUDA stream, L2 flushed before each call (one warm-up call first)."""
    fn()
    dev = torch.device("cuda", torch.cuda.current_device())
    buf = _flush.get(dev)
    if buf is None:
        buf = _flush[dev] = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=dev)
    times = []
    for _ in range(reps):
        buf.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


class PathChooser:
    """Remembers, per key, which named candidate was fastest (`timer(fn) -> ms`, CUDA events by default)."""

    def __init__(self, timer: Callable[[Callable[[], Any]], float] | None = None) -> None:
        self.timer = timer
        self.choices: dict[Hashable, str] = {}
        self.times: dict[Hashable, dict[str, float]] = {}

    def _can_time(self, device: torch.device | None) -> bool:
        if self.timer is not None:
            return True
        if device is None or device.type != "cuda":
            return False
        return not torch.cuda.is_current_stream_capturing()

    def choose(self, key: Hashable, candidates: dict[str, Callable[[], Any]], default: str,
               device: torch.device | None = None) -> str:
        """The remembered winner for `key`; times every candidate the first time (where it can)."""
        if default not in candidates:
            raise ValueError(f"PathChooser.choose: default {default!r} is not one of {sorted(candidates)}")
        found = self.choices.get(key)
        if found is not None:
            return found
        if not self._can_time(device):
            return default
        timer = self.timer or cuda_time_ms
        times = {name: float(timer(fn)) for name, fn in candidates.items()}
        best = min(times, key=lambda n: (times[n], n != default))  # a tie keeps the default
        self.choices[key], self.times[key] = best, times
        return best

    def clear(self) -> None:
        self.choices.clear()
        self.times.clear()

    def table(self) -> list[dict[str, Any]]:
        """One row per key: the key's fields, the choice and each candidate's ms."""
        return [{"key": list(k) if isinstance(k, tuple) else k, "choice": self.choices[k],
                 **{f"{n}_ms": t for n, t in self.times[k].items()}} for k in self.choices]

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{r['key']}</td><td>{r['choice']}</td></tr>" for r in self.table())
        return f"<b>PathChooser</b>: {len(self.choices)} shapes<table>{rows}</table>"


CHOOSER = PathChooser()  # the process's choices, shared by every quantized linear
