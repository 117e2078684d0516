"""The widgets in a real browser: JupyterLab on 127.0.0.1, Debian's chromium driven by Playwright.

A generated notebook shows KVCacheMap, BatchingTimeline, LayerTimingView and QuantComparison
(under `%matplotlib widget`, as the chapters do) on small synthetic frames, after kit progress
bars (one of them a TensorRT progress monitor whose phases end early). The test runs all cells
and checks that each widget renders as a widget (not a text repr, no "Error displaying
widget"), that no red progress bar and no dead progress-bar widget is left, that every
dropdown shows a visible value, and that moving one control of each widget changes its
picture. Then it saves, reloads the page (the notebook is read back from disk) and checks
again; the saved file must carry a PNG beside each widget view. Last it stops the server
and opens the notebook on a new one (a fresh kernel, no widget model alive): with the
project's JupyterLab settings (`jupyter/lab/settings`, widget state saved in the notebook)
each widget is restored from the notebook with the picture it was saved with, and no
"Error displaying widget: model not found" appears. Screenshots go to
`test-artifacts/browser/` (or `$KIT_BROWSER_ARTIFACTS`).

Run with `make test-browser` (`pytest -m browser tests/test_browser.py`); skipped with the
reason when chromium, Playwright or JupyterLab is missing. Playwright's own browser download
is never used: `executable_path` points at the system chromium (`$KIT_CHROMIUM` to override).
"""

import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

# the notebook packages are the `notebook` extra: a machine without them (a GPU box) skips this file
nbformat = pytest.importorskip("nbformat")
Image = pytest.importorskip("PIL.Image")

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("KIT_BROWSER_ARTIFACTS", ROOT / "test-artifacts" / "browser"))
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# the JupyterLab settings the project ships; `make setup` copies them into `<venv>/share/jupyter/lab/settings`
LAB_SETTINGS = ROOT / "jupyter" / "lab" / "settings"


