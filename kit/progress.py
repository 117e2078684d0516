"""Progress bars for everything the kit makes a person wait for: `tqdm(...)`, one call for all modules.

Why not plain `tqdm.auto`: in a Jupyter kernel it draws an ipywidgets bar, and a bar's
output keeps pointing at its widget model after the bar is gone. Save the notebook, reopen
it (or open it on GitHub, or after a kernel restart) and every such output reads "Error
displaying widget: model not found"; a bar closed before its total stays red forever.

What the kit does instead (mode "notebook", the default in a kernel): the bar is a live
ipywidgets bar while it runs, displayed under a display id; when it closes, that output is
*replaced* by plain text (the final status line for `leave=True` bars, an empty line for
`leave=False` ones) and the widget is closed. The stored notebook then holds only text:
nothing can go stale, nothing is red. A bar stopped early (an exception) keeps its line
of text with "(stopped)" so the reader sees where it stopped.

Outside a kernel (terminal, pytest, CI) the bars are ordinary text bars (`tqdm.std`).

`KIT_PROGRESS` forces a mode:

    notebook   the replaced widget bars above (needs an IPython kernel with ipywidgets)
    text       text bars (`tqdm.std`) that rewrite one line; in a kernel they write to
               stdout (stderr is shown on a red background) and store as one line of text
    off        no bars at all
    auto       (default) notebook in a Jupyter kernel with ipywidgets, else text

    from kit.progress import tqdm
    for layer in tqdm(layers, desc="quantizing", leave=False): ...
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from tqdm.std import tqdm as std_tqdm

__all__ = ["tqdm", "progress_mode", "NotebookBar", "MODES"]

MODES = ("auto", "notebook", "text", "off")


def _in_kernel() -> bool:
    """True inside an IPython kernel (JupyterLab, nbclient, VS Code), not in a terminal IPython."""
    if "ipykernel" not in sys.modules:
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def progress_mode() -> str:
    """The mode bars are drawn in now: 'notebook', 'text' or 'off' (`KIT_PROGRESS` resolved)."""
    mode = os.environ.get("KIT_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"KIT_PROGRESS={mode!r} is not a progress mode; allowed: {', '.join(MODES)}")
    if mode == "auto":
        mode = "notebook" if _in_kernel() and _has_ipywidgets() else "text"
    return mode


def _has_ipywidgets() -> bool:
    try:
        import ipywidgets  # noqa: F401  (an optional dependency: the `notebook` extra)
    except ImportError:
        return False
    return True


@functools.cache
def _notebook_class() -> type:
    # NOTE: imported lazily: tqdm.notebook imports ipywidgets and IPython, which a terminal
    # run of the kit never needs
    from IPython.display import display
    from tqdm.notebook import tqdm_notebook

    class _NotebookBar(tqdm_notebook):
        """A tqdm.notebook bar whose output turns into plain text when it closes."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._handle = None
            kwargs["display"] = False  # displayed below, with a display id that close() can update
            super().__init__(*args, **kwargs)
            if not self.disable and self.delay <= 0:
                self._show()

        def _show(self) -> None:
            self._handle = display(self.container, display_id=True)
            self.displayed = True

        def display(self, *args: Any, check_delay: bool = True, **kwargs: Any) -> None:
            if check_delay and self.delay > 0 and not self.displayed:
                self._show()
            super().display(*args, check_delay=False, **kwargs)

        def close(self) -> None:
            if self.disable:
                return
            stopped = bool(self.total) and self.n < self.total
            text = f"{self} (stopped)" if stopped else (str(self) if self.leave else "")
            # std's close only: tqdm_notebook.close would paint the bar red or green first
            std_tqdm.close(self)
            handle, self._handle = self._handle, None
            if handle is not None:
                try:
                    handle.update({"text/plain": text}, raw=True)
                except Exception:  # noqa: BLE001  (interpreter shutdown: no kernel to talk to)
                    pass
            container = getattr(self, "container", None)
            if container is not None:
                container.close()

    return _NotebookBar


def NotebookBar(*args: Any, **kwargs: Any) -> std_tqdm:
    """A notebook bar that leaves only text behind (mode 'notebook', whatever `KIT_PROGRESS` says)."""
    return _notebook_class()(*args, **kwargs)


def tqdm(*args: Any, **kwargs: Any) -> std_tqdm:
    """A progress bar in the current mode; takes `tqdm.tqdm`'s arguments and returns a tqdm instance."""
    mode = progress_mode()
    if mode == "off":
        kwargs["disable"] = True
        return std_tqdm(*args, **kwargs)
    if mode == "notebook":
        return _notebook_class()(*args, **kwargs)
    if _in_kernel() and kwargs.get("file") is None:
        kwargs["file"] = sys.stdout  # stderr would draw the line on a red background
        # NOTE: nested positions move the cursor with escape codes a notebook cannot interpret
        kwargs.pop("position", None)
    return std_tqdm(*args, **kwargs)
