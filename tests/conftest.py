"""Session fixtures shared by the tests (the embedded model, its quantized variants, tiny
checkpoints), GPU skipping, and the time report printed at the end of every run.

The time report: the suite's wall time, the 15 slowest tests (setup + call + teardown, so a session
fixture's cost shows on the first test that uses it) and the build-cache lookups (quantization and
result caches, from this process and from the notebooks' kernels, via KIT_CACHE_LOG). A test that
takes more than ~20 s gets `@pytest.mark.slow` (`make test-slow`, which CI runs after `make test`)
plus a short always-run version that checks the same thing on a smaller size.
"""

import importlib.util
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # NOTE: Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when a kit module that
    # defines kernels is first imported; any test module may import one first, so the CPU suite
    # sets it here, before every test module, for the interpreter tests of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # NOTE: `make test` runs the suite in one pytest-xdist worker per core; each worker's torch then
    # takes its share of the cores instead of all of them (oversubscribed threads slow every worker),
    # and so does every process the worker starts: a chapter's Jupyter kernel, a rank, the CLI (two
    # chapters run side by side on 2 cores took 57 and 35 s with 1 thread each, 68 and 47 s with 2)
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_share)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

# Test files that need an extra the machine may lack (a GPU box with only the core packages): the
# `make setup` machine has every extra, so there nothing is ignored.
_NEEDS = {
    "test_notebooks.py": ("nbformat", "nbclient", "ipywidgets"),
    "test_progress.py": ("nbformat", "nbclient", "ipywidgets"),
    "test_widgets.py": ("ipywidgets", "ipympl"),
    "test_loop_lanes.py": ("ipywidgets", "ipympl"),
    "test_beam_tree.py": ("ipywidgets", "ipympl"),
    "test_speculative_widget.py": ("ipywidgets", "ipympl"),
    "test_browser.py": ("nbformat", "jupyterlab"),
    "test_server.py": ("openai", "httpx", "fastapi", "uvicorn"),
    "test_llm_api_examples.py": ("xgrammar", "jsonschema"),
}
collect_ignore = [name for name, modules in _NEEDS.items()
                  if any(importlib.util.find_spec(m) is None for m in modules)]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty build cache of this test's own (KIT_CACHE_DIR), with no size limit."""
    d = tmp_path / "kit-cache"
    monkeypatch.setenv("KIT_CACHE_DIR", str(d))
    monkeypatch.delenv("KIT_CACHE_MAX_GB", raising=False)
    return d


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M model, loaded once in float32 on the CPU."""
    from kit.loader import ModelLoader

    return ModelLoader("smollm2-135m").load()


@pytest.fixture(scope="session")
def quantized_smollm2(smollm2):
    """`quantized_smollm2(name, **overrides)`: SmolLM2 quantized with preset `name`, made once a session.

    The calibration is notebook 05's (`calibration_texts()`, 8 windows of 128 tokens unless
    overridden), so the quantization cache entries the tests make are the ones the notebook reads.
    """
    from kit.datasets import calibration_texts
    from kit.quantization import QuantConfig, Quantizer

    made = {}

    def get(name, **overrides):
        overrides = {"calib_size": 8, "calib_max_seq_len": 128, **overrides}
        key = (name, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = Quantizer(QuantConfig.from_name(name, **overrides)).quantize(
                smollm2, calibration_texts(), progress=False)
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """One tiny random Hugging Face checkpoint per supported family: {family: (path, hf_model)}."""
    from helpers import FAMILY_CONFIGS, make_hf_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {fam: (root / fam, make_hf_checkpoint(fam, root / fam, seed=i)) for i, fam in enumerate(FAMILY_CONFIGS)}


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# NOTE: pytest calls `pytest_sessionstart` before it imports this conftest when the run names
# files or folders other than tests/ first, so the wall time is pytest's own session clock (which
# starts before collection), falling back to this module's import time.
_IMPORTED = time.perf_counter()
_DURATIONS: dict[str, float] = defaultdict(float)
SLOWEST = 15

if "KIT_CACHE_LOG" not in os.environ:  # set before any test or notebook kernel starts; kernels inherit it
    _fd, _path = tempfile.mkstemp(prefix="kit-cache-log-", suffix=".txt")
    os.close(_fd)
    os.environ["KIT_CACHE_LOG"] = _path


def pytest_runtest_logreport(report):
    _DURATIONS[report.nodeid] += report.duration


def _cache_lookups() -> str:
    path = os.environ.get("KIT_CACHE_LOG")
    try:
        lines = Path(path).read_text().split() if path else []
    except OSError:
        return "unknown"
    counts = Counter(zip(lines[0::3], lines[1::3]))
    return ", ".join(f"{cache} {counts[cache, 'hit']} hits / {counts[cache, 'miss']} misses"
                     for cache in sorted({c for c, _ in counts})) or "none"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    start = getattr(terminalreporter, "_session_start", None)
    wall = start.elapsed().seconds if hasattr(start, "elapsed") else time.perf_counter() - _IMPORTED
    tests = sum(_DURATIONS.values())
    terminalreporter.write_sep("=", f"time report: {len(_DURATIONS)} tests, {tests:.0f} s in tests")
    for nodeid, seconds in sorted(_DURATIONS.items(), key=lambda kv: -kv[1])[:SLOWEST]:
        terminalreporter.write_line(f"{seconds:8.1f} s {100 * seconds / max(tests, 1e-9):5.1f} %  {nodeid}")
    terminalreporter.write_line(f"build cache lookups: {_cache_lookups()}")
    terminalreporter.write_line(f"suite wall time: {wall:.0f} s")