def _chromium() -> str | None:
    for name in (os.environ.get("KIT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[browser]')"
    try:
        import jupyterlab  # noqa: F401
        import ipympl  # noqa: F401
    except ImportError:
        return "JupyterLab / ipympl are not installed (the 'notebook' extra)"
    if _chromium() is None:
        return "no chromium on PATH (apt-get install -y chromium, or set KIT_CHROMIUM)"
    return None


# NOTE: `make test-browser` installs what the test needs and sets KIT_REQUIRE_BROWSER=1, so there
# a missing piece fails the run instead of skipping it
REQUIRED = bool(os.environ.get("KIT_REQUIRE_BROWSER"))
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(_missing() is not None and not REQUIRED, reason=f"browser test: {_missing()}")]

SETUP = """%matplotlib widget
import json, time, types
import pandas as pd
import kit.backends.tensorrt_common as trt_common
from kit.progress import tqdm
from widgets.batching import BatchingTimeline
from widgets.kv_cache import KVCacheMap
from widgets.layer_timing import LayerTimingView, profiles_json_frames
from widgets.quant_compare import QuantComparison

for _ in tqdm(range(4), desc="loading", leave=False):
    time.sleep(0.05)
for _ in tqdm(range(3), desc="kept bar"):
    time.sleep(0.05)

class _Monitor:  # stands in for tensorrt.IProgressMonitor: phases announce more steps than they take
    def __init__(self):
        pass

mon = trt_common.progress_monitor(types.SimpleNamespace(IProgressMonitor=_Monitor))
mon.phase_start("Building engine", None, 6)
mon.phase_start("Timing tactics", "Building engine", 3)
for i in range(2):
    mon.step_complete("Timing tactics", i)
mon.phase_finish("Timing tactics")
for i in range(5):
    mon.step_complete("Building engine", i)
mon.phase_finish("Building engine")
print("setup done")"""

KV_CELL = """def blocks(step, owners, states):
    return [{"step": step, "block_id": b, "owner_request_ids": o, "ref_count": len(o), "hash": None, "state": s,
             "num_tokens": 16 if s != "free" else 0} for b, (o, s) in enumerate(zip(owners, states))]
E, F, U, C = (), "free", "used", "cached"
history = pd.DataFrame(
    blocks(1, [("a",), ("a",), ("b",), E, E, E, E, E], [U, U, U, F, F, F, F, F])
    + blocks(2, [("a",), ("a",), E, ("c",), E, E, E, E], [U, U, C, U, F, F, F, F])
    + blocks(3, [("a", "d"), E, E, ("c",), ("d",), E, E, E], [U, C, C, U, U, F, F, F])
    + blocks(4, [E, E, E, ("c",), E, E, E, E], [C, C, C, U, C, F, F, F]))
KVCacheMap(history, title="8-block pool: a, b, c, d (d shares a's first block)")"""

BATCH_CELL = """sched = {1: ["A", "B"], 2: ["A", "B"], 3: ["A"], 4: ["A", "C"], 5: ["B", "C"], 6: ["B", "C"]}
stats = pd.DataFrame([{
    "iteration": it, "time_s": 0.01 * it, "duration_ms": 10.0, "request_ids": ids,
    "num_prefill_tokens": 8 if it in (1, 4, 5) else 0, "num_decode_tokens": len(ids) - (it in (1, 4, 5)),
    "batch_size": len(ids), "kv_blocks_used": 2 * len(ids), "kv_blocks_total": 4,
    "num_preemptions": int(it == 3), "preempted_request_ids": ["B"] if it == 3 else [], "num_waiting": 0}
    for it, ids in sched.items()])
BatchingTimeline(stats)"""

LAYER_CELL = """frames = profiles_json_frames(json.loads(open(PROFILES).read()))
LayerTimingView({k: v for k, v in frames.items() if k.startswith("smollm2")}, max_layers=20)"""

QUANT_CELL = """schemes = ["float", "int8_wo", "fp8", "fp8_pc_pt", "w8a8", "int8_sq", "int4_wo", "int4_awq"]
delta = [0.0, 0.3, 1.1, 0.6, 2.5, 1.4, 9.0, 5.0]
results = pd.DataFrame({"scheme": schemes, "ppl_delta_pct": delta, "kl_div": [d / 100 for d in delta],
                        "top1_agreement": [1 - d / 50 for d in delta],
                        "linear_weight_mib": [400, 200, 200, 200, 200, 200, 106, 106], "num_tokens": 2048})
speed = pd.DataFrame({"scheme": ["float", "fp8", "int8_wo", "int4_wo"], "tokens_per_s": [128.1, 173.9, 173.7, 153.6]})
errors = pd.DataFrame({"layer": ["emb", "q0", "mlp0", "q1", "mlp1", "head"],
                       "kind": ["embedding", "qkv_proj", "mlp", "qkv_proj", "mlp", "lm_head"],
                       "rel_mse": [0.0, 2e-4, 5e-4, 3e-4, 8e-4, 0.0]})
QuantComparison(results, speed=speed, layer_errors={"int4_wo": errors},
                speed_source="H100, Llama-3.1-8B, bench/results/quant_decode_h100.json",
                accuracy_source="synthetic numbers for this test")"""

# code cell index -> the widget it shows
WIDGET_CELLS = {1: "KVCacheMap", 2: "BatchingTimeline", 3: "LayerTimingView", 4: "QuantComparison"}


def _write_notebook(path: Path) -> None:
    profiles = ROOT / "bench" / "results" / "profiles_h100.json"
    cells = [SETUP, KV_CELL, BATCH_CELL, f"PROFILES = {str(profiles)!r}\n" + LAYER_CELL, QUANT_CELL]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Lab:
    """A JupyterLab server on 127.0.0.1 with a token, serving `root`; `restart()` starts a new one there.

    Its settings are the project's own (`jupyter/lab/settings`, what `make setup` installs into
    the venv) as the application settings dir, plus a temp user settings dir.
    """

    def __init__(self, root: Path):
        self.root, self.proc, self.log, self.url, self.token = root, None, None, "", ""
        app_settings = root / ".app-settings"
        shutil.copytree(LAB_SETTINGS, app_settings)
        self.app_settings = app_settings

    def start(self) -> None:
        port, self.token = _free_port(), secrets.token_hex(16)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "KIT_PROGRESS": "auto", "JUPYTER_CONFIG_DIR": str(self.root / ".config")}
        root = self.root
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
               f"--LabApp.app_settings_dir={self.app_settings}", f"--LabApp.user_settings_dir={root / '.settings'}",
               f"--LabApp.workspaces_dir={root / '.workspaces'}", "--ServerApp.allow_root=True"]
        self.log = open(root / "server.log", "a")
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (root / "server.log").read_text()[-3000:])
                time.sleep(0.5)

    def stop(self) -> None:
        """Stop the server and its kernels: every widget model in the kernel is gone."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self.log.close()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server serving a temp dir with the notebook."""
    if (why := _missing()) is not None:
        pytest.fail(f"KIT_REQUIRE_BROWSER is set but {why}")
    root = tmp_path_factory.mktemp("lab")
    _write_notebook(root / "widgets.ipynb")
    # every cell in the DOM (JupyterLab 4 renders only the visible ones by default), no news toast
    for plugin, settings in {"notebook-extension/tracker": {"windowingMode": "none"},
                             "apputils-extension/notification": {"fetchNews": "false"}}.items():
        f = root / ".settings" / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(settings))
    server = _Lab(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()


JS_PAGE_STATE = """() => {
  const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')];
  return {
    prompts: cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || ''),
    errors: document.body.innerText.split('\\n').filter(l => l.includes('Error displaying widget')),
    danger: document.querySelectorAll('.progress-bar-danger').length,
    progress: document.querySelectorAll('.jp-Notebook .widget-progress').length,
    cells: cells.map(c => {
      const out = c.querySelector('.jp-OutputArea');
      const selects = [...c.querySelectorAll('.widget-dropdown select')];
      return {
        widgets: c.querySelectorAll('.jp-OutputArea .jupyter-widgets.widget-vbox').length,
        canvases: c.querySelectorAll('.jupyter-matplotlib canvas').length,
        text: out ? out.innerText : '',
        dropdowns: selects.map(s => s.selectedIndex >= 0 ? s.options[s.selectedIndex].text.trim() : ''),
      };
    }),
  };
}"""


def _new_page(browser, console: list[str]):
    """A 1600 x 1000 page whose console messages are appended to `console`."""
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.on("console", lambda m: console.append(m.text))
    return page


def _state(page):
    return page.evaluate(JS_PAGE_STATE)


def _wait_all_ran(page, n_cells: int, timeout_s: float = 150) -> None:
    page.wait_for_function(
        """(n) => { const p = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
                     .map(e => e.textContent.trim());
                   return p.length === n && p.every(t => /^\\[\\d+\\]:?$/.test(t)); }""",
        arg=n_cells, timeout=timeout_s * 1000)


def _open(page, lab) -> None:
    page.goto(f"{lab.url}/lab/tree/widgets.ipynb?token={lab.token}")
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=90_000)
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext.session", timeout=90_000)


