"""`KVCacheMap`: the paged KV-cache block pool as a grid, one frame per recorded step.

It reads what kit produces and nothing else (it never imports an engine):

* `Executor.kv_cache_history()` (`LLM(..., record_kv_cache=True)`): block maps with a
  leading `step` column, one map per executor iteration, taken *after* that iteration
  (so a request that finished in iteration i has already released its blocks at step i);
* or a single `KVCacheInspector.block_map()` (no `step` column): one frame.

The columns are the ones `kit.kv_cache.KVCacheInspector` documents: `block_id`,
`owner_request_ids` (tuple), `ref_count`, `hash`, `state` ('free' | 'used' | 'cached'),
`num_tokens`. Block `b` is the cell at row `b // ncols`, column `b % ncols`:

    used   -> the colour of its owner request (stable over all steps: the n-th request to
              appear gets the n-th palette colour, a palette without blues and greys); a
              block shared by several requests (ref_count > 1, prefix caching or n > 1)
              takes its first owner's colour and gets a white dot
    cached -> light blue (#93c5fd): nobody owns it, but its K/V and hash stay until it is
              evicted (LRU)
    free   -> light grey (#e5e7eb)

These are the colours of `KVCacheInspector`'s HTML grid (kit/kv_cache.py) for cached and
free blocks, so one legend reads both (the HTML grid draws every used block green).

    w = KVCacheMap(llm.executor.kv_cache_history())   # an ipywidgets.VBox: end a cell with it
    w.slider.value = 3                                 # show the pool after iteration 3
    w.image.get_array()                                # (rows, ncols, 4) RGBA of that frame
"""

from __future__ import annotations

import html
import math
import textwrap
from typing import Any, Mapping

import ipywidgets as widgets
import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import to_hex, to_rgba
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from widgets.figure import StaticFigure, figure_widget

__all__ = ["KVCacheMap", "block_grid", "request_colors", "FREE_COLOR", "CACHED_COLOR", "REQUEST_PALETTE", "LEGEND"]

# NOTE: the same colours as KVCacheInspector's HTML grid (kit/kv_cache.py), so that one legend
# describes both; tests/test_widgets.py checks that they stay equal
FREE_COLOR = "#e5e7eb"  # light grey
CACHED_COLOR = "#93c5fd"  # light blue
_PAST_END = (0.0, 0.0, 0.0, 0.0)  # cells after the last block of a non-rectangular pool
# tab20 without its blues (blue means "cached"), greys (grey means "free") and light cyan (too
# close to the cached blue), strong shades first, then the light ones: 15 request colours, then
# they repeat
_TAB20 = matplotlib.colormaps["tab20"].colors
REQUEST_PALETTE = tuple(to_hex(_TAB20[i]) for i in [*range(0, 20, 2), *range(1, 20, 2)] if i not in (0, 1, 14, 15, 19))
LEGEND = {"used": "the owner request's colour (one colour per request, kept over all steps)",
          "cached": f"light blue {CACHED_COLOR}: no owner, K/V and hash kept for reuse until evicted",
          "free": f"light grey {FREE_COLOR}: empty", "shared": "a white dot: a block several requests hold"}
_REQUIRED = ("block_id", "owner_request_ids", "state")


def request_colors(request_ids) -> dict[str, str]:
    """Request id -> hex colour, in the given order (the palette repeats after 15 requests)."""
    return {rid: REQUEST_PALETTE[i % len(REQUEST_PALETTE)] for i, rid in enumerate(dict.fromkeys(request_ids))}


def block_grid(block_map: pd.DataFrame, colors: Mapping[str, str], ncols: int,
               num_blocks: int | None = None) -> np.ndarray:
    """The RGBA image (rows, ncols, 4) of one block map: what `KVCacheMap` draws for a step.

    `colors` maps request ids to colours; a used block takes its first owner's colour.
    """
    n = int(num_blocks if num_blocks is not None else block_map["block_id"].max() + 1)
    rows = max(1, math.ceil(n / ncols))
    flat = np.tile(np.array(_PAST_END), (rows * ncols, 1))
    flat[:n] = to_rgba(FREE_COLOR)
    cached = to_rgba(CACHED_COLOR)
    for b, owners, state in zip(block_map["block_id"], block_map["owner_request_ids"], block_map["state"]):
        if state == "used" and owners:
            flat[int(b)] = to_rgba(colors[owners[0]])
        elif state == "cached":
            flat[int(b)] = cached
    return flat.reshape(rows, ncols, 4)


