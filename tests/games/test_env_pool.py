import pickle

import pytest

from priorzero_core.config import GameConfig
from priorzero_core.games import EnvPool, make_env


@pytest.fixture(scope="module")
def pool(rom_dir):
    pool = EnvPool(GameConfig(name="zork1", rom_dir=str(rom_dir), valid_action_workers=2), 3, seed=5)
    yield pool
    pool.close()


def test_batched_steps_match_a_lone_env_stepping_the_same_actions(pool, rom_dir):
    pool.reset_all()
    actions = ["open mailbox", "north", "south"]
    batched = pool.step(actions)
    lone = make_env(GameConfig(name="zork1", rom_dir=str(rom_dir), valid_action_workers=0))
    try:
        for i, action in enumerate(actions):
            lone.reset(seed=5 + i)
            ts = lone.step(action)
            assert (ts.observation, ts.valid_actions, ts.state_hash) == (
                batched[i].observation, batched[i].valid_actions, batched[i].state_hash)
    finally:
        lone.close()


def test_none_actions_and_indices_leave_other_envs_untouched(pool):
    start = pool.reset_all()
    first = pool.step(["north", None, None])
    assert first[1] is start[1] and first[0].moves == 1
    only = pool.step(["south"], indices=[2])
    assert len(only) == 1 and only[0].moves == 1 and pool.envs[1].last is start[1]
    again = pool.reset([0])
    assert again[0].moves == 0 and again[0].state_hash == start[0].state_hash


def test_per_env_state_restores_in_a_fresh_pool(pool, rom_dir):
    pool.reset_all()
    pool.step(["open mailbox", None, None])
    saved = pickle.dumps(pool.get_state(0))
    took = pool.step(["take leaflet", None, None])[0]
    other = EnvPool(GameConfig(name="zork1", rom_dir=str(rom_dir), valid_action_workers=0), 1)
    try:
        other.reset_all()
        other.set_state(0, pickle.loads(saved))
        replayed = other.step(["take leaflet"])[0]
        assert (replayed.observation, replayed.score, replayed.state_hash, replayed.valid_actions) == (
            took.observation, took.score, took.state_hash, took.valid_actions)
    finally:
        other.close()
