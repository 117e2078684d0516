"""`QuantComparison`: what each quantization scheme costs and what it buys.

It reads `kit.evaluation.compare()` (columns `scheme, perplexity, ppl_delta_pct, kl_div,
top1_agreement, linear_weight_mib, ...`), optionally a speed frame (`scheme,
tokens_per_s`, e.g. from `bench/results/quant_decode_h100.json`) and per-scheme layer
errors (`kit.evaluation.layer_errors()` frames: `layer, kind, block, rel_mse`). It never
runs an engine.

Left: accuracy (perplexity delta or KL, switchable) against memory or speed, one point
per scheme. Right: the selected scheme's per-layer output error along the network.
"""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import pandas as pd

from widgets.figure import figure_widget

__all__ = ["QuantComparison"]


class QuantComparison(widgets.VBox):
    def __init__(self, results: pd.DataFrame, *, speed: pd.DataFrame | None = None,
                 layer_errors: dict[str, pd.DataFrame] | None = None) -> None:
        if results.empty:
            raise ValueError("QuantComparison needs at least one scheme's results")
        self.results = results.reset_index(drop=True)
        self.speed = speed
        self.layer_errors = layer_errors or {}
        accuracy = ["ppl_delta_pct", "kl_div", "top1_agreement"]
        cost = ["linear_weight_mib"] + (["tokens_per_s"] if speed is not None else [])
        self.y = widgets.Dropdown(options=accuracy, value="ppl_delta_pct", description="accuracy")
        self.x = widgets.Dropdown(options=cost, value="linear_weight_mib", description="against")
        schemes = [s for s in self.results["scheme"] if s in self.layer_errors] or ["(none)"]
        self.scheme = widgets.Dropdown(options=schemes, value=schemes[0], description="layers of")
        self.table = widgets.HTML(self.results.round(4).to_html(index=False, border=0))
        self.fig, self.view, self._draw = figure_widget((11, 3.8))
        self.ax, self.ax_layers = self.fig.subplots(1, 2)
        for w in (self.x, self.y, self.scheme):
            w.observe(self._redraw, names="value")
        super().__init__([widgets.HBox([self.y, self.x, self.scheme]), self.view, self.table])
        self._redraw()

    def _frame(self) -> pd.DataFrame:
        df = self.results
        if self.speed is not None:
            df = df.merge(self.speed[["scheme", "tokens_per_s"]], on="scheme", how="left")
        return df

    def _redraw(self, *_: object) -> None:
        df = self._frame()
        ax, axl = self.ax, self.ax_layers
        ax.clear()
        axl.clear()
        xs, ys = df[self.x.value].to_numpy(dtype=float), df[self.y.value].to_numpy(dtype=float)
        self.points = ax.scatter(xs, ys, s=60, c=np.arange(len(df)), cmap="tab10")
        for name, x, y in zip(df["scheme"], xs, ys):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(self.x.value)
        ax.set_ylabel(self.y.value)
        ax.grid(alpha=0.3)
        errs = self.layer_errors.get(self.scheme.value)
        if errs is not None:
            for kind, g in errs.groupby("kind"):
                axl.semilogy(g.index, g["rel_mse"].clip(lower=1e-12), ".", label=kind, markersize=4)
            axl.set_xlabel("layer (network order)")
            axl.set_ylabel("relative MSE vs reference")
            axl.set_title(self.scheme.value, fontsize=9)
            axl.legend(fontsize=7, ncol=2)
        self.fig.tight_layout()
        self._draw()

    @property
    def point_data(self) -> np.ndarray:
        """The (x, y) of each scheme's point as drawn."""
        return self.points.get_offsets().data
