#!/usr/bin/env bash
# Create .venv (once) and install LLM Router with the given extras (default: llama).
# pip's wheel cache is kept, so llama-cpp-python compiles only on a machine's first install.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-llama}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# Engines that need torch (image, asr extras; the tests' tiny-model builders) must get exactly
# torch==2.13.0 first (CPU build), or the extras would pull a CUDA torch:
case "$extras" in
  # TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) picks the CPU build on plain PyPI.
  *image*|*asr*|*all*) .venv/bin/python -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ;;
esac
.venv/bin/python -m pip install --quiet -e ".[$extras]"
