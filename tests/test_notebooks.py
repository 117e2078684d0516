"""The committed chapters: executed, with exercises that check themselves, listed in the course table.

Executing the chapters is nbmake's job (`pytest --nbmake notebooks`); `notebooks/conftest.py`
compares the `deterministic` cells' fresh output with the stored one during that same run. These
tests read the committed files only, so they take well under a second.
"""

import copy
import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CHAPTERS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
# the chapters this course promises in notebooks/README.md (later ones are added as they are written)
COURSE = ["01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11"]


def _freshness():
    spec = importlib.util.spec_from_file_location("notebook_freshness", NOTEBOOKS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def test_chapters_exist():
    assert [p.name[:2] for p in CHAPTERS][:5] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_every_code_cell_is_stored_executed(path):
    nb = nbformat.read(path, 4)
    unexecuted = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.execution_count is None]
    assert not unexecuted, f"{path.name}: code cells {unexecuted} have no execution_count; run `make notebooks`"
    counts = [c.execution_count for c in _code_cells(nb)]
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: executed out of order or partly: {counts}"
    errors = [i for i, c in enumerate(nb.cells) if any(o.output_type == "error" for o in c.get("outputs", []))]
    assert not errors, f"{path.name}: cells {errors} stored an error"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_deterministic_cells_have_stored_text(path):
    nb = nbformat.read(path, 4)
    fresh = _freshness()
    tagged = [c for c in _code_cells(nb) if "deterministic" in _tags(c)]
    assert len(tagged) >= 2, f"{path.name}: tag the cells whose output is deterministic"
    # a tagged cell that prints nothing checks nothing, unless it is an assert-only cell
    silent = [c.source[:60] for c in tagged if not fresh.cell_text(c) and "assert" not in c.source]
    assert not silent, f"{path.name}: deterministic cells without text output: {silent}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_exercises_have_solution_and_check(path):
    nb = nbformat.read(path, 4)
    cells = nb.cells
    solutions = [i for i, c in enumerate(cells) if "solution" in _tags(c)]
    assert 3 <= len(solutions) <= 5, f"{path.name}: {len(solutions)} exercises, expected 3 to 5"
    for n, i in enumerate(solutions, start=1):
        assert cells[i - 1].cell_type == "markdown" and cells[i - 1].source.startswith(f"### Exercise {n} ")
        assert cells[i].metadata.get("jupyter", {}).get("source_hidden") is True  # the solution is collapsed
        assert cells[i].source.startswith(f"# ✍ Exercise {n}: write your answer")
        check = cells[i + 1]
        assert "check" in _tags(check) and re.search(r"^\s*assert ", check.source, re.M), f"exercise {n}: no check"
        assert check.execution_count is not None and check.execution_count > cells[i].execution_count


def test_stale_output_is_detected():
    """The freshness comparison itself: equal texts pass, a changed deterministic output fails."""
    fresh = _freshness()
    stored = nbformat.read(NOTEBOOKS / "01_quickstart.ipynb", 4)
    assert fresh.stale_cells(stored, copy.deepcopy(stored)) == []
    executed = copy.deepcopy(stored)
    i = next(i for i, c in enumerate(executed.cells) if "deterministic" in _tags(c) and fresh.cell_text(c))
    out = next(o for o in executed.cells[i].outputs if o.output_type in ("stream", "execute_result"))
    if out.output_type == "stream":
        out.text = "changed\n" + out.text
    else:
        out.data["text/plain"] = "changed\n" + out.data["text/plain"]
    assert [j for j, _, _ in fresh.stale_cells(stored, executed)] == [i]
    # untagged cells (timings) may change freely
    j = next(j for j, c in enumerate(executed.cells) if c.cell_type == "code" and "deterministic" not in _tags(c))
    executed.cells[j].outputs = []
    assert [k for k, _, _ in fresh.stale_cells(stored, executed)] == [i]
    with pytest.raises(ValueError, match="cells"):
        fresh.stale_cells(stored, nbformat.v4.new_notebook())


def test_course_table_lists_every_chapter():
    readme = (NOTEBOOKS / "README.md").read_text()
    listed = re.findall(r"^\|\s*(\d\d)\s*\|", readme, re.M)
    assert listed == COURSE
    for path in CHAPTERS:
        assert f"({path.name})" in readme, f"{path.name} is not linked from notebooks/README.md"
