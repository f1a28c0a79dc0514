#!/usr/bin/env bash
# Contract tests of exq's engine plugins against the real engine classes (CPU, Triton interpreter), in their own
# venv (.venv-engines): SGLang and vLLM are installed without their dependencies (their pins want CUDA torch) plus
# the light packages their layer modules import; torchvision is replaced by an import-only stub
# (tests/engine_stubs); vLLM runs on its CPU platform (VLLM_TARGET_DEVICE=cpu). One pytest process per engine: each
# initializes its own torch.distributed state.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-engines/bin/python ] || "$PY" -m venv .venv-engines
# shellcheck disable=SC1091
. .venv-engines/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
log=$(mktemp)
quiet() { "$@" >"$log" 2>&1 || { cat "$log" >&2; echo "setup failed: $*" >&2; exit 1; }; }
# shellcheck disable=SC2086
python -c 'import torch' 2>/dev/null || quiet pip install ${EXQ_TORCH:-torch==2.13.0}
quiet pip install "triton==3.6.0" "numpy<2.4"
quiet pip install --no-deps "sglang==0.5.23" "vllm==0.33.0"
quiet pip install orjson psutil pybase64 requests packaging pillow starlette msgspec pydantic pyzmq tqdm ipython \
    aiohttp "apache-tvm-ffi==0.1.11" dill sentencepiece "compressed-tensors==0.18.0" gguf einops openai \
    partial-json-parser cbor2 openai-harmony cachetools cloudpickle uvloop py-cpuinfo prometheus-client \
    "xgrammar==0.2.8" llguidance regex
quiet pip install -e ".[dev]"
rm -f "$log"
PYTHONPATH=tests/engine_stubs python -m pytest -q -m engines tests/test_plugin_sglang.py "$@"
VLLM_TARGET_DEVICE=cpu python -m pytest -q -m engines tests/test_plugin_vllm.py "$@"
