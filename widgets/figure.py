"""One way for every widget to own a matplotlib figure (`figure_widget`) and to store a picture of it
(`StaticFigure`: a PNG beside the widget view in the output, for readers without a kernel)."""

from __future__ import annotations

import base64
import io
from typing import Any, Callable

import ipywidgets as widgets
import matplotlib
from matplotlib.figure import Figure

__all__ = ["figure_widget", "figure_png", "StaticFigure"]


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
        view.value = figure_png(fig)

    return fig, view, redraw


def figure_png(fig: Figure, dpi: float | None = None) -> bytes:
    """The figure as PNG bytes, as it looks now."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi)
    return buf.getvalue()


class StaticFigure:
    """Mixin for a widget with a `figure`: its display bundle also carries a PNG of that figure.

    JupyterLab draws the live widget (the widget view is the richer output); the PNG is what
    a viewer without the widget models shows: GitHub, nbviewer, a notebook whose kernel is
    gone. It is taken when the widget is displayed, so it shows the controls' state then.
    """

    figure: Figure

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = super()._repr_mimebundle_(**kwargs)  # type: ignore[misc]  (ipywidgets.Widget's)
        bundle = dict(bundle or {})
        bundle["image/png"] = base64.b64encode(figure_png(self.figure)).decode("ascii")
        return bundle
