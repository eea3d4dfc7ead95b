# `make demo` and `make test` do all setup on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so that no multi-GB CUDA build is pulled by a dependency
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,mlir,bench,3d]'
	touch $(STAMP)

# the serve extra (Ray Serve) only for the tests: `make demo` stays Ray-free
$(SERVE_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[serve]'
	touch $(SERVE_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py

# loadfile: each test file runs on one worker, so its module fixtures (a compiled artifact, a Ray start) are made
# once, not once per worker (`--dist loadgroup` would group finer but ignores its marks with pytest 9)
test: $(SERVE_STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) build *.egg-info
