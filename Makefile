# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo ablation bench clean format

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests || true

format: $(STAMP)
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

demo: $(STAMP)
	$(BIN)/python -m ibkit demo --output_dir outputs/demo

ablation: $(STAMP)
	$(BIN)/python -m ibkit demo --output_dir outputs/ablation --ablation true

bench: $(STAMP)
	$(BIN)/python -m ibkit bench --size small --output_dir outputs/bench

clean:
	rm -rf outputs .pytest_cache