def _figure(page, index: int):
    """The live figure (the ipympl canvas) of code cell `index`."""
    return page.locator(".jp-Notebook .jp-CodeCell").nth(index).locator(".jupyter-matplotlib canvas").first


def _changes_picture(page, index: int, move, name: str) -> bool:
    fig = _figure(page, index)
    fig.scroll_into_view_if_needed()
    before = fig.screenshot()
    page.locator(".jp-Notebook .jp-CodeCell").nth(index).screenshot(path=str(ARTIFACTS / f"{name}-before.png"))
    move(page.locator(".jp-Notebook .jp-CodeCell").nth(index))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        page.wait_for_timeout(300)
        if fig.screenshot() != before:
            page.wait_for_timeout(300)
            page.locator(".jp-Notebook .jp-CodeCell").nth(index).screenshot(path=str(ARTIFACTS / f"{name}-after.png"))
            return True
    return False


def _slider_right(cell) -> None:
    handle = cell.locator(".widget-slider .noUi-handle").first
    handle.focus()
    handle.press("ArrowRight")


def _choose(label: str, index: int):
    def move(cell) -> None:
        cell.locator(".widget-dropdown", has_text=label).locator("select").select_option(index=index)
    return move


MOVES = {1: _slider_right, 2: _choose("request", 2), 3: _choose("compare", 1), 4: _choose("against", 1)}


