"""One way for every widget to own a matplotlib figure (`figure_widget`) and to store a picture of it
for readers without a kernel: `StaticFigure` puts a PNG beside the widget view in the output (GitHub,
nbviewer), and under ipympl the canvas's stored picture (`_data_url`, part of the widget state that
JupyterLab saves in the notebook with the project's `saveState` setting) is kept current
(`_PictureKeeper`), so a notebook reopened with a fresh kernel shows each figure as it was."""

from __future__ import annotations

import base64
import io
from typing import Any, Callable

import ipywidgets as widgets
import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

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
        # ipympl's manager sends every new picture to each of its web sockets, the canvas first
        fig.canvas.manager.web_sockets.append(_PictureKeeper(fig.canvas))
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


class _PictureKeeper:
    """A web socket of an ipympl figure manager that sets the canvas's stored picture to each picture sent.

    ipympl's front end sets the canvas model's `_data_url` from its canvas *before* the new
    picture is drawn there, so the widget state JupyterLab saves shows the picture before the
    last redraw (a KVCacheMap saved at step 4 reopens with step 3's blocks under the "step 4"
    label). This socket comes after the canvas: its update reaches the front end after the
    picture and replaces the stale `_data_url` with the picture just sent.
    """

    supports_binary = True

    def __init__(self, canvas: Any):
        self.canvas = canvas

    def send_json(self, content: dict[str, Any]) -> None:
        pass  # events are the canvas's business

    def send_binary(self, data: bytes) -> None:
        canvas = self.canvas
        rgba = np.asarray(canvas.get_renderer().buffer_rgba())  # (H, W, 4) uint8: the whole picture just sent
        buf = io.BytesIO()
        Image.fromarray(rgba).save(buf, format="png")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        canvas._data_url = url
        # NOTE: once its front end is up, ipympl's own send_state leaves `_data_url` out: send it here
        if not getattr(canvas, "syncing_data_url", True):
            widgets.DOMWidget.send_state(canvas, "_data_url")


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
