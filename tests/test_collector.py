"""The collector's records of real Zork 1 play."""

import numpy as np
import pytest

from priorzero_core.agent import uniform_decision
from priorzero_core.collector import Collector
from priorzero_core.config import GameConfig
from priorzero_core.games import EnvPool

# West of House to the dark cellar without the lantern, where the next move meets the grue (score 35, then 25)
TO_THE_GRUE = ["north", "east", "open window", "west", "west", "push rug", "open trap door", "down", "south"]


class Script:
    """Plays `moves` in order, each one a valid action of its state."""

    def __init__(self, moves: list[str]):
        self.moves = list(moves)

    def act(self, views, mode="collect"):
        out = []
        for view in views:
            move = self.moves.pop(0)
            assert move in view.timestep.valid_actions, (move, view.timestep.valid_actions)
            d = uniform_decision(list(view.timestep.valid_actions), np.random.default_rng(0))
            d.action_index, d.action = d.valid_actions.index(move), move
            out.append(d)
        return out


@pytest.mark.parametrize("penalty", [0.0, 50.0])
def test_a_move_that_loses_the_game_is_stored_with_the_loss_penalty_and_nothing_else_is(rom_dir, penalty):
    pool = EnvPool(GameConfig(name="zork1", rom_dir=str(rom_dir), valid_action_workers=0), 1, seed=0)
    try:
        collector = Collector(pool, Script(TO_THE_GRUE), segment_length=50, epsilon=0.0,
                              rng=np.random.default_rng(0), loss_penalty=penalty)
        segments, stats = collector.collect(len(TO_THE_GRUE))
    finally:
        pool.close()
    steps = [s for seg in segments for s in seg.steps]
    assert [s.action for s in steps] == TO_THE_GRUE
    assert [s.reward for s in steps] == [0, 0, 0, 10, 0, 0, 0, 25, -10 - penalty]
    assert steps[-1].terminal and steps[-1].score == 25
    # the game's own points everywhere else: the episode's return and score
    assert stats.returns == [25.0] and stats.scores == [25]