JS_STEPS = """(el) => ({slider: el.querySelector('.widget-slider .widget-readout').textContent.trim(),
                       label: (el.querySelector('.widget-html-content b') || {}).textContent || ''})"""


def _check_play_keeps_label_with_slider(page) -> None:
    """KVCacheMap during Play: the label's step is the slider's step at every sample (17.7)."""
    kv = page.locator(".jp-Notebook .jp-CodeCell").nth(1)
    kv.scroll_into_view_if_needed()
    handle = kv.locator(".widget-slider .noUi-handle").first
    handle.focus()
    handle.press("Home")
    page.wait_for_function("(el) => el.querySelector('.widget-html-content b').textContent.startsWith('step 1')",
                           arg=kv.element_handle(), timeout=20_000)
    kv.locator(".widget-play button").first.click()
    seen, lagging = set(), []
    for _ in range(20):
        page.wait_for_timeout(120)
        s = kv.evaluate(JS_STEPS)
        if not s["label"].startswith(f"step {s['slider']}"):
            page.wait_for_timeout(150)  # two messages of one reply may straddle a sample: look again
            s = kv.evaluate(JS_STEPS)
            if not s["label"].startswith(f"step {s['slider']}"):
                lagging.append(s)
        seen.add(s["slider"])
    assert not lagging, f"the step label lagged the slider during Play: {lagging}"
    assert {"1", "2", "3", "4"} >= seen and len(seen) >= 3, seen  # it played


def _view_ids(nb: dict) -> list[str]:
    """The model ids of the widget views a saved notebook's outputs show."""
    return [o["data"][WIDGET_VIEW]["model_id"] for c in nb["cells"] for o in c.get("outputs", [])
            if WIDGET_VIEW in o.get("data", {})]


def _colours(png: bytes) -> int:
    """How many distinct colours a screenshot has (a blank canvas has one)."""
    return len(Image.open(io.BytesIO(png)).convert("RGB").getcolors(maxcolors=1 << 20) or [])


def _difference(a: bytes, b: bytes) -> float:
    """How far apart two screenshots are: the mean over 4x4-pixel cells of the largest channel difference
    (0-255; inf when their sizes differ). Cells average away anti-aliasing and resampling; a block,
    bar or marker that changed colour or moved stays far apart."""
    x, y = (np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) for png in (a, b))
    if x.shape != y.shape:
        return float("inf")
    h, w = x.shape[0] // 4 * 4, x.shape[1] // 4 * 4
    x, y = (z[:h, :w].reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3)) for z in (x, y))  # (H/4, W/4, 3)
    return float(np.abs(x - y).max(axis=-1).mean())


def _check_rendered(state, where: str) -> None:
    assert not state["errors"], f"{where}: {state['errors']}"
    assert state["danger"] == 0, f"{where}: a red progress bar"
    assert state["progress"] == 0, f"{where}: a progress-bar widget left in the outputs"
    for i, name in WIDGET_CELLS.items():
        cell = state["cells"][i]
        assert cell["widgets"] >= 1 and cell["canvases"] >= 1, f"{where}: {name} did not render as a widget: {cell}"
        assert "VBox(" not in cell["text"] and "Error displaying" not in cell["text"], f"{where}: {name}: {cell}"
        assert cell["dropdowns"] == [d for d in cell["dropdowns"] if d], f"{where}: {name} has a blank dropdown"


