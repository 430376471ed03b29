"""The Ray cluster a run's actors live on: collection shards (`collect.shards`) and PPO's actor groups."""

from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np

from .config import PriorZeroConfig

log = logging.getLogger("priorzero")


def local_cpus(cfg: PriorZeroConfig, ppo: bool) -> int:
    """Logical CPUs a local cluster needs so that every actor the run may start fits, even on a 2-core machine
    (torch threads are set per actor): the collection shards', and PPO's when it trains (`ppo`), vLLM engine
    actors included."""
    need = cfg.collect.shards * cfg.collect.shard_cpus if cfg.collect.shards > 1 else 0.0
    if ppo:
        from .ppo.generation import engine_kind

        actors = (2 if cfg.ppo.algorithm == "grpo" else 3) * cfg.ppo.dp_size + cfg.ppo.reward_workers
        actors += cfg.ppo.vllm_num_engines if engine_kind(cfg.ppo) == "actors" else 0
        need += actors * cfg.ppo.actor_num_cpus
    return max(os.cpu_count() or 1, int(np.ceil(need)))


def connect_ray(cfg: PriorZeroConfig, address: Optional[str], ppo: bool, who: str) -> bool:
    """Join `address`, or start a local single-node cluster on 127.0.0.1 sized by `local_cpus`; True when this
    call made the connection (its owner shuts it down). A connection already made is used as it is."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("%s: joined Ray cluster at %s (%d nodes)", who, address, len(ray.nodes()))
    else:
        # Ray nices its workers (15) by default; these actors are the training job itself and must not
        # starve behind the run's own world-model training or other jobs on the machine.
        os.environ.setdefault("RAY_worker_niceness", "0")
        num_cpus = local_cpus(cfg, ppo)
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
                 num_gpus=cfg.ppo.local_num_gpus, log_to_driver=True)
        log.info("%s: started a local Ray cluster (%d logical CPUs)", who, num_cpus)
    return True
