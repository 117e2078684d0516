"""The kernels of a whole step as it runs on a CUDA device, CUDA-graph replays included.

Per-layer hooks (`kit.profiler.ProfiledEngine`) time an eager step layer by layer; a CUDA graph
replays the whole step as one launch, so they cannot see inside it. `step_kernels(step)` runs
`step()` under the PyTorch profiler and returns the kernels the GPU ran, per step, with the GPU's
idle time. `kit.profiler` re-exports it; `kit bench` and `bench/step_kernels.py` use it.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["step_kernels"]


def step_kernels(step: Any, iters: int = 10, device: torch.device | str | None = None) -> pd.DataFrame:
    """The kernels `step()` runs on a CUDA device, per step, traced over `iters` calls (after 2 untraced).

    Works on whatever `step` launches, CUDA-graph replays included (the profiler records the kernels a
    graph runs), so it shows a graphed decode step as it really runs, which per-layer hooks cannot.
    Columns: `name, calls` (per step), `time_us` (per step), `share_pct` (of the summed kernel time).
    `attrs`: `steps`, `kernels_per_step`, `kernel_ms` (summed kernel time per step), `step_ms` (the
    same `iters` steps timed without the profiler, back to back), `idle_ms` (step_ms - kernel_ms: the
    GPU waiting for the host, and the ~1 us gap between one kernel and the next, which a CUDA graph
    keeps too: a step of 340 kernels idles ~0.4 ms that way; kernels on one stream do not overlap).
    """
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        raise ValueError(f"step_kernels traces CUDA kernels; {device} has none")
    if device.index is None:  # "cuda": the current device (the profiler's events carry an index)
        device = torch.device("cuda", torch.cuda.current_device())
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(2):
        step()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize(device)
    step_ms = 1e3 * (time.perf_counter() - t0) / iters
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize(device)
    calls: dict[str, int] = {}
    us: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name != "CUDA" or e.device_index != device.index:
            continue
        if e.name.startswith(("Memcpy", "Memset")) and e.device_time_total == 0:
            continue
        calls[e.name] = calls.get(e.name, 0) + 1
        us[e.name] = us.get(e.name, 0.0) + e.device_time_total
    df = pd.DataFrame([{"name": n, "calls": calls[n] / iters, "time_us": us[n] / iters} for n in calls],
                      columns=["name", "calls", "time_us"]).sort_values("time_us", ascending=False, ignore_index=True)
    total = float(df["time_us"].sum())
    df["share_pct"] = 100.0 * df["time_us"] / total if total > 0 else 0.0
    df.attrs.update(steps=iters, kernels_per_step=float(df["calls"].sum()), kernel_ms=total / 1e3, step_ms=step_ms,
                    idle_ms=max(0.0, step_ms - total / 1e3))
    return df