def test_widgets_render_react_and_survive_save_and_reload(lab):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    n_cells = 5
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        console: list[str] = []
        page = _new_page(browser, console)
        try:
            _open(page, lab)
            page.evaluate("() => window.jupyterapp.commands.execute('application:toggle-left-area')")
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            _wait_all_ran(page, n_cells)
            page.wait_for_function("() => document.querySelectorAll('.jupyter-matplotlib canvas').length >= 4",
                                   timeout=60_000)
            page.wait_for_timeout(1500)
            state = _state(page)
            page.screenshot(path=str(ARTIFACTS / "notebook.png"), full_page=True)
            assert "setup done" in state["cells"][0]["text"]
            assert "kept bar: 100%" in state["cells"][0]["text"]  # a finished bar stays as text
            _check_rendered(state, "after run")
            assert state["cells"][2]["dropdowns"] == ["(none)"]
            assert state["cells"][3]["dropdowns"][1] == "(none)"  # LayerTimingView's compare
            for i, name in WIDGET_CELLS.items():
                assert _changes_picture(page, i, MOVES[i], name), f"moving a control of {name} left its picture"
            _check_play_keeps_label_with_slider(page)
            page.wait_for_timeout(2500)  # Play has reached the last step
            live = {}
            for i in WIDGET_CELLS:
                _figure(page, i).scroll_into_view_if_needed()
                live[i] = _figure(page, i).screenshot(path=str(ARTIFACTS / f"{WIDGET_CELLS[i]}-figure-saved.png"))

            page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
            page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty",
                                   timeout=30_000)
            saved = json.loads((lab.root / "widgets.ipynb").read_text())
            for i, cell in enumerate(saved["cells"]):
                views = [o for o in cell["outputs"] if WIDGET_VIEW in o.get("data", {})]
                if i in WIDGET_CELLS:  # the live view and a PNG for readers without a kernel
                    assert len(views) == 1 and views[0]["data"]["image/png"], WIDGET_CELLS[i]
                else:  # progress bars left text, not widget references
                    assert not views, cell["outputs"]

            page.reload()  # read back from disk, widget models restored from the running kernel
            page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=90_000)
            page.wait_for_function("() => document.querySelectorAll('.jupyter-matplotlib canvas').length >= 4",
                                   timeout=60_000)
            page.wait_for_timeout(2000)
            state = _state(page)
            page.screenshot(path=str(ARTIFACTS / "notebook-reopened.png"), full_page=True)
            _check_rendered(state, "after save and reload")
            for i, name in WIDGET_CELLS.items():
                cell = page.locator(".jp-Notebook .jp-CodeCell").nth(i)
                cell.scroll_into_view_if_needed()
                cell.screenshot(path=str(ARTIFACTS / f"{name}-reopened.png"))
            assert not [m for m in console if "model not found" in m], console

            # a new server: a fresh kernel holds no widget model; the views are restored from the
            # widget state the notebook stored on save (`saveState` in the project's settings)
            lab.restart()
            _open(page, lab)
            # each widget output settles as a figure or as the error text this test looks for
            page.wait_for_function("() => document.querySelectorAll('.jupyter-matplotlib canvas').length >= 4 "
                                   "|| document.body.innerText.includes('Error displaying widget')", timeout=60_000)
            page.wait_for_timeout(2000)
            state = _state(page)
            page.screenshot(path=str(ARTIFACTS / "notebook-new-server.png"), full_page=True)
            _check_rendered(state, "reopened on a new server")
            for i, name in WIDGET_CELLS.items():
                cell = page.locator(".jp-Notebook .jp-CodeCell").nth(i)
                cell.scroll_into_view_if_needed()
                cell.screenshot(path=str(ARTIFACTS / f"{name}-new-server.png"))
                restored = _figure(page, i).screenshot(path=str(ARTIFACTS / f"{name}-figure-new-server.png"))
                assert _colours(restored) >= 8, f"{name}'s restored figure is blank"
                # NOTE: a figure stored one redraw behind (ipympl's own `_data_url`) is ~20 apart here
                assert _difference(live[i], restored) < 6, f"{name} reopened with another picture than saved"
            assert not [m for m in console if "model not found" in m], console
            stored = saved["metadata"].get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
            assert set(_view_ids(saved)) <= set(stored), "the saved notebook lacks the state of a widget it shows"
        finally:
            browser.close()


