"""`AcceptanceView`: speculative decoding token by token: which drafts the target accepted.

It reads the frame of `Speculator.acceptance_frame(tokenizer=...)` (kit/speculative/stats.py),
one row per token of every verification: `request_id, step, position, token_id, text, kind,
accepted`, with `kind` one of 'accepted' (a draft the target kept), 'rejected' (a draft it
refused, and every draft after it) and 'target' (the target's own token: the correction after
a rejection, or the bonus after full acceptance). It never runs an engine.

Top: the selected request's output as coloured tokens, in order: green accepted drafts, red
(struck through) rejected drafts, blue the target's tokens. Bottom: per verification step,
the drafts proposed and those accepted; the title gives the acceptance rate and the tokens
emitted per target forward.

    v = AcceptanceView(llm.executor.speculator.acceptance_frame(tokenizer=llm.tokenizer))
    v.dropdown.value = "req-3";  v.summary("req-3")   # {'drafted': ..., 'accepted': ..., ...}
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
import pandas as pd
from matplotlib.ticker import MaxNLocator

from widgets.figure import StaticFigure, figure_widget

__all__ = ["AcceptanceView", "KIND_COLORS"]

_COLUMNS = ("request_id", "step", "position", "token_id", "text", "kind", "accepted")
KIND_COLORS = {"accepted": "#16a34a", "rejected": "#dc2626", "target": "#2563eb"}
_WRAP = 90.0  # token-strip width, in character units


class AcceptanceView(StaticFigure, widgets.VBox):
    """Drafted tokens coloured by the verdict, per request, with the acceptance rate.

    Attributes for code and tests: `dropdown`, `requests`, `token_html` (the HTML strip),
    `token_texts` (matplotlib Text artists of the strip, in order), `drafted_bars` /
    `accepted_bars` (BarContainers), `axes`, `figure`.
    """

    def __init__(self, frame: pd.DataFrame, *, title: str | None = None) -> None:
        missing = [c for c in _COLUMNS if c not in frame.columns]
        if frame.empty or missing:
            raise ValueError("AcceptanceView needs a non-empty Speculator.acceptance_frame(); got "
                             f"{len(frame)} rows" + (f", missing columns {missing}" if missing else ""))
        self.frame = frame.reset_index(drop=True)
        self.requests = list(dict.fromkeys(self.frame["request_id"]))
        self.title = title
        self.figure, view, self._redraw = figure_widget((9.5, 4.6))
        gs = self.figure.add_gridspec(2, 1, height_ratios=(1.5, 1.0), hspace=0.45, left=0.07, right=0.98,
                                      top=0.92, bottom=0.12)
        self.ax_tokens = self.figure.add_subplot(gs[0])
        self.ax_steps = self.figure.add_subplot(gs[1])
        self.axes = (self.ax_tokens, self.ax_steps)
        self.token_texts: list[Any] = []
        self.drafted_bars = self.accepted_bars = None
        options = [(f"{rid} ({self.summary(rid)['acceptance_rate']:.0%} accepted)", rid) for rid in self.requests]
        self.dropdown = widgets.Dropdown(options=options, value=self.requests[0], description="request",
                                         layout=widgets.Layout(width="420px"))
        self.token_html = widgets.HTML()
        self.dropdown.observe(lambda change: self._show(change["new"]), names="value")
        super().__init__([self.dropdown, self.token_html, view])
        self._show(self.requests[0])

    # ------------------------------------------------------------------ data
    def rows(self, request_id: str) -> pd.DataFrame:
        """The request's rows as verified: per step its drafts in order, then the target's token."""
        if request_id not in self.requests:
            raise KeyError(f"request {request_id!r} is not in this frame; known: {', '.join(self.requests)}")
        df = self.frame[self.frame["request_id"] == request_id].copy()
        df["_k"] = (df["kind"] == "target").astype(int)
        return df.sort_values(["step", "_k", "position"]).drop(columns="_k")

    def summary(self, request_id: str) -> dict[str, Any]:
        """drafted, accepted, acceptance_rate, steps (target forwards that verified), tokens_per_forward."""
        df = self.frame[self.frame["request_id"] == request_id]
        drafted = int((df["kind"] != "target").sum())
        accepted = int((df["kind"] == "accepted").sum())
        steps = int((df["kind"] == "target").sum())
        return {"drafted": drafted, "accepted": accepted, "acceptance_rate": accepted / drafted if drafted else 0.0,
                "steps": steps, "tokens_per_forward": (accepted + steps) / steps if steps else 0.0}

    # ---------------------------------------------------------------- drawing
    def _show(self, rid: str) -> None:
        df, s = self.rows(rid), self.summary(rid)
        spans = []
        for text, kind in zip(df["text"], df["kind"]):
            style = f"background:{KIND_COLORS[kind]}22;border-bottom:2px solid {KIND_COLORS[kind]};"
            if kind == "rejected":
                style += "text-decoration:line-through;color:#991b1b;"
            spans.append(f"<span style='{style}white-space:pre'>{html.escape(text)}</span>")
        legend = " ".join(f"<span style='color:{c}'>&#9632; {k}</span>" for k, c in KIND_COLORS.items())
        self.token_html.value = f"<div style='font-family:monospace;line-height:1.9'>{''.join(spans)}</div>{legend}"

        ax = self.ax_tokens
        ax.clear()
        self.token_texts = []
        x, y = 0.0, 0.0
        for text, kind in zip(df["text"], df["kind"]):
            label = text.replace("\n", "\\n") or " "
            width = 0.62 * len(label) + 0.9
            if x + width > _WRAP and x > 0:
                x, y = 0.0, y + 1.0
            t = ax.text(x, y, label, fontsize=8, family="monospace", va="center", ha="left",
                        color="#991b1b" if kind == "rejected" else "black",
                        bbox=dict(boxstyle="round,pad=0.2", facecolor=KIND_COLORS[kind], alpha=0.25,
                                  edgecolor=KIND_COLORS[kind]))
            self.token_texts.append(t)
            x += width
        ax.set_xlim(-0.5, _WRAP)
        ax.set_ylim(max(y, 3.0) + 0.7, -0.7)
        ax.axis("off")
        ax.set_title(self.title or (f"{rid}: {s['accepted']} of {s['drafted']} drafts accepted "
                                    f"({s['acceptance_rate']:.0%}), {s['tokens_per_forward']:.2f} tokens per target "
                                    "forward  (green accepted, red rejected, blue the target's token)"), fontsize=9)

        ax = self.ax_steps
        ax.clear()
        per = df.groupby("step")["kind"].agg(drafted=lambda k: int((k != "target").sum()),
                                             accepted=lambda k: int((k == "accepted").sum()))
        x = list(range(len(per)))
        self.drafted_bars = ax.bar(x, per["drafted"], color="#e5e7eb", edgecolor="#9ca3af", label="drafted")
        self.accepted_bars = ax.bar(x, per["accepted"], color=KIND_COLORS["accepted"], label="accepted")
        ax.set_xlim(-0.6, max(len(x) - 1, 7) + 0.6)
        ax.set_xlabel("verification (target forward) of this request")
        ax.set_ylabel("tokens")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="upper right", frameon=False)
        self._redraw()
