"""Evaluation: greedy episodes from the game's start, mean and max; a greedy agent does not go round a loop."""

import numpy as np
import pytest

from priorzero_core.agent import Decision
from priorzero_core.evaluator import evaluate, untried_first
from priorzero_core.games.base import TimeStep

ACTIONS = ["open box", "close box", "leave"]


class BoxPool:
    """A deterministic toy game: the box opens and closes forever; "leave" ends the episode with 1 point."""

    size = 1

    def reset(self, indices):
        self.state = "closed"
        return [self._ts(0, False)]

    def step(self, actions, indices=None):
        (action,) = actions
        if action == "leave":
            return [self._ts(1, True)]
        self.state = "open" if action == "open box" else "closed"
        return [self._ts(0, False)]

    def _ts(self, score, done):
        return TimeStep(observation=f"The box is {self.state}.", raw="", score=score, reward=float(score), done=done,
                        moves=0, valid_actions=list(ACTIONS), state_hash=self.state)


class ToggleAgent:
    """Greedy and sure of itself: open a closed box, close an open one; "leave" ranked last."""

    def act(self, views, mode):
        out = []
        for view in views:
            best = 0 if "closed" in view.timestep.observation else 1
            target = np.array([0.1, 0.1, 0.05], dtype=np.float32)
            target[best] = 0.85
            out.append(Decision(valid_actions=list(ACTIONS), action_index=best, action=ACTIONS[best],
                                visit_dist=target, policy_target=target, root_value=0.0, llm_prior=None, prompt=None))
        return out


@pytest.mark.parametrize("break_loops, score, length", [(False, 0, 10), (True, 1, 4)])
def test_a_greedy_agent_back_in_a_state_takes_an_action_it_has_not_taken_there(break_loops, score, length):
    result = evaluate(BoxPool(), ToggleAgent(), ["wm"], num_episodes=2, max_steps=10, break_loops=break_loops)

    assert result.metrics["evals/reward_mean"] == score and result.metrics["evals/reward_max"] == score
    # Without: open, close, open, ... for all 10 steps. With: open, close, then back at "closed" (where "open box"
    # was taken) the next-ranked untried "close box" (a no-op), then "leave", the only action left untried there.
    assert result.metrics["evals/episode_length"] == length


def test_untried_first_keeps_the_choice_until_it_was_taken_then_follows_the_ranking():
    d = ToggleAgent().act([type("V", (), {"timestep": BoxPool().reset([0])[0]})()], "wm")[0]
    assert untried_first(d, set()) == 0
    assert untried_first(d, {"open box"}) == 1
    assert untried_first(d, {"open box", "close box"}) == 2
    assert untried_first(d, set(ACTIONS)) == 0


def test_untried_first_ranks_as_the_agent_acts():
    d = Decision(valid_actions=list(ACTIONS), action_index=1, action="close box",
                 visit_dist=np.array([0.25, 0.5, 0.25]), policy_target=np.array([0.1, 0.3, 0.6]), root_value=0.0,
                 llm_prior=None, prompt=None)
    assert untried_first(d, {"close box"}, act_on="improved") == 2
    assert untried_first(d, {"close box"}, act_on="visits") == 2  # tied visits: the policy target decides
    d.visit_dist = np.array([0.4, 0.5, 0.1])
    assert untried_first(d, {"close box"}, act_on="visits") == 0
