"""`QuantComparison`: what each quantization scheme costs and what it buys.

It reads `kit.evaluation.compare()` (columns `scheme, perplexity, ppl_delta_pct, kl_div,
top1_agreement, linear_weight_mib, ...`), optionally a speed frame (`scheme,
tokens_per_s`, e.g. from `bench/results/quant_decode_h100.json`) and per-scheme layer
errors (`kit.evaluation.layer_errors()` frames: `layer, kind, block, rel_mse`). It never
runs an engine.

Left: accuracy (perplexity delta, KL or top-1 agreement) against memory or speed, one
point per scheme. Each scheme keeps one colour and marker whatever the axes, and a legend
names them (the 8-bit schemes sit close together; their numbers are in the table below
the figure). Against `tokens_per_s` every scheme with a speed is drawn and those without
are named. Accuracy and speed often come from different runs (a small model's accuracy on
a CPU, a large model's speed on a GPU): `accuracy_source` and `speed_source` are printed
under the plot, so the figure says so.

Right: the selected scheme's per-layer output error along the network, on a log axis;
layers with exactly zero error (not quantized) are counted, not drawn at a fake floor.

    QuantComparison(results, speed=speed, speed_source="H100, Llama-3.1-8B, bs 1, quant_decode_h100.json",
                    accuracy_source="SmolLM2-135M on the CPU, 2048 tokens", layer_errors=errors)
"""

from __future__ import annotations

import textwrap

import ipywidgets as widgets
import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import to_hex

from widgets.figure import StaticFigure, figure_widget

__all__ = ["QuantComparison", "NONE"]

NONE = "(none)"
_ACCURACY = ("ppl_delta_pct", "kl_div", "top1_agreement")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")
_COLORS = tuple(to_hex(c) for c in matplotlib.colormaps["tab10"].colors)


