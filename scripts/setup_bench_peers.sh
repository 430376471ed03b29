#!/usr/bin/env bash
# Builds the two benchmark-only environments that benchmarks/mcts_peers.py compares the search against:
# LightZero 0.2.0's compiled ctree (with CPU torch) and mctx (CPU JAX). They never touch the project's .venv.
# Usage: scripts/setup_bench_peers.sh [DIR]   (default $PRIORZERO_BENCH_PEERS or ~/.cache/priorzero;
# makes DIR/bench-lightzero and DIR/bench-mctx)
set -euo pipefail
DIR=${1:-${PRIORZERO_BENCH_PEERS:-$HOME/.cache/priorzero}}
PY=${PYTHON:-python3.11}
export PIP_DISABLE_PIP_VERSION_CHECK=1
LZ=$DIR/bench-lightzero
MCTX=$DIR/bench-mctx
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" >"$CONSTRAINTS"  # the CPU wheel; nothing may pull a CUDA torch

[ -x "$LZ/bin/python" ] || "$PY" -m venv "$LZ"
# A plain `pip install lightzero` is unresolvable (DI-engine pins setuptools<=66.1.1, torch 2.13 needs >=77),
# so install both without their pins, then the few dependencies the ctree import path needs.
"$LZ/bin/python" -m pip install -q -c "$CONSTRAINTS" torch==2.13.0
"$LZ/bin/python" -m pip install -q --no-deps lightzero==0.2.0 DI-engine==0.5.3
"$LZ/bin/python" -m pip install -q -c "$CONSTRAINTS" numpy easydict cloudpickle DI-toolkit DI-treetensor pyyaml \
    requests flask urlobject tabulate tensorboardX gym
"$LZ/bin/python" - <<'PY'
import torch
from lzero.mcts import MuZeroMCTSCtree  # noqa: F401
assert torch.__version__.endswith("+cpu"), f"the LightZero venv got a non-CPU torch {torch.__version__}"
print(f"LightZero ctree ready: torch {torch.__version__}")
PY

[ -x "$MCTX/bin/python" ] || "$PY" -m venv "$MCTX"
"$MCTX/bin/python" -m pip install -q mctx jax jaxlib
"$MCTX/bin/python" -c "import jax, mctx; print(f'mctx ready: mctx {mctx.__version__}, jax {jax.__version__}')"
echo "peer venvs: $LZ $MCTX (used by benchmarks/mcts_peers.py)"
