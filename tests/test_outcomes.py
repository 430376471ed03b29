"""Which moves lost the game where: the counts real play leaves, how a move's loss rate is read, what replaces it."""

import numpy as np

from priorzero_core.collector import Collector
from priorzero_core.config import GameConfig
from priorzero_core.games import EnvPool
from priorzero_core.games.base import TimeStep
from priorzero_core.outcomes import LossMemory, avoid_losses, place_keys, record
from test_collector import TO_THE_GRUE, Script


def state(response: str, look: str, inventory: str) -> TimeStep:
    from priorzero_core.games.base import agent_view

    return TimeStep(observation=agent_view(response, look, inventory), raw=response, score=0, reward=0.0, done=False,
                    moves=0, valid_actions=[], state_hash="")


def test_a_state_is_keyed_by_what_look_and_inventory_show_and_by_its_first_line():
    hall = state("You open the door.", "Hall\nA long hall.", "You carry a lamp.")
    assert place_keys(hall) == place_keys(state("Taken.", "Hall\nA long hall.", "You carry a lamp."))
    other = place_keys(state("Taken.", "Hall\nA long hall.", "You are empty-handed."))
    assert other[0] != place_keys(hall)[0] and other[1] == place_keys(hall)[1]  # the same room, another place
    assert place_keys(state("", "Cellar\nDamp.", ""))[1] != place_keys(hall)[1]


def test_a_moves_loss_rate_comes_from_its_place_when_tried_there_enough_else_from_its_room():
    armed = state("", "Porch\nA door leads in.", "You carry a gun.")
    unarmed = state("", "Porch\nA door leads in.", "You are empty-handed.")
    counts = {}
    for lost in (True, True, True, False):
        record(counts, unarmed, "enter", lost)
    record(counts, armed, "enter", False)
    memory = LossMemory(counts)
    assert memory.risk(unarmed, ["enter", "wait"], min_tries=3).tolist() == [0.75, 0.0]  # its place; "wait": unknown
    assert memory.risk(armed, ["enter"], min_tries=3).tolist() == [0.6]  # tried once there: the room's 3 of 5
    record(counts, armed, "enter", False)
    record(counts, armed, "enter", False)
    assert memory.risk(armed, ["enter"], min_tries=3).tolist() == [0.0]  # now its own place tells it apart
    assert LossMemory.from_json(memory.to_json()).counts == memory.counts
    assert memory.losing_moves() == 1  # (place, move) pairs: the unarmed porch's "enter"


def test_a_losing_choice_gives_way_to_the_best_ranked_safe_move_untried_first_else_the_least_risky():
    actions = ["north", "south", "jump"]
    rank = np.array([0.2, 0.1, 0.7])
    assert avoid_losses(rank, 0, np.array([0.4, 0.0, 1.0]), 0.5, actions, set()) == 0  # below the rate: kept
    assert avoid_losses(rank, 2, np.array([0.0, 0.0, 1.0]), 0.5, actions, set()) == 0
    assert avoid_losses(rank, 2, np.array([0.0, 0.0, 1.0]), 0.5, actions, {"north"}) == 1
    assert avoid_losses(rank, 2, np.array([0.0, 0.0, 1.0]), 0.5, actions, {"north", "south"}) == 0
    assert avoid_losses(rank, 2, np.array([0.9, 0.6, 1.0]), 0.5, actions, set()) == 1  # all lose: the least often
    assert avoid_losses(rank, 1, np.array([0.9, 0.6, 0.6]), 0.5, actions, set()) == 1  # the choice is among those
    # a move the loop rule's Q bound rules out (eval.break_loops_max_drop) comes after the safe moves it allows
    allowed = np.array([False, True, True])
    assert avoid_losses(rank, 2, np.array([0.0, 0.0, 1.0]), 0.5, actions, set(), allowed) == 1
    assert avoid_losses(rank, 2, np.array([0.0, 0.0, 1.0]), 0.5, actions, {"south"}, allowed) == 1
    assert avoid_losses(rank, 2, np.array([0.0, 1.0, 1.0]), 0.5, actions, set(), allowed) == 0


def test_collection_counts_every_move_by_where_it_was_taken_and_the_one_that_lost_zork(rom_dir):
    pool = EnvPool(GameConfig(name="zork1", rom_dir=str(rom_dir), valid_action_workers=0), 1, seed=0)
    try:
        collector = Collector(pool, Script(TO_THE_GRUE), segment_length=50, epsilon=0.0, rng=np.random.default_rng(0))
        segments, stats = collector.collect(len(TO_THE_GRUE))
        dark = pool.reset([0])[0]
        for move in TO_THE_GRUE[:-1]:
            dark = pool.step([move])[0]
    finally:
        pool.close()
    assert sum(tries for tries, _ in stats.outcomes.values()) == 2 * len(TO_THE_GRUE)  # each move under two keys
    lost = [key for key, (_, n) in stats.outcomes.items() if n]
    assert sorted(lost) == sorted((k, "south") for k in place_keys(dark))
    assert "pitch black" in dark.observation  # the cellar without a light
    memory = LossMemory()
    memory.add(stats.outcomes)
    assert memory.risk(dark, ["south", "north"], min_tries=1).tolist() == [1.0, 0.0]