class QuantComparison(StaticFigure, widgets.VBox):
    """Accuracy against cost, one point per scheme, and per-layer errors of one scheme.

    Attributes for code and tests: `x`, `y`, `scheme` (dropdowns), `colors` / `markers`
    (scheme -> style, fixed), `plotted` (schemes drawn on the left now), `point_data`,
    `missing_speed`, `source_text`, `ax`, `ax_layers`, `table`, `figure`.
    """

    def __init__(self, results: pd.DataFrame, *, speed: pd.DataFrame | None = None,
                 layer_errors: dict[str, pd.DataFrame] | None = None, speed_source: str | None = None,
                 accuracy_source: str | None = None) -> None:
        if results.empty or "scheme" not in results.columns:
            raise ValueError("QuantComparison needs kit.evaluation.compare()'s frame with a 'scheme' column and at "
                             f"least one row; got {len(results)} rows, columns {list(results.columns)}")
        if speed is not None and not {"scheme", "tokens_per_s"} <= set(speed.columns):
            raise ValueError("QuantComparison speed needs columns ['scheme', 'tokens_per_s']; "
                             f"got {list(speed.columns)}")
        self.results = results.reset_index(drop=True)
        self.speed = speed
        self.layer_errors = layer_errors or {}
        schemes = list(self.results["scheme"])
        self.colors = {s: _COLORS[i % len(_COLORS)] for i, s in enumerate(schemes)}
        self.markers = {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(schemes)}
        tokens = int(self.results["num_tokens"].iloc[0]) if "num_tokens" in self.results else None
        self.accuracy_source = accuracy_source or ("kit.evaluation.compare()" +
                                                   (f" on {tokens} tokens" if tokens else ""))
        self.speed_source = (speed_source or "source not given (pass speed_source=...)") if speed is not None else None

        cost = ["linear_weight_mib"] + (["tokens_per_s"] if speed is not None else [])
        self.y = widgets.Dropdown(options=[a for a in _ACCURACY if a in self.results], value="ppl_delta_pct",
                                  description="accuracy")
        self.x = widgets.Dropdown(options=cost, value="linear_weight_mib", description="against")
        with_errors = [s for s in schemes if s in self.layer_errors] or [NONE]
        self.scheme = widgets.Dropdown(options=with_errors, value=with_errors[0], description="layers of")
        self.table = widgets.HTML(self.results.round(4).to_html(index=False, border=0))
        self.fig, self.view, self._draw = figure_widget((10.0, 4.4))
        self.figure = self.fig
        self.ax, self.ax_layers = self.fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
        self.source_text = self.fig.text(0.01, 0.01, "", fontsize=8, color="#374151", va="bottom")
        for w in (self.x, self.y, self.scheme):
            w.observe(self._redraw, names="value")
        super().__init__([widgets.HBox([self.y, self.x, self.scheme]), self.view, self.table])
        self._redraw()

    def _frame(self) -> pd.DataFrame:
        df = self.results
        if self.speed is not None:
            speed = self.speed.drop_duplicates("scheme")[["scheme", "tokens_per_s"]]
            df = df.merge(speed, on="scheme", how="left")
        return df

    # ----------------------------------------------------------------- drawing
    def _redraw(self, *_: object) -> None:
        df = self._frame()
        ax = self.ax
        ax.clear()
        xs, ys = df[self.x.value].to_numpy(dtype=float), df[self.y.value].to_numpy(dtype=float)
        ok = np.isfinite(xs) & np.isfinite(ys)
        self.plotted = [s for s, keep in zip(df["scheme"], ok) if keep]
        self.missing_speed = [s for s, x in zip(df["scheme"], xs) if not np.isfinite(x)] \
            if self.x.value == "tokens_per_s" else []
        self._points = np.column_stack([xs[ok], ys[ok]]) if ok.any() else np.empty((0, 2))
        for name, x, y in zip(df["scheme"][ok], xs[ok], ys[ok]):
            ax.scatter([x], [y], s=70, color=self.colors[name], marker=self.markers[name], label=name,
                       edgecolors="black", linewidths=0.5, zorder=3)
        ax.set_xlabel(self.x.value + (" (decode, see the source below)" if self.x.value == "tokens_per_s" else ""))
        ax.set_ylabel(self.y.value)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="scheme",
                  title_fontsize=8, handletextpad=0.3)
        if self.missing_speed:
            ax.set_title(textwrap.fill("no speed for: " + ", ".join(self.missing_speed), 70), fontsize=8,
                         color="#6b7280")
        else:
            ax.set_title(f"{len(self.plotted)} schemes", fontsize=8, color="#6b7280")
        self._draw_layer_errors()
        source = f"accuracy: {self.accuracy_source}"
        if self.x.value == "tokens_per_s":
            source += f"  |  speed: {self.speed_source}"
        self.source_text.set_text(textwrap.fill(source, 190))
        self.fig.tight_layout(rect=(0, 0.06, 1, 1))
        self._draw()

    def _draw_layer_errors(self) -> None:
        axl = self.ax_layers
        axl.clear()
        errs = self.layer_errors.get(self.scheme.value)
        if errs is None:
            axl.text(0.5, 0.5, "no per-layer errors given", ha="center", va="center", transform=axl.transAxes)
            axl.set_axis_off()
            return
        axl.set_axis_on()
        errs = errs.reset_index(drop=True)
        positive = errs["rel_mse"] > 0
        for kind, g in errs[positive].groupby("kind"):
            axl.semilogy(g.index, g["rel_mse"], ".", label=kind, markersize=5)
        if positive.any():
            lo, hi = errs.loc[positive, "rel_mse"].min(), errs.loc[positive, "rel_mse"].max()
            axl.set_ylim(lo / 3, hi * 3)
        zeros = int((~positive).sum())
        axl.set_xlabel("layer (network order)")
        axl.set_ylabel("relative MSE vs reference")
        axl.set_title(f"{self.scheme.value}: per-layer error" +
                      (f" ({zeros} layers with zero error not drawn)" if zeros else ""), fontsize=9)
        axl.set_xlim(-1, len(errs))
        if positive.any():
            axl.legend(fontsize=7, ncol=2)

    @property
    def point_data(self) -> np.ndarray:
        """(n, 2): the (x, y) of each scheme's point as drawn, in `plotted` order."""
        return self._points
