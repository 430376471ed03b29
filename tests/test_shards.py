"""Collection shards (`collect.shards`): the archive mirrors and their merge, without Ray, then on a local Ray
cluster."""

import numpy as np
import pytest

from priorzero_core.archive import Archive, trace_steps
from priorzero_core.collector import Collector, UniformActor
from priorzero_core.config import ExploreConfig, load_config
from priorzero_core.games import EnvPool
from priorzero_core.ppo.env_state import state_bytes
from priorzero_core.shards import ArchiveSync, ShardArchive, shard_envs


def contents(archive: Archive) -> dict:
    """Everything a cell holds, traces as their actions and observations, snapshots as bytes."""
    return {key: (c.score, [(s.observation, s.action) for s in trace_steps(c.trace)], state_bytes(c.state),
                  c.times_chosen, c.times_seen) for key, c in archive.cells.items()}


def test_envs_split_evenly_and_keep_their_one_process_seeds():
    assert shard_envs(5, 2) == [(0, 3), (3, 2)]
    assert shard_envs(4, 4) == [(0, 1), (1, 1), (2, 1), (3, 1)]


def test_shard_mirrors_and_the_learner_s_archive_agree_after_every_merge_and_sync():
    """Two shards collect in turn from their mirrors (returns to archived cells included); the learner replays
    their events shard by shard. After shard 0's merge the learner's archive is shard 0's mirror exactly (traces
    rebuilt from their references, snapshots, counts), and each delta brings every mirror to the learner's."""
    cfg = load_config("debug", ["llm.enabled=false"])
    explore = ExploreConfig(from_start=0.25, steps=6)
    learner = Archive(explore, np.random.default_rng(0))
    sync = ArchiveSync(learner, 2)
    pools = [EnvPool(cfg.game, 2, seed=k * 2) for k in range(2)]
    mirrors = [ShardArchive(explore, np.random.default_rng(k + 1)) for k in range(2)]
    collectors = [Collector(pools[k], UniformActor(np.random.default_rng(10 + k), 20), 8, 0.0,
                            np.random.default_rng(20 + k), mirrors[k], explore, context=2) for k in range(2)]
    returns = 0
    try:
        for iteration in range(4):
            for mirror, delta in zip(mirrors, sync.deltas()):
                mirror.apply(delta)
                assert contents(mirror) == contents(learner)
            for k in range(2):
                segments, stats = collectors[k].collect(15, iteration)
                returns += stats.returns_to_cells
                assert stats.env_steps == 30 and sum(len(s.steps) for s in segments) == 30
                tips = mirrors[k].keep_local(collectors[k].running_traces())
                sync.merge(k, mirrors[k].new_nodes, mirrors[k].events, tips)
                if k == 0:
                    assert contents(learner) == contents(mirrors[0])
        assert returns > 0 and learner.updates >= len(learner.cells) > 5
        # a mirror started late (a restarted shard) gets everything at once
        sync.restart(1)
        late = ShardArchive(explore, np.random.default_rng(9))
        late.apply(sync.deltas()[1])
        assert contents(late) == contents(learner)
    finally:
        for pool in pools:
            pool.close()


def test_an_evaluation_of_a_sharded_run_starts_no_ray_actor(tmp_path):
    """`priorzero eval` builds a read-only Trainer from the run's config: no collection, so no shards."""
    import ray

    from priorzero_core.trainer import Trainer

    cfg = load_config("debug", ["llm.enabled=false", "collect.shards=2", "collect.num_envs=2"])
    trainer = Trainer(cfg, tmp_path, readonly=True, progress=False)
    try:
        assert isinstance(trainer.collector, Collector) and not ray.is_initialized()
    finally:
        trainer.close()


def test_more_shards_than_envs_is_a_config_error():
    from priorzero_core.errors import ConfigError

    with pytest.raises(ConfigError, match="collect.shards"):
        load_config("debug", ["collect.shards=3", "collect.num_envs=2"])


