"""kit.progress: the mode switch, bars in a real Jupyter kernel leave only text behind, and the
TensorRT progress monitor ends a phase that finished early with a complete bar."""

import io
import types

import nbformat
import pytest
from nbclient import NotebookClient

import kit.backends.tensorrt_common as trt_common
import kit.backends.tensorrt_lowering as trt_lowering
import kit.bench
import kit.builder
import kit.evaluation
import kit.llm
import kit.loader
import kit.quantization.quantizer
from kit.progress import MODES, progress_mode, tqdm

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def test_progress_mode_follows_the_environment(monkeypatch):
    assert MODES == ("auto", "notebook", "text", "off")
    monkeypatch.delenv("KIT_PROGRESS", raising=False)
    assert progress_mode() == "text"  # pytest is no Jupyter kernel
    for mode in ("text", "off", "notebook"):
        monkeypatch.setenv("KIT_PROGRESS", mode.upper())
        assert progress_mode() == mode
    monkeypatch.setenv("KIT_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="KIT_PROGRESS='fancy'.*allowed: auto, notebook, text, off"):
        progress_mode()


def test_text_and_off_modes(monkeypatch):
    monkeypatch.setenv("KIT_PROGRESS", "off")
    assert tqdm(range(3)).disable
    monkeypatch.setenv("KIT_PROGRESS", "text")
    buf = io.StringIO()
    with tqdm(total=4, desc="steps", file=buf) as bar:
        bar.update(4)
    assert type(bar).__module__ == "tqdm.std" and "steps: 100%" in buf.getvalue() and "4/4" in buf.getvalue()


def _fake_trt():
    class IProgressMonitor:
        def __init__(self):
            pass

    return types.SimpleNamespace(IProgressMonitor=IProgressMonitor)


def test_tensorrt_monitor_completes_a_phase_that_ends_early(monkeypatch):
    """'Building engine' announces 6 steps and finishes after 5; 'Timing tactics' 3 and finishes after 2."""
    made = []

    def recording_tqdm(*args, **kwargs):
        bar = tqdm(*args, file=io.StringIO(), **kwargs)
        made.append((bar, kwargs.get("position")))
        return bar

    monkeypatch.setenv("KIT_PROGRESS", "text")
    monkeypatch.setattr(trt_common, "tqdm", recording_tqdm)
    mon = trt_common.progress_monitor(_fake_trt())
    mon.phase_start("Building engine", None, 6)
    mon.phase_start("Timing tactics", "Building engine", 3)
    assert [(b.total, pos) for b, pos in made] == [(6, 0), (3, 1)]  # nested by depth
    for step in range(2):
        assert mon.step_complete("Timing tactics", step) is True
    mon.phase_finish("Timing tactics")
    for step in range(5):
        mon.step_complete("Building engine", step)
    mon.phase_finish("Building engine")
    assert [(b.n, b.total) for b, _ in made] == [(5, 5), (2, 2)]
    assert all(b.disable for b, _ in made)  # closed
    mon.step_complete("Building engine", 6)  # a late step of a finished phase is ignored


KERNEL_CELLS = [
    "import os\nos.environ.pop('KIT_PROGRESS', None)\n"
    "from kit.progress import progress_mode, tqdm\nprint(progress_mode())",
    "for _ in tqdm(range(3), desc='quiet', leave=False): pass",
    "for _ in tqdm(range(3), desc='kept'): pass",
    "bar = tqdm(total=5, desc='broken')\nbar.update(2)\nbar.close()",
    "import types\nimport kit.backends.tensorrt_common as b\n"
    "class M:\n    def __init__(self): pass\n"
    "mon = b.progress_monitor(types.SimpleNamespace(IProgressMonitor=M))\n"
    "mon.phase_start('Building engine', None, 6)\nmon.phase_start('Timing tactics', 'Building engine', 3)\n"
    "for i in range(2): mon.step_complete('Timing tactics', i)\nmon.phase_finish('Timing tactics')\n"
    "for i in range(5): mon.step_complete('Building engine', i)\nmon.phase_finish('Building engine')",
]


def test_notebook_bars_leave_only_text_in_a_real_kernel(tmp_path):
    """Executed in an IPython kernel (as JupyterLab or nbmake would): the stored outputs hold no
    widget reference (which would read "model not found" after a reopen) and no red bar."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in KERNEL_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outs = [c.outputs for c in nb.cells]
    assert outs[0][0]["text"].strip() == "notebook"
    for o in (o for cell in outs for o in cell):
        assert WIDGET_VIEW not in o.get("data", {}), o
    texts = ["".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in cell) for cell in outs]
    assert texts[1].strip() == ""  # leave=False: nothing left
    assert "kept: 100%" in texts[2] and "3/3" in texts[2]
    assert "broken:  40%" in texts[3] and "2/5 " in texts[3] and "(stopped)" in texts[3]
    assert texts[4].strip() == "" and "danger" not in str(outs[4])  # both TensorRT phases closed complete


def test_tqdm_module_imports_point_at_kit_progress():
    for mod in (kit.bench, kit.builder, kit.evaluation, kit.llm, kit.loader, kit.quantization.quantizer, trt_common,
                trt_lowering):
        assert mod.tqdm is tqdm, mod.__name__