# outputs that show a picture: a widget view that rendered a widget (a trusted notebook), or an image that
# loaded (a notebook not run here yet is untrusted, so JupyterLab shows each widget's stored PNG, or
# ipympl's own HTML with the figure as an <img>)
JS_RESTORED = """() => [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')].filter(o =>
    (o.getAttribute('data-mime-type') === 'application/vnd.jupyter.widget-view+json'
     && o.querySelector('.jupyter-widgets'))
    || [...o.querySelectorAll('img')].some(i => i.complete && i.naturalWidth > 100)).length"""
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _shutdown_kernels(lab) -> None:
    """End every kernel of the server (opening a notebook starts one)."""
    base = f"{lab.url}/api/kernels?token={lab.token}"
    for k in json.loads(urllib.request.urlopen(base, timeout=10).read()):
        req = urllib.request.Request(f"{lab.url}/api/kernels/{k['id']}?token={lab.token}", method="DELETE")
        urllib.request.urlopen(req, timeout=10).read()


def test_every_chapter_reopens_as_stored_with_its_widgets_and_no_dead_outputs(lab):
    """Each chapter as committed (what a save wrote; no cell is run), as a student first opens it:
    every picture it stores shows (a widget's stored PNG, since a notebook not run here is untrusted),
    no "Error displaying widget", no red or left-over progress bar, every dropdown shows a value;
    a screenshot of each chapter."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "notebooks", lab.root / "chapters", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        console: list[str] = []
        page = _new_page(browser, console)
        try:
            for path in CHAPTERS:
                nb = json.loads(path.read_text())
                views = _view_ids(nb)
                pngs = sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
                assert all("image/png" in o["data"] for c in nb["cells"] for o in c.get("outputs", [])
                           if WIDGET_VIEW in o.get("data", {})), f"{path.name}: a widget view without its PNG"
                page.close()  # one page and a fresh workspace per chapter: only this notebook is open
                page = _new_page(browser, console)
                page.goto(f"{lab.url}/lab/workspaces/{path.stem}/tree/chapters/{path.name}?reset&token={lab.token}")
                page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=90_000)
                # each stored widget view settles as a restored figure, or as the error text looked for
                page.wait_for_function(f"(n) => ({JS_RESTORED})() >= n "
                                       "|| document.body.innerText.includes('Error displaying widget')",
                                       arg=pngs, timeout=60_000)
                page.wait_for_timeout(1000)
                state = _state(page)
                page.screenshot(path=str(ARTIFACTS / f"chapter-{path.stem}.png"), full_page=True)
                where = f"{path.name} reopened"
                assert not state["errors"], f"{where}: {state['errors']}"
                assert state["danger"] == 0, f"{where}: a red progress bar"
                assert state["progress"] == 0, f"{where}: a progress-bar widget left in the outputs"
                shown = page.evaluate(JS_RESTORED)
                assert shown >= pngs, f"{where}: {shown} pictures shown of {pngs} stored ({len(views)} widgets)"
                for i, cell in enumerate(state["cells"]):
                    assert "Error displaying" not in cell["text"], f"{where}, code cell {i}: {cell['text'][:200]}"
                    assert all(cell["dropdowns"]), f"{where}, code cell {i} has a blank dropdown"
                _shutdown_kernels(lab)
            assert not [m for m in console if "model not found" in m], console
        finally:
            browser.close()


def test_make_setup_installs_the_lab_settings_where_jupyterlab_reads_them(tmp_path):
    """`make setup` copies the shipped overrides into the venv's JupyterLab app dir, which reads them."""
    from jupyterlab.commands import get_app_dir
    from jupyterlab_server.settings_utils import _get_overrides

    venv = tmp_path / "venv"
    dry = subprocess.run(["make", "-n", "--no-print-directory", "setup", f"VENV={venv}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    installed = venv / "share" / "jupyter" / "lab" / "settings" / "overrides.d" / "kit.json"
    assert f"install -D -m 644 jupyter/lab/settings/overrides.d/kit.json {installed}" in dry, dry
    # the venv's JupyterLab: app dir `<prefix>/share/jupyter/lab`, overrides in its `settings/`
    if "JUPYTERLAB_DIR" not in os.environ:
        assert Path(get_app_dir()) == Path(sys.prefix) / "share" / "jupyter" / "lab"
    overrides, error = _get_overrides(str(LAB_SETTINGS))
    assert not error
    assert overrides == {"@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": True}}
