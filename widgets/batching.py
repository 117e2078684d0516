"""`BatchingTimeline`: in-flight batching, iteration by iteration, from `Executor.stats()`.

It reads the frame kit documents in `Executor.stats()` (one row per executor iteration):
`iteration, time_s, duration_ms, request_ids, num_prefill_tokens, num_decode_tokens,
batch_size, kv_blocks_used, kv_blocks_total, num_preemptions, preempted_request_ids,
num_waiting`. It never runs an engine. Four plots share the x axis (iteration), each
with one quantity on its own y axis:

    requests    one row per request (in order of first scheduling): a bar over every run of
                consecutive iterations in which it was scheduled (a prompt chunk or a decode
                token), a black X where it was preempted (its blocks freed, to be recomputed)
    tokens      stacked bars: prompt (prefill) tokens and decode tokens computed per iteration
    batch size  sequences in the step
    KV blocks   blocks in use, on an axis from 0 to the pool size (dashed line at the top)

A `Dropdown` selects a request ("(none)" by default, a visible option): its row is
highlighted, the other rows fade, the bars of the iterations it ran in get an outline, and
a line of text gives its schedule.

    t = BatchingTimeline(llm.executor.stats())   # an ipywidgets.VBox: end a cell with it
    t.dropdown.value = "req-3"                   # back to all: t.dropdown.value = NONE ("(none)")
    t.schedule("req-3")                          # {'iterations': [...], 'preempted_at': [...], ...}
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
import pandas as pd
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from widgets.figure import StaticFigure, figure_widget
from widgets.kv_cache import REQUEST_PALETTE

__all__ = ["BatchingTimeline", "runs", "NONE"]

_COLUMNS = ("iteration", "request_ids", "num_prefill_tokens", "num_decode_tokens", "batch_size", "kv_blocks_used",
            "kv_blocks_total", "preempted_request_ids")
_PALETTE = REQUEST_PALETTE  # a request has the same colour here as in KVCacheMap
# NOTE: a real option value, not None: ipywidgets shows a None value as an empty dropdown
NONE = "(none)"
PREFILL_COLOR, DECODE_COLOR, KV_COLOR = "#f59e0b", "#3b82f6", "#7c3aed"
FADED, SHOWN = 0.25, 1.0


def runs(iterations: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted iterations as (first, last): [1, 2, 3, 7, 8] -> [(1, 3), (7, 8)]."""
    out: list[tuple[int, int]] = []
    for it in iterations:
        if out and it == out[-1][1] + 1:
            out[-1] = (out[-1][0], it)
        else:
            out.append((it, it))
    return out


