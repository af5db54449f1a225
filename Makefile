# The README's two commands: `make run` (serve the demo model) and `make test`.
# Both create .venv and install what they need; llama-cpp-python compiles from source
# once (minutes) and pip's wheel cache reuses it afterwards.
# CUDA: CMAKE_ARGS="-DGGML_CUDA=on" make install

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test lint smoke demo-model clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/vlserve serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

smoke:
	bash scripts/smoke.sh $(URL)

demo-model: $(STAMP)
	$(BIN)/vlserve make-demo-model models/demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
