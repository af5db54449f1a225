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

.PHONY: install run test lint smoke demo-model doctor clean

# llama-cpp-python goes first, on its own, with its build steps shown (it is the one that
# compiles); everything else installs quietly after it.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "==> creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "==> upgrading pip"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@bash scripts/install-llama-cpp.sh $(VENV)
	@echo "==> installing vlserve and its other dependencies"
	@$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)
	@echo "==> installed; check this box with: $(BIN)/vlserve doctor"

install: $(STAMP)

run: $(STAMP)
	@echo "==> starting vlserve: it loads the model and warms up, then logs 'ready: URL ...'"
	$(BIN)/vlserve serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

smoke:
	bash scripts/smoke.sh $(URL)

doctor: $(STAMP)
	$(BIN)/vlserve doctor $(ARGS)

demo-model: $(STAMP)
	$(BIN)/vlserve make-demo-model models/demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