class KVCacheMap(StaticFigure, widgets.VBox):
    """The block pool as a coloured grid, with a step slider and a used / cached / free line.

    Parameters: `history` (the frame of `Executor.kv_cache_history()`, or one
    `KVCacheInspector.block_map()`), `ncols` (cells per row, default min(num_blocks, 32)),
    `title`. Attributes for code and tests: `slider` (IntSlider over the steps), `image`
    (the AxesImage), `shared_marks` (the dots of shared blocks), `label` (HTML line),
    `colors` (request id -> colour), `steps`, `figure`.
    """

    def __init__(self, history: pd.DataFrame, *, ncols: int | None = None, title: str | None = None) -> None:
        missing = [c for c in _REQUIRED if c not in history.columns]
        if history.empty or missing:
            raise ValueError("KVCacheMap needs a non-empty block map (KVCacheInspector.block_map()) or history "
                             "(Executor.kv_cache_history(), recorded with LLM(..., record_kv_cache=True)); "
                             f"got {len(history)} rows" + (f", missing columns {missing}" if missing else ""))
        frames = history if "step" in history.columns else history.assign(step=0)
        self._frames = {int(s): f.sort_values("block_id") for s, f in frames.groupby("step", sort=True)}
        self.steps = sorted(self._frames)
        self.num_blocks = int(frames["block_id"].max()) + 1
        self.ncols = int(ncols or min(self.num_blocks, 32))
        if self.ncols < 1:
            raise ValueError(f"KVCacheMap.ncols must be >= 1, got {ncols!r}")
        self.nrows = max(1, math.ceil(self.num_blocks / self.ncols))
        # stable colours: requests in order of first appearance (step, then block id)
        self.colors = request_colors(rid for s in self.steps for owners in self._frames[s]["owner_request_ids"]
                                     for rid in owners)

        # wide enough for a readable block number in every cell (about 900 px at 100 dpi), cells
        # at most 1.1 in wide so that a small pool does not become a few huge squares
        width = min(12.0, max(9.0, 0.36 * self.ncols))
        cell = min(1.1, 0.96 * width / self.ncols)  # inches per cell
        title = title or (f"KV cache: {self.num_blocks} blocks (block b at row b // {self.ncols}, "
                          f"column b % {self.ncols})")
        title = textwrap.fill(title, int(width * 10))
        head = 0.75 + 0.22 * title.count("\n")  # title and the step line above the grid, inches
        fig, view, self._redraw = figure_widget((width, head + 0.15 + cell * self.nrows))
        self.figure = fig
        h = fig.get_figheight()
        ax = fig.add_axes(((1 - cell * self.ncols / width) / 2, 0.15 / h, cell * self.ncols / width,
                           cell * self.nrows / h))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=10, pad=24)
        # the step drawn, inside the picture: it changes in the same redraw as the cells
        self.step_text = ax.text(0.0, 1.02, "", transform=ax.transAxes, fontsize=9, ha="left", va="bottom")
        self.image = ax.imshow(self._grid(self.steps[0]), interpolation="nearest", aspect="equal",
                               extent=(-0.5, self.ncols - 0.5, self.nrows - 0.5, -0.5))
        # thin grey lines between the cells
        ax.set_xticks(np.arange(-0.5, self.ncols, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, self.nrows, 1), minor=True)
        ax.grid(which="minor", color="#d1d5db", linewidth=0.6)
        ax.tick_params(which="both", length=0)
        if self.num_blocks <= 256:  # print each block id in its cell, sized to the cell
            size = max(6.0, min(13.0, cell * 72 * (0.38 if self.num_blocks < 100 else 0.3)))
            for b in range(self.num_blocks):
                ax.text(b % self.ncols, b // self.ncols, str(b), ha="center", va="center", fontsize=size,
                        color="#111827")
        used = self.colors[next(iter(self.colors))] if self.colors else "#ffffff"
        handles = [Patch(facecolor=FREE_COLOR, edgecolor="#9ca3af", label="free"),
                   Patch(facecolor=CACHED_COLOR, edgecolor="#9ca3af", label="cached"),
                   Patch(facecolor=used, edgecolor="#9ca3af", label="used (request's colour)"),
                   Line2D([], [], marker="o", color="white", markeredgecolor="black", linestyle="none",
                          label="shared")]
        ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=4, fontsize=8, frameon=False,
                  borderaxespad=0.1, handlelength=1.2)
        self.shared_marks = ax.scatter([], [], s=14, c="white", edgecolors="black", linewidths=0.5, zorder=3)
        self.ax = ax

        self.slider = widgets.IntSlider(value=self.steps[0], min=self.steps[0], max=self.steps[-1], description="step",
                                        continuous_update=True, disabled=len(self.steps) == 1)
        # NOTE: Play is not jslinked to the slider: the browser would move the slider ahead of the
        # kernel, and the label (computed in Python) would lag it. Play's ticks come to Python,
        # which moves the slider, the label and the picture in one reply.
        self.play = widgets.Play(value=self.steps[0], min=self.steps[0], max=self.steps[-1], interval=500,
                                 disabled=len(self.steps) == 1, description="play")
        self.label = widgets.HTML()
        legend = (_swatch(FREE_COLOR, "free") + " " + _swatch(CACHED_COLOR, "cached (no owner, reusable)") + " "
                  + _swatch(used, "used: its request's colour"))
        self.legend = widgets.HTML(f"<div style='font-size:smaller'>{legend} &middot; "
                                   "a white dot: a block shared by several requests</div>")
        self.slider.observe(self._on_step, names="value")
        self.play.observe(self._on_play, names="value")
        super().__init__([widgets.HBox([self.play, self.slider]), self.label, view, self.legend])
        self._show(self.steps[0])

    # ------------------------------------------------------------------ state
    @property
    def step(self) -> int:
        """The recorded step shown now (the last recorded step <= the slider's value)."""
        return self._resolve(self.slider.value)

    def block_map(self, step: int | None = None) -> pd.DataFrame:
        """The block map shown for `step` (default: the current one)."""
        return self._frames[self._resolve(self.step if step is None else step)]

    def counts(self, step: int | None = None) -> dict[str, int]:
        """used / cached / free blocks (they sum to num_blocks), shared blocks and owned token slots at `step`."""
        f = self.block_map(step)
        state = f["state"]
        used = state == "used"
        return {"used": int(used.sum()), "cached": int((state == "cached").sum()), "free": int((state == "free").sum()),
                "shared": int((f["owner_request_ids"].map(len) > 1).sum()),
                "tokens": int(f.loc[used, "num_tokens"].sum()) if "num_tokens" in f.columns else 0}

    def _resolve(self, value: int) -> int:
        i = int(np.searchsorted(self.steps, value, side="right")) - 1
        return self.steps[max(i, 0)]

    def _grid(self, step: int) -> np.ndarray:
        return block_grid(self._frames[step], self.colors, self.ncols, self.num_blocks)

    # ---------------------------------------------------------------- updates
    def _on_step(self, change: dict[str, Any]) -> None:
        if self.play.value != change["new"]:
            self.play.value = change["new"]  # Play resumes from where the slider was dragged
        self._show(self._resolve(change["new"]), change["new"])

    def _on_play(self, change: dict[str, Any]) -> None:
        self.slider.value = change["new"]  # -> _on_step: slider, label and picture move together

    def _show(self, step: int, value: int | None = None) -> None:
        """Draw recorded `step`; `value` is the slider's value when no step was recorded there."""
        f = self._frames[step]
        shown = f"step {step}" if value in (None, step) else f"step {value} (pool as recorded at step {step})"
        c = self.counts(step)
        self.image.set_data(self._grid(step))
        self.step_text.set_text(f"{shown}: used {c['used']}, cached {c['cached']}, free {c['free']}")
        shared = f.loc[f["owner_request_ids"].map(len) > 1, "block_id"].to_numpy(dtype=int)
        self.shared_marks.set_offsets(np.column_stack([shared % self.ncols, shared // self.ncols]) if len(shared)
                                      else np.empty((0, 2)))
        owners: dict[str, int] = {}
        for o in f["owner_request_ids"]:
            for rid in o:
                owners[rid] = owners.get(rid, 0) + 1
        reqs = (" ".join(_swatch(self.colors[r], f"{r}: {n}") for r, n in owners.items())
                or "<i>no request holds blocks</i>")
        self.label.value = (f"<b>{shown}</b> &middot; used {c['used']} &middot; cached {c['cached']} &middot; "
                            f"free {c['free']} (of {self.num_blocks} blocks) &middot; shared {c['shared']} &middot; "
                            f"{c['tokens']} token slots owned<br><span style='font-size:smaller'>blocks per request: "
                            f"{reqs}</span>")
        self._redraw()


def _swatch(color: str, text: str) -> str:
    return (f"<span style='display:inline-block;width:10px;height:10px;background:{color};border:1px solid #9ca3af;"
            f"vertical-align:middle'></span> {html.escape(text)}")
