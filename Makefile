# Every target does its own set-up: a .venv with facebatch installed editable.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch; pinned first so pip never pulls a multi-GB CUDA wheel.
TORCH_PIN ?= torch==2.13.0

.PHONY: run test bench compare-peers clean

$(BIN)/facebatch: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test,demo]"
	touch $(BIN)/facebatch

# The main job on the embedded default: local Ray over a small demo archive.
run: $(BIN)/facebatch
	$(BIN)/facebatch demo

# Two pytest workers, each taking whole test files (their module fixtures: one S3 server, one Ray
# instance): much of the suite waits on subprocesses, servers and S3 retry back-off, so two
# workers finish sooner even on 2 cores. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

test: $(BIN)/facebatch
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(BIN)/facebatch
	$(BIN)/python bench/bench_detector.py

# facebatch next to facenet-pytorch and dlib, side by side in one run (builds bench/.peers first).
compare-peers: $(BIN)/facebatch
	PYTHONPATH=$(CURDIR) $(BIN)/python bench/compare_peers.py $(COMPARE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
