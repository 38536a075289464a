#!/usr/bin/env bash
# Set up and run the whole test suite (real nats-server, real llama.cpp on a generated GGUF).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "llama,dev"
exec .venv/bin/python -m pytest "$@"
