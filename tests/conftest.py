"""Session fixtures shared by the tests (the embedded model, tiny checkpoints), GPU skipping, and
the suite's wall time printed at the end of every run."""

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # NOTE: Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when a kit module that
    # defines kernels is first imported; any test module may import one first, so the CPU suite
    # sets it here, before every test module, for the interpreter tests of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

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


# NOTE: set when this conftest is imported (the start of collection) and reset at session start
# when pytest calls that hook here, so the figure covers collection, every test and every notebook.
_SUITE_START = time.perf_counter()


def pytest_sessionstart(session):
    global _SUITE_START
    _SUITE_START = time.perf_counter()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(f"suite wall time: {time.perf_counter() - _SUITE_START:.0f} s")
