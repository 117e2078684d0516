"""Where the time of an executor iteration goes: the columns of `Executor.stats()` and the clocks behind them.

One row per iteration. The first columns say what ran (`STATS_COLUMNS[:12]`, unchanged
since the first executor); the rest say where the time went:

    overlap          this step ran overlapped (its tokens were read one step late)
    schedule_ms      host: `scheduler.schedule()`
    prepare_ms       host: building the ForwardBatch (and gathering decode ids from the device)
    forward_ms       device: the forward pass (CUDA events on a GPU, the wall clock on the CPU)
    sampling_ms      device: the sampler's batch pass
    output_ms        host: tokens -> stop checks, detokenization, publishing (the step's post-processing),
                     with the wait for the step's tokens
    token_wait_ms    host: of output_ms, the wait for the step's sampled tokens (the device still running it)
    device_idle_ms   device: idle between the end of the previous step's sampling and this forward

and, for drawing lanes (`widgets.loop_lanes.LoopLanes`), when each phase started or ended, in
seconds since the executor started (the `time_s` clock): host `cpu_schedule_s`, `cpu_prepare_s`,
`cpu_launch_s` (forward + sampling enqueued from here...), `cpu_launch_end_s` (...to here),
`cpu_output_s`, `cpu_output_end_s`; device `gpu_forward_s`, `gpu_sampling_s`, `gpu_end_s`.
On CUDA the device times come from events laid on the host clock through one anchor event
recorded when the executor started (the two clocks agree to a few microseconds over a run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["STATS_COLUMNS", "TIMING_COLUMNS", "DeviceClock", "StepTimes", "loop_split"]

TIMING_COLUMNS = ("overlap", "schedule_ms", "prepare_ms", "forward_ms", "sampling_ms", "output_ms", "token_wait_ms",
                  "device_idle_ms", "cpu_schedule_s", "cpu_prepare_s", "cpu_launch_s", "cpu_launch_end_s", "cpu_output_s",
                  "cpu_output_end_s", "gpu_forward_s", "gpu_sampling_s", "gpu_end_s")
STATS_COLUMNS = ("iteration", "time_s", "duration_ms", "request_ids", "num_prefill_tokens", "num_decode_tokens",
                 "batch_size", "kv_blocks_used", "kv_blocks_total", "num_preemptions", "preempted_request_ids",
                 "num_waiting", "num_draft_tokens", "num_accepted_draft_tokens") + TIMING_COLUMNS


class DeviceClock:
    """Marks in the device's stream, read back as seconds on the executor's clock.

    CUDA: a mark is an event recorded on the current stream (`seconds` needs it completed);
    CPU: the device is the calling thread, so a mark is the wall clock.
    """

    def __init__(self, device: torch.device, t0: float) -> None:
        self.t0 = t0
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            self._anchor = torch.cuda.Event(enable_timing=True)
            self._anchor.record()
            self._anchor.synchronize()
            self._anchor_s = time.monotonic() - t0

    def mark(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.monotonic() - self.t0

    def seconds(self, mark: Any) -> float:
        if not self.cuda:
            return mark
        mark.synchronize()  # a no-op once the step's tokens are on the host (recorded before their copy)
        return self._anchor_s + self._anchor.elapsed_time(mark) / 1e3


@dataclass
class StepTimes:
    """Host times (seconds on the executor clock) and device marks of one step."""

    schedule: float
    prepare: float = 0.0
    launch: float = 0.0
    launch_end: float = 0.0
    output: float = 0.0
    tokens: float | None = None  # when the step's tokens were on the host (None: no wait, `output`)
    output_end: float = 0.0
    forward_mark: Any = None  # device marks: forward start, sampling start, sampling end
    sampling_mark: Any = None
    end_mark: Any = None

    def row(self, clock: DeviceClock, previous_end_s: float | None, overlap: bool) -> dict[str, Any]:
        """The timing columns (TIMING_COLUMNS) of this step; device marks must be completed."""
        fwd, smp, end = (clock.seconds(m) for m in (self.forward_mark, self.sampling_mark, self.end_mark))
        return {"overlap": overlap, "schedule_ms": 1e3 * (self.prepare - self.schedule),
                "prepare_ms": 1e3 * (self.launch - self.prepare), "forward_ms": 1e3 * (smp - fwd),
                "sampling_ms": 1e3 * (end - smp), "output_ms": 1e3 * (self.output_end - self.output),
                "token_wait_ms": 1e3 * ((self.tokens if self.tokens is not None else self.output) - self.output),
                "device_idle_ms": 1e3 * max(0.0, fwd - previous_end_s) if previous_end_s is not None else 0.0,
                "cpu_schedule_s": self.schedule, "cpu_prepare_s": self.prepare, "cpu_launch_s": self.launch,
                "cpu_launch_end_s": self.launch_end, "cpu_output_s": self.output,
                "cpu_output_end_s": self.output_end, "gpu_forward_s": fwd, "gpu_sampling_s": smp, "gpu_end_s": end}


def loop_split(stats: Any) -> dict[str, dict[str, float]]:
    """Median milliseconds per iteration, host lanes against the device, for decode steps and for steps that
    carry prompt tokens ('prompt': a chunk beside decode tokens, or a prompt alone), from `Executor.stats()`.

    Host: `schedule_ms`, `prepare_ms`, `launch_ms` (the forward and the sampler enqueued) and `output_ms`
    (that step's post-processing, less `token_wait_ms`, the wait for its tokens), and `host_ms`, their sum
    per step: the host's own work; device: `device_ms` (forward + sampling) and `device_idle_ms`. A kind of
    step whose `host_ms` is above its `device_ms` is host-bound: even with overlap the device waits for
    the difference.
    """
    out: dict[str, dict[str, float]] = {}
    if not len(stats):
        return out
    launch = 1e3 * (stats["cpu_launch_end_s"] - stats["cpu_launch_s"])
    for kind, mask in (("decode", stats["num_prefill_tokens"] == 0), ("prompt", stats["num_prefill_tokens"] > 0)):
        rows = stats[mask]
        if not len(rows):
            continue
        lanes = {"schedule_ms": rows["schedule_ms"], "prepare_ms": rows["prepare_ms"], "launch_ms": launch[mask],
                 "output_ms": rows["output_ms"] - rows["token_wait_ms"]}
        out[kind] = {"steps": int(len(rows)), **{k: float(v.median()) for k, v in lanes.items()},
                     "host_ms": float(sum(lanes.values()).median()),
                     "device_ms": float((rows["forward_ms"] + rows["sampling_ms"]).median()),
                     "device_idle_ms": float(rows["device_idle_ms"].median()),
                     "token_wait_ms": float(rows["token_wait_ms"].median())}
    return out
