"""`BeamTree`: a finished beam search as a tree, from the history of parent pointers.

It reads the frame of `BeamHistory.frame()` (kit/beam_search.py; `RequestOutput.metrics
["beam_history"]` of a beam request), one row per beam per step, columns `step, beam, parent,
token, text, cumulative_logprob, score, kind, rank`. It never runs an engine.

    x: step (generated position; 0 is the prompt)
    y: beam slot (0 = the best running beam of that step); finished hypotheses below them
    an edge joins each node to its parent at the step before; a star is a finished
    hypothesis (its length-penalised score beside it), coloured by output rank when returned

Branches that did not survive fade; the returned hypotheses' paths are drawn in their
colours. A `Dropdown` picks one output: its path is drawn thick and its text and score shown.

    t = BeamTree(out.metrics["beam_history"].frame())   # an ipywidgets.VBox: end a cell with it
    t.dropdown.value = 1                                  # the second-best output
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection

from widgets.figure import StaticFigure, figure_widget

__all__ = ["BeamTree", "ALL", "tree_layout"]

COLUMNS = ("step", "beam", "parent", "token", "text", "cumulative_logprob", "score", "kind", "rank")
RANK_COLORS = ("#dc2626", "#2563eb", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")
PRUNED, ALIVE = "#d1d5db", "#6b7280"
ALL = -1  # dropdown value: every returned output, none in front


def tree_layout(frame: pd.DataFrame) -> tuple[list[tuple[float, float]], list[int]]:
    """(x, y) of every row and the row of its parent node (-1: the prompt at (0, 0)).

    Running beams sit at y = their slot; the k-th hypothesis finished at a step sits at
    y = beam_width + k, below the running beams."""
    width = int(frame.loc[frame["kind"] == "running", "beam"].max() + 1) if (frame["kind"] == "running").any() else 1
    slot_row = {(int(s), int(b)): i for i, (s, b, k) in enumerate(zip(frame["step"], frame["beam"], frame["kind"]))
                if k == "running"}
    pos, parents, seen = [], [], {}
    for i, (s, b, p, k) in enumerate(zip(frame["step"], frame["beam"], frame["parent"], frame["kind"])):
        s, p = int(s), int(p)
        if k == "running":
            y = float(b)
        else:
            seen[s] = seen.get(s, 0) + 1
            y = float(width + seen[s] - 1)
        pos.append((float(s), y))
        parents.append(slot_row.get((s - 1, p), -1) if p >= 0 else -1)
    return pos, parents


class BeamTree(StaticFigure, widgets.VBox):
    """The beams of one request as a tree over steps, with a picker for the returned outputs.

    Attributes for code and tests: `frame`, `positions` (row -> (x, y)), `parent_rows`,
    `paths` (rank -> rows from the first token to the hypothesis), `edges` (LineCollection),
    `running_nodes`, `finished_nodes` (PathCollections), `selected_line` (Line2D of the picked
    path), `dropdown`, `summary_html`, `figure`.
    """

    def __init__(self, history: Any, *, title: str | None = None, max_labels: int = 200) -> None:
        frame = history.frame() if hasattr(history, "frame") else history
        missing = [c for c in COLUMNS if c not in getattr(frame, "columns", ())]
        if not isinstance(frame, pd.DataFrame) or frame.empty or missing:
            raise ValueError("BeamTree needs a non-empty BeamHistory.frame() (RequestOutput.metrics['beam_history'])"
                             + (f"; missing columns {missing}" if missing else ""))
        self.frame = frame = frame.reset_index(drop=True)
        self.positions, self.parent_rows = tree_layout(frame)
        self.paths: dict[int, list[int]] = {}
        for i, rank in enumerate(frame["rank"]):
            if rank >= 0:
                chain = [i]
                while self.parent_rows[chain[-1]] >= 0:
                    chain.append(self.parent_rows[chain[-1]])
                self.paths[int(rank)] = chain[::-1]
        on_path = {i: r for r, rows in self.paths.items() for i in rows}
        alive = self._alive_rows()

        steps = int(frame["step"].max())
        height = max(2.5, 0.32 * (max(y for _, y in self.positions) + 2))
        fig, view, self._redraw = figure_widget((min(16.0, 2.0 + 0.55 * steps), height))
        self.figure = fig
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.6 / height, top=1 - 0.35 / height)
        ax = fig.add_subplot(1, 1, 1)
        self.ax = ax
        segs, colors, widths = [], [], []
        for i, (x, y) in enumerate(self.positions):
            px, py = self.positions[self.parent_rows[i]] if self.parent_rows[i] >= 0 else (0.0, 0.0)
            segs.append([(px, py), (x, y)])
            rank = on_path.get(i)
            colors.append(RANK_COLORS[rank % len(RANK_COLORS)] if rank is not None else ALIVE if i in alive else PRUNED)
            widths.append(1.8 if rank is not None else 0.8)
        self.edges = LineCollection(segs, colors=colors, linewidths=widths, zorder=1)
        ax.add_collection(self.edges)
        run = (frame["kind"] == "running").to_numpy()
        xy = np.array(self.positions)  # (rows, 2)
        node_colors = [RANK_COLORS[on_path[i] % len(RANK_COLORS)] if i in on_path else ALIVE if i in alive else PRUNED
                       for i in range(len(frame))]
        self.running_nodes = ax.scatter(xy[run, 0], xy[run, 1], s=18, c=[node_colors[i] for i in np.flatnonzero(run)],
                                        zorder=2)
        fin = ~run
        self.finished_nodes = ax.scatter(xy[fin, 0], xy[fin, 1], s=90, marker="*",
                                         c=[node_colors[i] for i in np.flatnonzero(fin)], zorder=3)
        ax.scatter([0], [0], s=40, marker="s", c="black", zorder=3)
        if len(frame) <= max_labels:
            for i, (x, y) in enumerate(self.positions):
                label = str(frame["text"][i]).replace("\n", "\\n")
                if frame["kind"][i] == "finished":
                    label += f"  {frame['score'][i]:.2f}"
                ax.annotate(label, (x, y), xytext=(2, 3), textcoords="offset points", fontsize=6,
                            color="#111827" if i in on_path or i in alive else "#9ca3af", clip_on=True)
        (self.selected_line,) = ax.plot([], [], color="black", linewidth=3.0, alpha=0.35, zorder=0)
        ax.set_xlim(-0.5, steps + 1.5)
        ax.set_ylim(max(y for _, y in self.positions) + 0.8, -0.8)
        ax.set_xlabel("step (generated token)")
        ax.set_ylabel("beam slot / finished")
        ax.set_title(title or f"beam search: {len(self.paths)} outputs, {int((~run).sum())} finished hypotheses, "
                     f"{steps} steps", fontsize=9)
        ax.grid(axis="x", color="#f3f4f6", linewidth=0.5)

        options = [("all outputs", ALL)] + [(f"output {r} (score {self._score(r):.3f})", r) for r in sorted(self.paths)]
        self.dropdown = widgets.Dropdown(options=options, value=ALL, description="output",
                                         layout=widgets.Layout(width="360px"))
        self.summary_html = widgets.HTML()
        self.dropdown.observe(lambda change: self._show(change["new"]), names="value")
        super().__init__([self.dropdown, self.summary_html, view])
        self._show(ALL)

    def _alive_rows(self) -> set[int]:
        """Rows with a descendant in the last step or a finished hypothesis: the branches that mattered."""
        last = int(self.frame["step"].max())
        alive: set[int] = set()
        for i in range(len(self.frame)):
            if int(self.frame["step"][i]) == last or self.frame["kind"][i] == "finished":
                j = i
                while j >= 0 and j not in alive:
                    alive.add(j)
                    j = self.parent_rows[j]
        return alive

    def _score(self, rank: int) -> float:
        return float(self.frame["score"][self.paths[rank][-1]])

    def tokens(self, rank: int) -> list[int]:
        """The token ids of output `rank`, read back from the tree."""
        return [int(self.frame["token"][i]) for i in self.paths[rank]]

    def _show(self, rank: int) -> None:
        if rank == ALL or rank not in self.paths:
            self.selected_line.set_data([], [])
            self.summary_html.value = ("<span style='font-size:smaller'>coloured: the returned outputs' paths; grey: "
                                       "beams that finished or survived; pale: pruned branches; stars: finished "
                                       "hypotheses with their length-penalised score</span>")
        else:
            pts = [(0.0, 0.0)] + [self.positions[i] for i in self.paths[rank]]
            self.selected_line.set_data([p[0] for p in pts], [p[1] for p in pts])
            rows = self.frame.loc[self.paths[rank]]
            text = "".join(map(str, rows["text"]))
            self.summary_html.value = (f"<b>output {rank}</b>: score {self._score(rank):.4f}, cumulative logprob "
                                       f"{float(rows['cumulative_logprob'].iloc[-1]):.4f}, {len(rows)} tokens: "
                                       f"<code>{html.escape(text)}</code>")
        self._redraw()
