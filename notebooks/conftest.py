"""Freshness of the committed chapters, checked inside nbmake's own run (one execution per notebook).

`pytest --nbmake notebooks` executes each chapter once. This hook wraps that run: after a
successful execution, every code cell tagged `deterministic` must print the same text as the
outputs stored in the committed notebook (`text/plain` results and stdout, addresses masked).
A mismatch fails the notebook's test with the cell and both texts, and `make notebooks`
regenerates the stored outputs. Cells whose output depends on timing stay untagged.

The same wrapper reads each executed cell's time (nbmake records it) and the run ends with the
slowest cells of all notebooks: `make test` runs nbmake with a per-cell limit, and this list shows
which cell to speed up (or to feed from the build cache) before it reaches that limit.
"""

from __future__ import annotations

import os
import re
import tempfile
from datetime import datetime
from pathlib import Path

import nbformat
import pytest
from nbmake.nb_result import NotebookError, NotebookResult
from nbmake.nb_run import NotebookRun

__all__ = ["cell_text", "stale_cells", "cell_seconds", "SLOW_NOTEBOOKS"]

DETERMINISTIC = "deterministic"
# Chapters whose cells read what `slow` tests put in the build cache (05: the quantized models and the
# comparison made by tests/test_quant_accuracy.py's `full` tests, minutes of CPU): marked `slow`, they
# run in `make test-slow` after those tests, each cell then within `make test`'s per-cell limit.
SLOW_NOTEBOOKS = frozenset({"05_quantization.ipynb"})
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def cell_text(cell) -> str:
    """The text a reader sees under a code cell: stdout and text/plain results, in order."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream" and out.get("name") == "stdout":
            parts.append(out["text"] if isinstance(out["text"], str) else "".join(out["text"]))
        elif out["output_type"] in ("execute_result", "display_data"):
            if "application/vnd.jupyter.widget-view+json" in out.get("data", {}):
                continue  # a widget (a progress bar, a figure): its text/plain is only a placeholder
            text = out.get("data", {}).get("text/plain")
            if text is not None:
                parts.append((text if isinstance(text, str) else "".join(text)) + "\n")
    return _ADDRESS.sub("0x…", "".join(parts)).rstrip()


def stale_cells(stored, executed) -> list[tuple[int, str, str]]:
    """(cell index, stored text, new text) of every `deterministic` cell whose text changed."""
    if len(stored.cells) != len(executed.cells):
        raise ValueError(f"stored notebook has {len(stored.cells)} cells, executed {len(executed.cells)}")
    stale = []
    for i, (old, new) in enumerate(zip(stored.cells, executed.cells)):
        if old.cell_type == "code" and DETERMINISTIC in old.get("metadata", {}).get("tags", []):
            if cell_text(old) != cell_text(new):
                stale.append((i, cell_text(old), cell_text(new)))
    return stale


def cell_seconds(nb) -> list[tuple[int, float]]:
    """(cell index, seconds) of every code cell that carries nbclient's execution times."""
    times = []
    for i, cell in enumerate(nb.cells):
        ex = cell.get("metadata", {}).get("execution", {})
        start, end = ex.get("iopub.execute_input") or ex.get("shell.execute_request"), ex.get("shell.execute_reply")
        if cell.cell_type == "code" and start and end:
            seconds = (datetime.fromisoformat(end.replace("Z", "+00:00"))
                       - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
            times.append((i, seconds))
    return times


SLOWEST_CELLS = 10
# NOTE: under pytest-xdist the notebooks execute in worker processes while the report is printed by the
# controller, so every process appends its cells' times to one file that the workers inherit by name
if "KIT_CELL_LOG" not in os.environ:
    _fd, _path = tempfile.mkstemp(prefix="kit-cell-log-", suffix=".tsv")
    os.close(_fd)
    os.environ["KIT_CELL_LOG"] = _path


def _cell_times() -> list[tuple[float, str, int]]:
    """(seconds, notebook, cell index) of every cell executed in this run, by any process."""
    try:
        rows = Path(os.environ["KIT_CELL_LOG"]).read_text().splitlines()
    except OSError:
        return []
    # NOTE: one row per (notebook, cell): a notebook executed again in the same run keeps its last time
    last = {(name, int(i)): float(t) for t, name, i in (row.split("\t") for row in rows if row.count("\t") == 2)}
    return [(t, name, i) for (name, i), t in last.items()]

# the runner as nbmake defines it, also when this module is imported a second time in one process
_execute = getattr(NotebookRun.execute, "__wrapped__", NotebookRun.execute)


def _execute_and_compare(self: NotebookRun) -> NotebookResult:
    stored = nbformat.read(str(self.filename), 4)
    result = _execute(self)
    with open(os.environ["KIT_CELL_LOG"], "a") as log:
        log.writelines(f"{t}\t{Path(self.filename).name}\t{i}\n" for i, t in cell_seconds(result.nb))
    if result.error is not None:
        return result
    stale = stale_cells(stored, result.nb)
    if stale:
        i, old, new = stale[0]
        trace = "\n\n".join(f"cell {j}: stored output\n{o}\n--- now\n{n}" for j, o, n in stale)
        result.error = NotebookError(
            summary=f"{Path(self.filename).name}: {len(stale)} deterministic cell(s) no longer print their stored "
                    f"output (first: cell {i}); run `make notebooks` and commit the result",
            trace=trace, failing_cell_index=i)
    return result


# NOTE: nbmake has no hook between executing a notebook and reporting it, so the check wraps its
# runner: the notebook still executes exactly once per `pytest --nbmake` run.
_execute_and_compare.__wrapped__ = _execute
NotebookRun.execute = _execute_and_compare


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    times = _cell_times()
    if not times or hasattr(config, "workerinput"):  # an xdist worker: the controller reports
        return
    terminalreporter.write_sep("=", f"slowest notebook cells ({len(times)} cells, "
                                    f"{sum(t for t, _, _ in times):.0f} s)")
    for seconds, name, i in sorted(times, reverse=True)[:SLOWEST_CELLS]:
        terminalreporter.write_line(f"{seconds:8.1f} s  {name} cell {i}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).name in SLOW_NOTEBOOKS:
            item.add_marker(pytest.mark.slow)