class BatchingTimeline(StaticFigure, widgets.VBox):
    """Gantt chart of requests over iterations, token bars per iteration, and a request picker.

    Parameters: `stats` (the frame of `Executor.stats()`), `title`. Attributes for code
    and tests: `dropdown`, `requests` (row order), `rows` (request id -> PolyCollection of
    its bars), `highlight` (the Rectangle over the selected row), `preemption_marks`,
    `prefill_bars` / `decode_bars` (BarContainers), `batch_line`, `kv_line`, `kv_total_line`,
    `axes` (requests, tokens, batch size, KV blocks), `schedule_html`, `figure`.
    """

    def __init__(self, stats: pd.DataFrame, *, title: str | None = None) -> None:
        missing = [c for c in _COLUMNS if c not in stats.columns]
        if stats.empty or missing:
            raise ValueError("BatchingTimeline needs a non-empty Executor.stats() frame; "
                             f"got {len(stats)} rows" + (f", missing columns {missing}" if missing else ""))
        df = stats.sort_values("iteration").reset_index(drop=True)
        self.stats = df
        self.iterations = df["iteration"].astype(int).to_numpy()
        ran: dict[str, list[int]] = {}
        preempted: dict[str, list[int]] = {}
        for it, ids, pre in zip(self.iterations, df["request_ids"], df["preempted_request_ids"]):
            for rid in ids:
                ran.setdefault(rid, []).append(int(it))
            for rid in pre:
                preempted.setdefault(rid, []).append(int(it))
        self._ran, self._preempted = ran, preempted
        self.requests = list(dict.fromkeys([*ran, *preempted]))  # row order: first scheduled first
        self.colors = {rid: _PALETTE[i % len(_PALETTE)] for i, rid in enumerate(self.requests)}
        row = {rid: i for i, rid in enumerate(self.requests)}

        n = len(self.requests)
        heights = (max(1.0, 0.22 * n), 1.9, 0.85, 0.85)  # inches: requests, tokens, batch size, KV blocks
        fig, view, self._redraw = figure_widget((9.0, sum(heights) + 1.3))
        self.figure = fig
        height = fig.get_figheight()
        gs = fig.add_gridspec(4, 1, height_ratios=heights, hspace=0.12, left=0.1, right=0.97,
                              top=0.97 - 0.3 / height, bottom=0.55 / height)
        ax_g = fig.add_subplot(gs[0])
        ax_b = fig.add_subplot(gs[1], sharex=ax_g)
        ax_r = fig.add_subplot(gs[2], sharex=ax_g)
        ax_kv = fig.add_subplot(gs[3], sharex=ax_g)

        # (a) the Gantt chart: one row per request
        self.highlight = Rectangle((0.0, -0.5), 1.0, 1.0, transform=ax_g.get_yaxis_transform(), color="#fde68a",
                                   zorder=0, visible=False)
        ax_g.add_patch(self.highlight)
        self.rows = {}
        for rid in self.requests:
            spans = [(a - 0.4, b - a + 0.8) for a, b in runs(ran.get(rid, []))]
            self.rows[rid] = ax_g.broken_barh(spans, (row[rid] - 0.35, 0.7), facecolors=self.colors[rid],
                                              alpha=SHOWN, zorder=2)
        px = [it for rid in self.requests for it in preempted.get(rid, [])]
        py = [row[rid] for rid in self.requests for _ in preempted.get(rid, [])]
        self.preemption_marks = ax_g.scatter(px, py, marker="X", s=60, c="black", edgecolors="white", linewidths=0.8,
                                             zorder=3)
        ax_g.set_yticks(range(n), self.requests, fontsize=7 if n > 12 else 8)
        ax_g.set_ylim(n - 0.5, -0.5)
        ax_g.set_ylabel("request", fontsize=8)
        ax_g.grid(axis="x", color="#e5e7eb", linewidth=0.5)
        ax_g.set_title(title or f"{len(df)} iterations, {n} requests, {len(px)} preemptions (X)", fontsize=9)

        # (b) tokens per iteration
        it = self.iterations
        pre_tok = df["num_prefill_tokens"].to_numpy()
        dec_tok = df["num_decode_tokens"].to_numpy()
        self.prefill_bars = ax_b.bar(it, pre_tok, width=0.8, color=PREFILL_COLOR, label="prefill tokens",
                                     edgecolor="none")
        self.decode_bars = ax_b.bar(it, dec_tok, width=0.8, bottom=pre_tok, color=DECODE_COLOR,
                                    label="decode tokens", edgecolor="none")
        ax_b.set_ylabel("tokens /\niteration", fontsize=8)
        ax_b.set_ylim(0, max(1, int((pre_tok + dec_tok).max())) * 1.3)  # headroom for the legend
        ax_b.legend(fontsize=7, loc="upper left", ncol=2, frameon=False)

        # (c) batch size, (d) KV blocks: each on its own axis (sharing one would put unrelated
        # numbers on the same gridlines)
        (self.batch_line,) = ax_r.step(it, df["batch_size"], where="mid", color="#111827", linewidth=1.3)
        ax_r.set_ylabel("batch size\n(sequences)", fontsize=8)
        ax_r.set_ylim(0, max(1, int(df["batch_size"].max())) * 1.2)
        ax_r.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        total = int(df["kv_blocks_total"].max())
        peak = int(df["kv_blocks_used"].max())
        # NOTE: a run that uses a small part of a large pool would draw a flat line on the pool's
        # scale; then the axis follows the blocks used and the legend says where the pool ends
        zoomed = peak < total / 2
        (self.kv_line,) = ax_kv.step(it, df["kv_blocks_used"], where="mid", color=KV_COLOR, linewidth=1.3,
                                     label=f"KV blocks used (peak {peak} of {total})")
        self.kv_total_line = ax_kv.axhline(total, color=KV_COLOR, linestyle="--", linewidth=0.8, visible=not zoomed,
                                           label=f"pool: {total} blocks" + (" (above this axis)" if zoomed else ""))
        ax_kv.fill_between(it, df["kv_blocks_used"], step="mid", color=KV_COLOR, alpha=0.15, linewidth=0)
        ax_kv.set_ylim(0, max(1, peak if zoomed else total) * 1.25)
        ax_kv.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        ax_kv.set_ylabel("KV blocks", fontsize=8, color=KV_COLOR)
        ax_kv.legend(fontsize=7, loc="upper left", ncol=2, frameon=False)
        for ax in (ax_g, ax_b, ax_r):
            ax.tick_params(labelbottom=False)
        for ax in (ax_b, ax_r, ax_kv):
            ax.grid(axis="y", color="#e5e7eb", linewidth=0.5)
            ax.tick_params(axis="y", labelsize=7)
        ax_kv.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_kv.set_xlabel("iteration")
        ax_kv.set_xlim(it.min() - 0.6, it.max() + 0.6)
        fig.align_ylabels([ax_g, ax_b, ax_r, ax_kv])
        self.axes = (ax_g, ax_b, ax_r, ax_kv)

        labels = [(f"{rid} ({len(ran.get(rid, []))} iterations, {len(preempted.get(rid, []))} preemptions)", rid)
                  for rid in self.requests]
        self.dropdown = widgets.Dropdown(options=[(NONE, NONE), *labels], value=NONE, description="request",
                                         layout=widgets.Layout(width="420px"))
        self.schedule_html = widgets.HTML()
        self.dropdown.observe(self._on_select, names="value")
        super().__init__([self.dropdown, self.schedule_html, view])
        self._show(None)

    # ------------------------------------------------------------------ state
    @property
    def selected(self) -> str | None:
        """The selected request id, None for "(none)"."""
        return None if self.dropdown.value in (NONE, None) else self.dropdown.value

    def schedule(self, request_id: str) -> dict[str, Any]:
        """When a request ran: `iterations` (scheduled in), `runs` [(first, last)], `preempted_at`,
        `first`, `last`, `num_iterations`."""
        if request_id not in self.colors:
            raise KeyError(f"request {request_id!r} is not in these stats; known: {', '.join(self.requests)}")
        its = self._ran.get(request_id, [])
        return {"iterations": list(its), "runs": runs(its), "preempted_at": list(self._preempted.get(request_id, [])),
                "first": its[0] if its else None, "last": its[-1] if its else None, "num_iterations": len(its)}

    # ---------------------------------------------------------------- updates
    def _on_select(self, change: dict[str, Any]) -> None:
        if change["new"] is None:  # cleared from code: show the visible "(none)" option instead
            self.dropdown.value = NONE
            return
        self._show(self.selected)

    def _show(self, rid: str | None) -> None:
        for r, coll in self.rows.items():
            coll.set_alpha(SHOWN if rid is None or r == rid else FADED)
            coll.set_edgecolor("black" if r == rid else "none")
        ran = set(self._ran.get(rid, [])) if rid is not None else set()
        for it, bars in zip(self.iterations, zip(self.prefill_bars, self.decode_bars)):
            for bar in bars:
                bar.set_edgecolor("black" if it in ran else "none")
                bar.set_linewidth(1.0 if it in ran else 0.0)
        if rid is None:
            self.highlight.set_visible(False)
            self.schedule_html.value = ("<span style='font-size:smaller'>pick a request to see when it ran; "
                                        "bars: runs of consecutive iterations in the batch, black X: preempted</span>")
        else:
            self.highlight.set_y(self.requests.index(rid) - 0.5)
            self.highlight.set_visible(True)
            self.schedule_html.value = self._describe(rid)
        self._redraw()

    def _describe(self, rid: str) -> str:
        s = self.schedule(rid)
        spans = ", ".join(f"{a}" if a == b else f"{a}&ndash;{b}" for a, b in s["runs"]) or "never"
        text = (f"<b>{html.escape(rid)}</b> ran in {s['num_iterations']} of {len(self.iterations)} iterations: "
                f"{spans}")
        if s["preempted_at"]:
            text += (f"; <span style='color:#b91c1c'>preempted at iteration "
                     f"{', '.join(map(str, s['preempted_at']))}</span> (blocks freed, recomputed when readmitted)")
        if len(s["runs"]) > 1:
            gaps = sum(start - end - 1 for (_, end), (start, _) in zip(s["runs"], s["runs"][1:]))
            text += f"; waited {gaps} iterations in between"
        return text