# 50 s (two local Ray clusters): in the slow set, which keeps the default suite within its 15 minutes
@pytest.mark.slow
def test_two_shards_on_ray_collect_what_one_process_does_survive_a_killed_shard_and_repeat_for_a_seed(
        tmp_path, process_tracker, caplog, monkeypatch):
    """The debug config with collect.shards=2 on a local Ray cluster: each collect brings num_envs x
    steps_per_iteration steps in well-formed segments and each shard its share of the search-free exploration;
    a shard killed mid-collect is started again and the stage keeps the other's steps; two runs with one seed
    write the same replay files."""
    import logging

    import ray

    from priorzero_core.replay import ReplayBuffer
    from priorzero_core.trainer import Trainer

    children, still_running = process_tracker
    before = children()
    overrides = ["llm.enabled=false", "collect.shards=2", "collect.num_envs=2", "collect.steps_per_iteration=6",
                 "collect.segment_length=4", "mcts.num_simulations=2", "explore.steps=3", "run.torch_threads=1",
                 "explore.random_steps=8", "explore.random_envs=2", "explore.hazard_fraction=0.2"]
    files = []
    for run in ("a", "b"):
        if run == "b":  # shard 0's actor is SIGKILLed in the middle of iteration 3's collect
            monkeypatch.setenv("PRIORZERO_FAULTS", "kill:shard0-collect@3")
        trainer = Trainer(load_config("debug", overrides), tmp_path / run, progress=False)
        try:
            assert len(set(trainer.collector.nodes)) == 1 and all(trainer.collector.nodes)
            for iteration in (1, 2):
                result = trainer.collect(iteration)
                assert result.metrics["collect/env_steps"] == 12 and result.metrics["explore/random_steps"] == 8
                segs = ReplayBuffer.read_segments(result.artifacts["replay"])
                assert sum(len(s.steps) for s in segs) == 12
                for seg in segs:  # each segment: consecutive steps of one episode, ended only at its last step
                    assert all(not (s.terminal or s.truncated) for s in seg.steps[:-1])
                trainer.train_world_model(iteration)
            files.append(sorted((p.name, p.read_bytes()) for p in (tmp_path / run / "replay").glob("*.jsonl.gz")))
            if run == "b":
                first = trainer.collector.shards[0]
                with caplog.at_level(logging.WARNING, logger="priorzero"):
                    result = trainer.collect(3)
                assert result.metrics["collect/env_steps"] == 6 and result.metrics["explore/random_steps"] == 4
                assert "1 of 2 shards returned; 6 env steps lost" in caplog.text
                assert trainer.collector.shards[0] is not first
                assert trainer.collect(4).metrics["collect/env_steps"] == 12
        finally:
            trainer.close()
    assert files[0] == files[1] and len(files[0]) == 2
    assert not ray.is_initialized() and still_running(children() - before) == []


@pytest.mark.slow
def test_the_debug_config_with_two_shards_and_ppo_runs_on_a_two_node_cluster_one_shard_a_node(
        tiny_llm_dir, prefect_server, debug_overrides, tmp_path):
    """`scripts/ray_two_nodes.sh`: a head and a second node on 127.0.0.1; `priorzero train debug` with
    collect.shards=2 and PPO joins it (`ray.address`), puts one shard on each node, completes and checkpoints."""
    import os
    import re
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from priorzero_core.ppo.strategy import free_port

    script = Path(__file__).resolve().parents[1] / "scripts" / "ray_two_nodes.sh"
    state = tempfile.mkdtemp(prefix="pz-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TWO_NODES_DIR": state}
    started = subprocess.run([str(script), "start", str(free_port())], env=env, capture_output=True, text=True,
                             timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        address = started.stdout.strip().rsplit("=", 1)[1]
        run = tmp_path / "run"
        overrides = [o for o in debug_overrides if not o.startswith(("run.run_dir=", "llm.enabled=", "collect.num_envs="))]
        cmd = [str(Path(sys.executable).with_name("priorzero")), "train", "debug", "--run-dir", str(run),
               "--iterations", "5", "--set", *overrides, "collect.shards=2", f"ray.address={address}",
               "collect.num_envs=2", "ppo.use_orz_trainer=true", "llm.enabled=true", f"llm.model={tiny_llm_dir}",
               "schedule.llm_train_freq=5", "ppo.rollout_batch_size=3", "ppo.train_batch_size=3", "ppo.n_samples_per_prompt=2", "ppo.critic_update_steps=2",
               "ppo.generate_max_tokens=8", "ppo.actor_num_cpus=0.5", "collect.shard_cpus=0.5",
               "eval.eval_freq=5"]
        done = subprocess.run(cmd, env={**os.environ, "PREFECT_API_URL": prefect_server,
                                        "PREFECT_HOME": str(tmp_path / "prefect-client")},
                              capture_output=True, text=True, timeout=1500)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        log = (run / "logs" / "train.log").read_text()
        nodes = re.findall(r"collection shard \d: envs \d+-\d+ on Ray node (\w+)", log)
        assert len(nodes) == 2 and nodes[0] != nodes[1], log[-2000:]
        assert "timing/ppo_train_s" in (run / "logs" / "metrics.jsonl").read_text()  # PPO trained at iteration 5
        assert (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("iter-000005*"))
    finally:
        subprocess.run([str(script), "stop"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
