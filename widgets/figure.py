"""One way for every widget to own a matplotlib figure: `figure_widget(figsize)`."""

from __future__ import annotations

import io
from typing import Callable

import ipywidgets as widgets
import matplotlib
from matplotlib.figure import Figure

__all__ = ["figure_widget"]


def figure_widget(figsize: tuple[float, float]) -> tuple[Figure, widgets.DOMWidget, Callable[[], None]]:
    """A figure, the widget that shows it, and the function that redraws it after an artist changed.

    Under `%matplotlib widget` (ipympl) the figure's canvas is itself a live widget.
    Otherwise (inline, Agg) the figure is rendered off-screen into an `ipywidgets.Image`
    whose PNG is replaced on every redraw: no pyplot state, no display() call.
    """
    backend = matplotlib.get_backend().lower()
    if "ipympl" in backend or backend == "widget":
        import matplotlib.pyplot as plt

        with plt.ioff():
            fig = plt.figure(figsize=figsize)
        fig.canvas.header_visible = False
        fig.canvas.toolbar_visible = False
        return fig, fig.canvas, fig.canvas.draw_idle
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    view = widgets.Image(format="png")

    def redraw() -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=fig.dpi)
        view.value = buf.getvalue()

    return fig, view, redraw
