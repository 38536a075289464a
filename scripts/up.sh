#!/usr/bin/env bash
# Set up (first run only does real work) and start everything on this machine:
#   bash scripts/up.sh --demo                  # a tiny random-weight model, no download
#   bash scripts/up.sh --model ./my-model.gguf # your own GGUF, served under its file stem
#   LLM_ROUTER_EXTRAS=llama,image,asr,tts bash scripts/up.sh --model ./sd-pipeline-folder
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "${LLM_ROUTER_EXTRAS:-llama}"
exec .venv/bin/llm-router up "$@"
