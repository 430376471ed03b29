import subprocess
import sys
import time

import jericho
import psutil
import pytest

from priorzero_core.config import GameConfig
from priorzero_core.games import EnvPool
from priorzero_core.games import valid_actions as va
from priorzero_core.games.tagger import install_tagger

real_filter = va.filter_candidates


def hang_north_of_house(env, state, candidates):
    """Stands in for a Jericho hang: never answers for the state north of the house."""
    env.set_state(state)
    if env.get_player_location().name == "North House":  # Jericho drops "of" from object names
        time.sleep(3600)
    return real_filter(env, state, candidates)


@pytest.fixture(scope="module")
def states(rom_dir):
    """(hash, state) for the start of Zork 1 and a few steps away, up to the living room's sword and lamp."""
    env = jericho.FrotzEnv(str(rom_dir / "zork1.z5"))
    env.reset()
    out = [(env.get_world_state_hash(), env.get_state())]
    for action in ("north", "east", "open window", "west", "west"):
        env.step(action)
        out.append((env.get_world_state_hash(), env.get_state()))
    env.close()
    return out


@pytest.fixture(scope="module")
def zork(rom_dir):
    install_tagger()
    env = jericho.FrotzEnv(str(rom_dir / "zork1.z5"))
    yield env
    env.close()


@pytest.fixture(scope="module")
def expected(zork, states):
    """In-process valid actions of `states`, what the workers must answer."""
    return [va.compute_valid_actions(zork, state) for _, state in states]


@pytest.fixture
def service(rom_dir):
    """Two workers, ready, with the game's shared cache emptied."""
    service = va.ValidActions(rom_dir / "zork1.z5", workers=2, timeout_s=60)
    service.cache.clear()
    service.wait_ready()
    yield service
    service.close()


def _outcomes(env, state, actions):
    """The (world state, score) each action leads to from `state`."""
    out = set()
    for action in actions:
        env.set_state(state)
        env.step(action)
        out.add((env.get_world_state_hash(), env.get_score()))
    env.set_state(state)
    return out


def _gone(pids):
    return all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in pids)


def test_lru_cache_forgets_the_least_recently_used():
    cache = va.LRUCache(2)
    cache.put("a", ["x"])
    cache.put("b", ["y"])
    assert cache.get("a") == ["x"]
    cache.put("c", ["z"])
    assert cache.get("b") is None and cache.get("a") == ["x"] and len(cache) == 2


def test_candidates_are_the_ones_jericho_lists(zork, rom_dir):
    """The faster lister makes Jericho's own candidate list, on states across the first rooms of the game."""
    walker = jericho.FrotzEnv(str(rom_dir / "zork1.z5"))
    walker.reset()
    visited = []
    for action in walker.get_walkthrough()[:40]:
        visited.append(walker.get_state())
        walker.step(action)
    walker.close()
    lister = va.CandidateLister(zork)
    for state in visited + visited[:3]:  # the repeats come from the lister's expansion cache
        zork.set_state(state)
        groups = zork._identify_interactive_objects(use_object_tree=True)
        names = zork._score_object_names({desc: sorted(objs) for desc, objs in sorted(groups.items())})
        ours = lister(state)
        assert ours == zork.act_gen.generate_actions(names)
        ours.clear()  # callers own what they get
    assert lister(visited[0]) and len({tuple(lister(s)) for s in visited}) > 5


def test_same_choices_as_jericho_get_valid_actions(zork, states):
    for _, state in states:
        ours = va.compute_valid_actions(zork, state)
        zork.set_state(state)
        theirs = zork.get_valid_actions(use_parallel=False)
        # Jericho breaks ties between commands with the same effect by set order; compare effects.
        assert len(ours) == len(theirs) and _outcomes(zork, state, ours) == _outcomes(zork, state, theirs)


