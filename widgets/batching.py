"""`BatchingTimeline`: in-flight batching, iteration by iteration, from `Executor.stats()`.

It reads the frame kit documents in `Executor.stats()` (one row per executor iteration):
`iteration, time_s, duration_ms, request_ids, num_prefill_tokens, num_decode_tokens,
batch_size, kv_blocks_used, kv_blocks_total, num_preemptions, preempted_request_ids,
num_waiting`. It never runs an engine. Two plots share the x axis (iteration):

    top     one row per request (in order of first scheduling): a bar over every run of
            consecutive iterations in which it was scheduled (a prompt chunk or a decode
            token), a black X where it was preempted (its blocks freed, to be recomputed)
    bottom  stacked bars: prompt (prefill) tokens and decode tokens computed per iteration;
            on the right axes, lines for the batch size (sequences in the step) and the KV
            blocks in use, with the pool size dashed

A `Dropdown` selects a request: its row is highlighted, the other rows fade, the bars of
the iterations it ran in get an outline, and a line of text gives its schedule.

    t = BatchingTimeline(llm.executor.stats())   # an ipywidgets.VBox: end a cell with it
    t.dropdown.value = "req-3"
    t.schedule("req-3")                          # {'iterations': [...], 'preempted_at': [...], ...}
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
import matplotlib
import pandas as pd
from matplotlib.colors import to_hex
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from widgets.figure import figure_widget

__all__ = ["BatchingTimeline", "runs"]

_COLUMNS = ("iteration", "request_ids", "num_prefill_tokens", "num_decode_tokens", "batch_size", "kv_blocks_used",
            "kv_blocks_total", "preempted_request_ids")
_TAB20 = matplotlib.colormaps["tab20"].colors
# the same request palette as widgets.kv_cache: tab20 without greys, strong shades first
_PALETTE = tuple(to_hex(_TAB20[i]) for i in [*range(0, 20, 2), *range(1, 20, 2)] if i not in (14, 15))
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


class BatchingTimeline(widgets.VBox):
    """Gantt chart of requests over iterations, token bars per iteration, and a request picker.

    Parameters: `stats` (the frame of `Executor.stats()`), `title`. Attributes for code
    and tests: `dropdown`, `requests` (row order), `rows` (request id -> PolyCollection of
    its bars), `highlight` (the Rectangle over the selected row), `preemption_marks`,
    `prefill_bars` / `decode_bars` (BarContainers), `schedule_html`, `figure`.
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
        fig, view, self._redraw = figure_widget((9.0, 1.2 + 0.22 * n + 2.4))
        self.figure = fig
        height = fig.get_figheight()
        gs = fig.add_gridspec(2, 1, height_ratios=(max(1.0, 0.22 * n), 2.4), hspace=0.08, left=0.1, right=0.84,
                              top=0.97 - 0.3 / height, bottom=0.5 / height)
        ax_g = fig.add_subplot(gs[0])
        ax_b = fig.add_subplot(gs[1], sharex=ax_g)
        ax_r = ax_b.twinx()

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
        ax_g.set_ylabel("request")
        ax_g.tick_params(labelbottom=False)
        ax_g.grid(axis="x", color="#e5e7eb", linewidth=0.5)
        ax_g.set_title(title or f"{len(df)} iterations, {n} requests, {len(px)} preemptions (X)", fontsize=9)

        # (b) tokens per iteration, with batch size and KV blocks on the right axis
        it = self.iterations
        pre_tok = df["num_prefill_tokens"].to_numpy()
        dec_tok = df["num_decode_tokens"].to_numpy()
        self.prefill_bars = ax_b.bar(it, pre_tok, width=0.8, color=PREFILL_COLOR, label="prefill tokens",
                                     edgecolor="none")
        self.decode_bars = ax_b.bar(it, dec_tok, width=0.8, bottom=pre_tok, color=DECODE_COLOR,
                                    label="decode tokens", edgecolor="none")
        ax_b.set_ylabel("tokens / iteration")
        ax_b.set_ylim(0, max(1, int((pre_tok + dec_tok).max())) * 1.35)  # headroom for the legend
        ax_b.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_b.set_xlabel("iteration")
        (self.batch_line,) = ax_r.step(it, df["batch_size"], where="mid", color="#111827", linewidth=1.2,
                                       label="batch size")
        ax_r.set_ylabel("batch size (sequences)")
        ax_r.set_ylim(0, max(1, int(df["batch_size"].max())) * 1.35)
        ax_r.yaxis.set_major_locator(MaxNLocator(integer=True))
        # KV blocks on a second right-hand axis, its spine moved outwards
        ax_kv = ax_b.twinx()
        ax_kv.spines["right"].set_position(("axes", 1.09))
        total = int(df["kv_blocks_total"].max())
        (self.kv_line,) = ax_kv.step(it, df["kv_blocks_used"], where="mid", color=KV_COLOR, linewidth=1.2,
                                     label="KV blocks used")
        ax_kv.axhline(total, color=KV_COLOR, linestyle="--", linewidth=0.8, label=f"KV blocks total ({total})")
        ax_kv.set_ylim(0, max(1, total) * 1.35)
        ax_kv.set_ylabel("KV blocks", color=KV_COLOR)
        ax_kv.tick_params(axis="y", colors=KV_COLOR)
        handles = [*ax_b.get_legend_handles_labels()[0], *ax_r.get_legend_handles_labels()[0],
                   *ax_kv.get_legend_handles_labels()[0]]
        ax_b.legend(handles=handles, fontsize=7, loc="upper left", ncol=5, frameon=False)
        ax_b.set_xlim(it.min() - 0.6, it.max() + 0.6)
        self.axes = (ax_g, ax_b, ax_r, ax_kv)

        labels = [(f"{rid} ({len(ran.get(rid, []))} iterations, {len(preempted.get(rid, []))} preemptions)", rid)
                  for rid in self.requests]
        self.dropdown = widgets.Dropdown(options=[("(none)", None), *labels], value=None, description="request",
                                         layout=widgets.Layout(width="420px"))
        self.schedule_html = widgets.HTML()
        self.dropdown.observe(self._on_select, names="value")
        super().__init__([self.dropdown, self.schedule_html, view])
        self._show(None)

    # ------------------------------------------------------------------ state
    @property
    def selected(self) -> str | None:
        return self.dropdown.value

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
        self._show(change["new"])

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
