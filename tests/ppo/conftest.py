"""PPO test helpers: the tiny-model config and a check that a process tree has really gone."""

import time

import psutil
import pytest

from priorzero_core.config import PriorZeroConfig


@pytest.fixture
def tiny_ppo_config(tiny_llm_dir, rom_dir):
    """Build the tiny LM on Zork 1 with sizes that make one PPO step take seconds; keyword args override `ppo`."""

    def build(**ppo) -> PriorZeroConfig:
        settings = dict(rollout_batch_size=3, train_batch_size=3, n_samples_per_prompt=2, critic_update_steps=2,
                        generate_max_tokens=8, max_prompt_tokens=256, history_length=1, think=False, actor_num_cpus=0.5)
        settings.update(ppo)
        return PriorZeroConfig.model_validate({
            "game": {"name": "zork1", "rom_dir": str(rom_dir)},
            "llm": {"model": str(tiny_llm_dir)},
            "ppo": settings,
        })

    return build


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def still_running(pids: set[int], timeout: float = 60.0) -> list[psutil.Process]:
    """Processes among `pids` still alive after up to `timeout` seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


@pytest.fixture
def process_tracker():
    """`(children, still_running)` helpers for leak checks."""
    return children, still_running