def test_cached_and_worker_results_equal_uncached_calls(service, expected, states):
    assert service.batch(states[1:2]) == expected[1:2]  # one new state: both workers list it, each tests half
    service.cache.clear()
    assert service.batch(states[:3]) == expected[:3]  # three: each listed once, the list shared, tests split
    service.stats()
    first = service.batch(states + states[:2])  # duplicates inside a batch are computed once
    assert first == expected + expected[:2]
    hits, computed, seconds = service.stats()
    assert (hits, computed) == (5, 3) and seconds > 0
    assert all(service.cache.get(h) == e for (h, _), e in zip(states, expected))
    assert service.batch(states) == expected
    again = va.ValidActions(service.rom, workers=0)  # another user of the game shares the cache
    assert again.cache is service.cache and again.batch(states[:1]) == expected[:1]


def test_workers_start_on_a_new_state_while_the_caller_makes_the_next_request(service, expected, states):
    workers = [psutil.Process(pid) for pid in service.worker_pids()]
    idle_cpu = sum(sum(p.cpu_times()[:2]) for p in workers)
    started = []

    def requests():  # as EnvPool steps its envs: the second request is made after the first is handed out
        yield states[0]
        deadline = time.monotonic() + 30
        while sum(sum(p.cpu_times()[:2]) for p in workers) == idle_cpu and time.monotonic() < deadline:
            time.sleep(0.01)
        started.append(sum(sum(p.cpu_times()[:2]) for p in workers) > idle_cpu)
        yield states[1]

    assert service.batch(requests()) == expected[:2] and started == [True]


def test_an_error_while_drawing_requests_leaves_no_answer_behind_for_the_next_batch(service, expected, states):
    def failing():  # an env that raises while its state's predecessor is being computed
        yield states[0]
        raise RuntimeError("the env failed")

    with pytest.raises(RuntimeError, match="the env failed"):
        service.batch(failing())
    assert service.batch(states[1:3]) == expected[1:3]
    assert service.batch(states[:1]) == expected[:1]


@pytest.mark.parametrize("workers", [1, 2])  # with 2, a worker hangs after sharing the candidates
def test_a_hang_kills_and_replaces_the_worker_and_ends_only_that_episode(rom_dir, monkeypatch, workers):
    monkeypatch.setattr(va, "filter_candidates", hang_north_of_house)
    cfg = GameConfig(name="zork1", rom_dir=str(rom_dir), valid_action_workers=workers, valid_action_timeout_s=3)
    pool = EnvPool(cfg, 2)
    pool.valid_actions.cache.clear()  # earlier tests cached the state that hangs here
    try:
        pool.reset_all()
        hung = pool.valid_actions.worker_pids()
        t0 = time.monotonic()
        stuck, fine = pool.step(["north", "open mailbox"])
        assert time.monotonic() - t0 < 30
        assert stuck.done and stuck.truncated and stuck.info["truncated_reason"] == "valid_actions_timeout"
        assert not fine.done and "take leaflet" in fine.valid_actions  # answered by the replacement
        assert _gone(hung) and pool.valid_actions.worker_pids() != hung
        assert pool.valid_actions.cache.get(stuck.state_hash) is None  # failures are not cached
        replacement = pool.valid_actions.worker_pids()
    finally:
        pool.close()
    assert _gone(replacement)


def test_a_lone_new_state_that_hangs_both_workers_answers_none_and_replaces_both(rom_dir, monkeypatch, states):
    monkeypatch.setattr(va, "filter_candidates", hang_north_of_house)
    service = va.ValidActions(rom_dir / "zork1.z5", workers=2, timeout_s=3)
    try:
        service.cache.clear()
        service.wait_ready()
        hung = service.worker_pids()
        assert service.batch(states[1:2]) == [None]  # north of the house, listed and half-tested by each worker
        assert _gone(hung) and not set(service.worker_pids()) & set(hung)
        assert "open mailbox" in service.batch(states[:1])[0]  # the replacements answer
    finally:
        service.close()


def test_workers_stop_at_interpreter_exit_without_close(rom_dir):
    script = (
        "from priorzero_core.games.valid_actions import ValidActions\n"
        "if __name__ == '__main__':\n"
        f"    service = ValidActions({str(rom_dir / 'zork1.z5')!r}, workers=1)\n"
        "    print(*service.worker_pids())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1 and _gone(pids)
