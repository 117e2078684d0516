"""`LoopLanes`: the executor's host (CPU) and device (GPU) lanes over a few iterations, with and without overlap.

It reads the timing columns kit documents in kit/iteration_stats.py (`Executor.stats()`):
host phases `cpu_schedule_s -> cpu_prepare_s -> cpu_launch_s -> cpu_launch_end_s` and
`cpu_output_s -> cpu_output_end_s`, device phases `gpu_forward_s -> gpu_sampling_s -> gpu_end_s`
(seconds on one clock). It never runs an engine. One plot per frame, two lanes each:

    CPU   schedule | prepare inputs | launch (forward + sampler enqueued) | output processing
    GPU                               forward | sampling

Synchronously, the output processing of step N sits between its sampling and step N + 1's
forward, so the GPU lane has a hole per step; overlapped, it runs while step N + 1 computes.
A slider picks the first iteration shown; `device_busy()` gives the GPU lane's busy share.

    lanes = LoopLanes({"overlap off": sync.stats(), "overlap on": over.stats()}, num_iterations=6)
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import pandas as pd

from widgets.figure import StaticFigure, figure_widget

__all__ = ["LoopLanes", "PHASES", "LANE_COLUMNS"]

# phase -> (lane, start column, end column, colour)
PHASES = {
    "schedule": ("CPU", "cpu_schedule_s", "cpu_prepare_s", "#f59e0b"),
    "prepare": ("CPU", "cpu_prepare_s", "cpu_launch_s", "#fcd34d"),
    "launch": ("CPU", "cpu_launch_s", "cpu_launch_end_s", "#a3a3a3"),
    "output": ("CPU", "cpu_output_s", "cpu_output_end_s", "#10b981"),
    "forward": ("GPU", "gpu_forward_s", "gpu_sampling_s", "#3b82f6"),
    "sampling": ("GPU", "gpu_sampling_s", "gpu_end_s", "#8b5cf6"),
}
LANE_COLUMNS = ("iteration",) + tuple(dict.fromkeys(c for _, a, b, _ in PHASES.values() for c in (a, b)))
_Y = {"CPU": 1.0, "GPU": 0.0}


class LoopLanes(StaticFigure, widgets.VBox):
    """CPU and GPU lanes of `num_iterations` iterations per frame (see the module docstring).

    Parameters: `stats` (one `Executor.stats()` frame, or {label: frame}), `num_iterations`, `title`.
    Attributes: `frames` ({label: frame}), `axes` ({label: Axes}), `bars` ({(label, phase):
    BrokenBarHCollection}), `slider` (first iteration shown, as a position), `summary` (HTML), `figure`.
    """

    def __init__(self, stats: pd.DataFrame | dict[str, pd.DataFrame], *, num_iterations: int = 6,
                 title: str | None = None) -> None:
        frames = {"": stats} if isinstance(stats, pd.DataFrame) else dict(stats)
        if not frames:
            raise ValueError("LoopLanes needs at least one Executor.stats() frame, got none")
        if not isinstance(num_iterations, int) or num_iterations < 1:
            raise ValueError(f"num_iterations must be an int >= 1, got {num_iterations!r}")
        for label, df in frames.items():
            missing = [c for c in LANE_COLUMNS if c not in df.columns]
            if df.empty or missing:
                raise ValueError(f"LoopLanes needs non-empty Executor.stats() frames with the timing columns; frame "
                                 f"{label!r} has {len(df)} rows" + (f", missing {missing}" if missing else ""))
        self.frames = {k: v.sort_values("iteration").reset_index(drop=True) for k, v in frames.items()}
        self.num_iterations = num_iterations
        height = 1.45 * len(frames) + 1.0
        fig, view, self._redraw = figure_widget((9.0, height))
        self.figure = fig
        axes = fig.subplots(len(frames), 1, squeeze=False)[:, 0]
        fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.45 / height, bottom=0.8 / height, hspace=0.9)
        self.axes = dict(zip(self.frames, axes))
        self.bars: dict[tuple[str, str], Any] = {}
        for label, ax in self.axes.items():
            for phase, (lane, _, _, color) in PHASES.items():
                self.bars[(label, phase)] = ax.broken_barh([], (_Y[lane] - 0.35, 0.7), facecolors=color,
                                                           edgecolors="white", linewidth=0.5, label=phase)
            ax.set_yticks([0, 1], ["GPU", "CPU"], fontsize=8)
            ax.set_ylim(-0.6, 1.6)
            ax.set_xlabel("ms since the first iteration shown", fontsize=8)
        handles = [self.bars[(next(iter(self.frames)), phase)] for phase in PHASES]
        fig.legend(handles, list(PHASES), loc="lower center", ncol=len(PHASES), fontsize=7, frameon=False)
        if title:
            fig.suptitle(title, fontsize=9, y=1 - 0.08 / height)
        longest = max(len(df) for df in self.frames.values())
        self.slider = widgets.IntSlider(value=0, min=0, max=max(0, longest - num_iterations),
                                        description="first", continuous_update=False)
        self.summary = widgets.HTML()
        self.slider.observe(self._on_slide, names="value")
        self._show(0)
        super().__init__([view, self.slider, self.summary])

    def window(self, label: str, first: int | None = None) -> pd.DataFrame:
        """The rows shown for `label`, from position `first` (default: the slider's)."""
        first = self.slider.value if first is None else first
        df = self.frames[label]
        return df.iloc[min(first, max(0, len(df) - self.num_iterations)):][: self.num_iterations]

    def device_busy(self, label: str, first: int | None = None) -> float:
        """Share of the shown span (first schedule -> last device end) in which the GPU lane is busy."""
        w = self.window(label, first)
        span = w["gpu_end_s"].max() - w["cpu_schedule_s"].min()
        busy = (w["gpu_end_s"] - w["gpu_forward_s"]).sum()
        return float(busy / span) if span > 0 else 0.0

    def _on_slide(self, change: dict[str, Any]) -> None:
        self._show(change["new"])
        self._redraw()

    def _show(self, first: int) -> None:
        lines = []
        for label, ax in self.axes.items():
            w = self.window(label, first)
            t0 = w["cpu_schedule_s"].min()
            for phase, (_, a, b, _) in PHASES.items():
                spans = [(1e3 * (s - t0), 1e3 * (e - s)) for s, e in zip(w[a], w[b])]
                self.bars[(label, phase)].set_verts([[(x, y0), (x, y0 + 0.7), (x + d, y0 + 0.7), (x + d, y0)]
                                                     for x, d in spans
                                                     for y0 in [_Y[PHASES[phase][0]] - 0.35]])
            end = 1e3 * (w[["cpu_output_end_s", "gpu_end_s"]].max().max() - t0)
            ax.set_xlim(0, end * 1.02 if end > 0 else 1.0)
            busy = self.device_busy(label, first)
            per_it = 1e3 * (w["gpu_end_s"].iloc[-1] - w["gpu_end_s"].iloc[0]) / max(1, len(w) - 1)
            name = label or "executor"
            ax.set_title(f"{name}: iterations {int(w['iteration'].iloc[0])}-{int(w['iteration'].iloc[-1])}, "
                         f"GPU busy {100 * busy:.0f}%", fontsize=9)
            lines.append(f"<b>{name}</b>: {per_it:.2f} ms per iteration, GPU busy {100 * busy:.0f}% of the span")
        self.summary.value = "<br>".join(lines)
