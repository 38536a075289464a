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
# llama-cpp-python is compiled from source here. With the CUDA toolkit (nvcc) on the PATH or in
# CUDA_HOME, it is built with CUDA, so a GPU node offloads every layer (--gpu-layers limits it);
# CMAKE_ARGS, when set, wins: -DGGML_METAL=on (Apple; on by default there), -DGGML_VULKAN=on,
# -DGGML_HIP=on (ROCm), -DGGML_SYCL=on (Intel). The node's heartbeat says which backend each
# runtime really uses (`llm-router nodes`, GET /v0/nodes: runtimes[].backend).
case "$extras" in
  *llama*|*all*)
    nvcc_bin="$(command -v nvcc || true)"
    if [ -z "$nvcc_bin" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
      nvcc_bin="$CUDA_HOME/bin/nvcc"
    fi
    # The toolkit alone is not enough: a machine with nvcc but no NVIDIA GPU (a CI image) keeps
    # the CPU build, and a GPU build that fails to compile falls back to it instead of failing setup.
    gpu_seen=""
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu_seen=1; fi
    if [ -z "${CMAKE_ARGS:-}" ] && [ -n "$nvcc_bin" ] && [ -n "$gpu_seen" ]; then
      echo "CUDA toolkit ($nvcc_bin) and an NVIDIA GPU found: building llama-cpp-python with CUDA" >&2
      export CMAKE_ARGS="-DGGML_CUDA=on" CUDACXX="$nvcc_bin"
    fi
    offloads="$(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.llama_supports_gpu_offload())' 2>/dev/null || true)"
    if [ -n "${CMAKE_ARGS:-}" ] && [ "$offloads" != "True" ]; then
      # Not the cached CPU wheel: compiled again for the backend (once; a GPU build is kept).
      if ! .venv/bin/python -m pip install --quiet --no-cache-dir --force-reinstall --no-deps "llama-cpp-python>=0.3.16"; then
        echo "llama-cpp-python did not build with CMAKE_ARGS=$CMAKE_ARGS: keeping the CPU build" >&2
        unset CMAKE_ARGS CUDACXX
      fi
    fi
    ;;
esac
.venv/bin/python -m pip install --quiet -e ".[$extras]"
