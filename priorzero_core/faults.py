"""Test hook: faults injected at named points from $PRIORZERO_FAULTS, for the reliability tests.

PRIORZERO_FAULTS=collect@2,kill:checkpoint-write@3,hang:train_world_model@4 — `point@N` raises at that point
in iteration N (every attempt), `once:` raises only the first time (so a retry succeeds), `kill:` SIGKILLs this
process there, `hang:` sleeps until a stage timeout interrupts it. Points are the stage names (at the stage's
start), `collect-step` and `train_world_model-update` (mid-stage: after the stage's first env step or first
update), `checkpoint-write` (parts written, manifest not yet), `checkpoint-done` (committed, the iteration's
metrics row and MLflow batch not yet written) and `shard<K>-collect` (collection shard K's collect, in its Ray
actor, after it took the weights and the archive).
Unset in normal runs, where `inject` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time

FAULTS_ENV = "PRIORZERO_FAULTS"
_fired: set[str] = set()  # the `once:` faults that have fired in this process


def inject(point: str, iteration: int) -> None:
    for item in os.environ.get(FAULTS_ENV, "").split(","):
        kind, _, where = item.strip().rpartition(":")
        if where != f"{point}@{iteration}":
            continue
        if kind == "once":
            if where in _fired:
                continue
            _fired.add(where)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            while True:  # short sleeps: a task timeout's async exception lands between them
                time.sleep(0.1)
        raise RuntimeError(f"injected fault {point}@{iteration} (from ${FAULTS_ENV})")
