#!/usr/bin/env bash
# Set up and run the whole test suite (real nats-server, real llama.cpp on a generated GGUF, and the
# image / speech-to-text / text-to-speech engines on tiny models the tests build). setup.sh installs
# torch==2.13.0 (CPU) first, so the extras never pull another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "llama,image,asr,tts,dev"
exec .venv/bin/python -m pytest "$@"
