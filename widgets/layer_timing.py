"""`LayerTimingView`: where an engine's time goes, per layer and per layer kind.

It reads the DataFrames that `kit.profiler.ProfiledEngine.profile()` returns (columns
`layer, kind, block, latency_ms, share_pct, bytes, flops, phase`, optionally
`achieved_gbps`) and never runs an engine. Give it frames by label, each either a dict of
phase -> frame or one frame with a `phase` column:

    LayerTimingView({"fp32 (cpu)": {"prefill": df1, "decode": df2},
                     **profiles_json_frames(json.loads(Path("bench/results/profiles_h100.json").read_text()))})

Controls: the engine (frame) shown, a second one to overlay ("compare": any other label,
e.g. the same model on an H100; layers are matched by name), the phase, the metric, and a
page slider over the layers (`max_layers` per page). Layers are horizontal bars so that
their names read without tilting the head; the right panel gives each kind's share of time.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import ipywidgets as widgets
import numpy as np
import pandas as pd

from widgets.figure import StaticFigure, figure_widget

__all__ = ["LayerTimingView", "profiles_json_frames", "NONE"]

NONE = "(none)"
_METRICS = ("latency_ms", "achieved_gbps")
_REQUIRED = ("layer", "kind", "latency_ms")


def profiles_json_frames(data: Mapping[str, Any], *, suffix: str | None = None) -> dict[str, dict[str, pd.DataFrame]]:
    """Frames by label from a `kit bench` profiles file (e.g. bench/results/profiles_h100.json).

    The file holds `device` and a list `profiles`, each with `model, phase, batch_size, seq_len`
    and `layers` (the rows of `ProfiledEngine.profile()`). One label per (model, batch size):
    "smollm2-135m, bs 1 (H100)", its phases as keys.
    """
    if "profiles" not in data:
        raise ValueError(f"profiles_json_frames needs a dict with a 'profiles' list; got keys {sorted(data)}")
    device = str(data.get("device", ""))
    tag = suffix if suffix is not None else next((w for w in device.split() if w[:1] in "AHBL" and w[1:2].isdigit()),
                                                 device)
    out: dict[str, dict[str, pd.DataFrame]] = {}
    for p in data["profiles"]:
        label = f"{p['model']}, bs {p['batch_size']}" + (f" ({tag})" if tag else "")
        out.setdefault(label, {})[str(p["phase"])] = pd.DataFrame(p["layers"])
    return out


def _by_phase(label: str, value: pd.DataFrame | Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    if isinstance(value, pd.DataFrame):
        if "phase" in value.columns and value["phase"].notna().any():
            value = {str(p): f.reset_index(drop=True) for p, f in value.groupby("phase", sort=False)}
        else:
            value = {"profile": value}
    if not isinstance(value, Mapping) or not value:
        raise TypeError(f"LayerTimingView frames[{label!r}] must be a DataFrame or a non-empty dict of phase -> "
                        f"DataFrame; got {type(value).__name__}")
    for phase, df in value.items():
        missing = [c for c in _REQUIRED if c not in getattr(df, "columns", ())]
        if missing:
            raise ValueError(f"LayerTimingView frames[{label!r}][{phase!r}] misses columns {missing}; "
                             f"ProfiledEngine.profile() frames have {list(_REQUIRED)}")
    return dict(value)


class LayerTimingView(StaticFigure, widgets.VBox):
    """Per-layer bars (one page of layers, with an optional second engine) and per-kind shares.

    Attributes for code and tests: `engine`, `compare`, `phase`, `metric`, `page` (controls),
    `summary` (HTML line), `figure`, `ax_layers`, `ax_kinds`, `bar_heights` (values drawn).
    """

    def __init__(self, frames: Mapping[str, pd.DataFrame | Mapping[str, pd.DataFrame]], *,
                 max_layers: int = 30) -> None:
        if not frames:
            raise ValueError("LayerTimingView needs at least one engine's profile frames")
        if max_layers < 1:
            raise ValueError(f"LayerTimingView.max_layers must be >= 1, got {max_layers}")
        self.frames = {str(k): _by_phase(str(k), v) for k, v in frames.items()}
        self.max_layers = int(max_layers)
        self._busy = False
        engines = list(self.frames)
        phases = list(dict.fromkeys(p for f in self.frames.values() for p in f))
        columns = {c for f in self.frames.values() for df in f.values() for c in df.columns}
        self.phase = widgets.ToggleButtons(options=phases, value=phases[0], description="phase")
        self.engine = widgets.Dropdown(options=engines, value=engines[0], description="engine",
                                       layout=widgets.Layout(width="360px"))
        self.compare = widgets.Dropdown(options=self._compare_options(engines[0]), value=NONE, description="compare",
                                        layout=widgets.Layout(width="360px"))
        self.metric = widgets.ToggleButtons(options=[m for m in _METRICS if m in columns], value="latency_ms",
                                            description="metric")
        self.page = widgets.IntSlider(value=0, min=0, max=0, description="layers", readout=False,
                                      layout=widgets.Layout(width="360px"))
        self.page_label = widgets.HTML()
        self.summary = widgets.HTML()
        self.fig, self.view, self._draw = figure_widget((10.0, 1.3 + 0.19 * self.max_layers))
        self.figure = self.fig
        self.ax_layers, self.ax_kinds = self.fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
        self.engine.observe(self._on_engine, names="value")
        for w in (self.phase, self.compare, self.metric, self.page):
            w.observe(self._redraw, names="value")
        super().__init__([widgets.HBox([self.engine, self.compare]), widgets.HBox([self.phase, self.metric]),
                          widgets.HBox([self.page, self.page_label]), self.summary, self.view])
        self._redraw()

    # ----------------------------------------------------------------- state
    def _compare_options(self, engine: str) -> list[str]:
        return [NONE] + [e for e in self.frames if e != engine]

    def _frame(self, engine: str) -> pd.DataFrame | None:
        return self.frames.get(engine, {}).get(self.phase.value)

    @property
    def num_pages(self) -> int:
        df = self._frame(self.engine.value)
        return max(1, math.ceil(len(df) / self.max_layers)) if df is not None else 1

    def _on_engine(self, change: dict[str, Any]) -> None:
        keep = self.compare.value if self.compare.value != change["new"] else NONE
        self._busy = True  # one redraw below, not one per control that changes on the way
        try:
            self.compare.options = self._compare_options(change["new"])
            self.compare.value = keep
            self.page.value = 0
        finally:
            self._busy = False
        self._redraw()

    # ----------------------------------------------------------------- drawing
    def _redraw(self, *_: object) -> None:
        if self._busy:
            return
        df = self._frame(self.engine.value)
        other = None if self.compare.value in (NONE, None) else self._frame(self.compare.value)
        metric = self.metric.value
        ax, axk = self.ax_layers, self.ax_kinds
        ax.clear()
        axk.clear()
        if df is None:
            self.summary.value = f"<i>no {self.phase.value} profile for {self.engine.value}</i>"
            self.page_label.value = ""
            self._show()
            return
        if self.page.max != self.num_pages - 1:
            self._busy = True
            self.page.max = self.num_pages - 1  # may clamp page.value
            self._busy = False
        start = self.page.value * self.max_layers
        shown = df.iloc[start:start + self.max_layers]
        y = np.arange(len(shown))  # (layers on this page,) first layer on top
        height = 0.8 if other is None else 0.4
        values = shown[metric].to_numpy(dtype=float) if metric in shown else np.full(len(shown), np.nan)
        ax.barh(y - (0 if other is None else 0.2), values, height, label=self.engine.value, color="#4C72B0")
        if other is not None:
            o = other.drop_duplicates("layer").set_index("layer").reindex(shown["layer"])
            ov = o[metric].to_numpy(dtype=float) if metric in o else np.full(len(shown), np.nan)
            ax.barh(y + 0.2, np.nan_to_num(ov), height, label=self.compare.value, color="#DD8452")
            ax.legend(fontsize=8, loc="best", framealpha=0.9)
        ax.set_yticks(y, shown["layer"], fontsize=8)
        ax.set_ylim(len(shown) - 0.5, -0.5)
        ax.set_xlabel(metric)
        ax.grid(axis="x", alpha=0.3)
        last = start + len(shown) - 1
        ax.set_title(f"{self.engine.value}, {self.phase.value}: layers {start}-{last} of {len(df)}", fontsize=9)
        self.page_label.value = f"page {self.page.value + 1} of {self.num_pages}: layers {start}&ndash;{last}"
        kinds = df.groupby("kind")["latency_ms"].sum().sort_values()
        axk.barh(kinds.index, 100 * kinds / kinds.sum(), color="#55A868")
        axk.set_xlabel("share of time (%)")
        axk.set_title("per kind", fontsize=9)
        axk.tick_params(labelsize=8)
        self.summary.value = self._describe(df, other)
        self._show()

    def _describe(self, df: pd.DataFrame, other: pd.DataFrame | None) -> str:
        total = df["latency_ms"].sum()
        line = f"<b>{self.engine.value}</b> {self.phase.value}: {total:.3f} ms summed over {len(df)} layers"
        if other is not None:
            o_total = other["latency_ms"].sum()
            common = len(set(df["layer"]) & set(other["layer"]))
            line += (f" &middot; <b>{self.compare.value}</b>: {o_total:.3f} ms over {len(other)} layers "
                     f"({total / o_total:.2f}x; {common} layer names in common)")
        elif self.compare.value not in (NONE, None):
            line += f" &middot; <i>no {self.phase.value} profile for {self.compare.value}</i>"
        return line

    def _show(self) -> None:
        self.fig.tight_layout()
        self._draw()

    # for tests and notebooks: the bars' lengths as drawn, this engine's first, then compare's
    @property
    def bar_heights(self) -> list[float]:
        return [p.get_width() for p in self.ax_layers.patches]
