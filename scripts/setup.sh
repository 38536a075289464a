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
# Engines that need torch (image, asr extras) must get exactly torch==2.13.0 first (CPU build):
case "$extras" in
  *image*|*asr*|*all*) .venv/bin/python -m pip install --quiet "torch==2.13.0" ;;
esac
.venv/bin/python -m pip install --quiet -e ".[$extras]"
