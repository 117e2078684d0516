"""`LayerTimingView`: where an engine's time goes, per layer and per layer kind.

It reads the DataFrames that `kit.profiler.ProfiledEngine.profile()` returns (columns
`layer, kind, block, latency_ms, share_pct, bytes, flops, phase`) and never runs an
engine. Give it frames by label, e.g. ``{"eager": {"prefill": df1, "decode": df2},
"int4": {...}}``; toggles switch the phase and the engine, and a second engine can be
overlaid to compare before and after a change.
"""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import pandas as pd

from widgets.figure import figure_widget

__all__ = ["LayerTimingView"]


class LayerTimingView(widgets.VBox):
    """Per-layer latency bars (with an optional second engine) and per-kind shares."""

    def __init__(self, frames: dict[str, dict[str, pd.DataFrame]], *, max_layers: int = 60) -> None:
        if not frames:
            raise ValueError("LayerTimingView needs at least one engine's profile frames")
        self.frames = frames
        self.max_layers = max_layers
        engines = list(frames)
        phases = list(dict.fromkeys(p for f in frames.values() for p in f))
        self.phase = widgets.ToggleButtons(options=phases, value=phases[0], description="phase")
        self.engine = widgets.Dropdown(options=engines, value=engines[0], description="engine")
        self.compare = widgets.Dropdown(options=["(none)"] + engines, value="(none)", description="compare")
        self.metric = widgets.ToggleButtons(options=["latency_ms", "achieved_gbps"], value="latency_ms",
                                            description="metric")
        self.summary = widgets.HTML()
        self.fig, self.view, self._draw = figure_widget((11, 3.8))
        self.ax_layers, self.ax_kinds = self.fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
        for w in (self.phase, self.engine, self.compare, self.metric):
            w.observe(self._redraw, names="value")
        super().__init__([widgets.HBox([self.engine, self.compare]), widgets.HBox([self.phase, self.metric]),
                          self.summary, self.view])
        self._redraw()

    # ----------------------------------------------------------------- drawing
    def _frame(self, engine: str) -> pd.DataFrame | None:
        return self.frames.get(engine, {}).get(self.phase.value)

    def _redraw(self, *_: object) -> None:
        df = self._frame(self.engine.value)
        other = None if self.compare.value == "(none)" else self._frame(self.compare.value)
        metric = self.metric.value
        ax, axk = self.ax_layers, self.ax_kinds
        ax.clear()
        axk.clear()
        if df is None:
            self.summary.value = f"<i>no {self.phase.value} profile for {self.engine.value}</i>"
            self._show()
            return
        shown = df.head(self.max_layers)
        x = np.arange(len(shown))
        width = 0.8 if other is None else 0.4
        ax.bar(x - (0 if other is None else 0.2), shown[metric], width, label=self.engine.value, color="#4C72B0")
        if other is not None:
            o = other.set_index("layer").reindex(shown["layer"])
            ax.bar(x + 0.2, o[metric].to_numpy(), width, label=self.compare.value, color="#DD8452")
            ax.legend(fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels(shown["layer"], rotation=90, fontsize=6)
        ax.set_ylabel(metric)
        ax.set_title(f"{self.phase.value}: first {len(shown)} of {len(df)} layers", fontsize=9)
        kinds = df.groupby("kind")["latency_ms"].sum().sort_values()
        axk.barh(kinds.index, 100 * kinds / kinds.sum(), color="#55A868")
        axk.set_xlabel("share of time (%)")
        axk.tick_params(labelsize=8)
        total = df["latency_ms"].sum()
        line = f"<b>{self.engine.value}</b> {self.phase.value}: {total:.3f} ms summed over {len(df)} layers"
        if other is not None:
            line += f" &middot; <b>{self.compare.value}</b>: {other['latency_ms'].sum():.3f} ms " \
                    f"({total / other['latency_ms'].sum():.2f}x)"
        self.summary.value = line
        self._show()

    def _show(self) -> None:
        self.fig.tight_layout()
        self._draw()

    # for tests and notebooks: the bars' heights as drawn
    @property
    def bar_heights(self) -> list[float]:
        return [p.get_height() for p in self.ax_layers.patches]
