"""Evaluation: greedy episodes from the game's start, mean and max; a greedy agent does not go round a loop."""

import numpy as np
import pytest

from priorzero_core.agent import Decision
from priorzero_core.config import EvalConfig
from priorzero_core.evaluator import evaluate, untried_first
from priorzero_core.games.base import TimeStep
from priorzero_core.outcomes import LossMemory, record

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
    result = evaluate(BoxPool(), ToggleAgent(), ["wm"], EvalConfig(num_episodes=2, break_loops=break_loops), max_steps=10)

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


class CliffPool(BoxPool):
    """BoxPool where the last action, "jump", ends the episode losing 10 points."""

    actions = ["open box", "close box", "jump"]

    def step(self, actions, indices=None):
        (action,) = actions
        if action == "jump":
            return [TimeStep(observation="You fall.", raw="", score=-10, reward=-10.0, done=True, moves=0,
                             valid_actions=list(self.actions), state_hash="fallen")]
        self.state = "open" if action == "open box" else "closed"
        return [self._ts(0, False)]

    def _ts(self, score, done):
        ts = super()._ts(score, done)
        ts.valid_actions = list(self.actions)
        return ts


class WaryToggleAgent(ToggleAgent):
    """ToggleAgent whose search expects "jump" to lose 10 points and the box moves nothing."""

    def act(self, views, mode):
        decisions = super().act(views, mode)
        for d in decisions:
            d.valid_actions = list(CliffPool.actions)
            d.action = d.valid_actions[d.action_index]
            d.q_values = np.array([0.0, -0.5, -10.0], dtype=np.float32)
        return decisions


@pytest.mark.parametrize("max_drop, score, length", [(None, -10, 4), (0.5, 0, 10)])
def test_a_loop_is_broken_only_with_a_move_the_search_does_not_expect_to_lose_points(max_drop, score, length):
    result = evaluate(CliffPool(), WaryToggleAgent(), ["wm"], EvalConfig(num_episodes=1, break_loops_max_drop=max_drop),
                      max_steps=10)

    # Any untried move: open, close, then back at "closed" the untried "close box", then "jump" (-10). Within half
    # the Q range of the choice: "close box" (Q -0.5) still breaks the first loop, "jump" (-10) never does.
    assert result.metrics["evals/reward_mean"] == score
    assert result.metrics["evals/episode_length"] == length


def test_untried_first_without_q_values_or_with_a_flat_q_takes_any_untried_move():
    d = WaryToggleAgent().act([type("V", (), {"timestep": BoxPool().reset([0])[0]})()], "wm")[0]
    assert untried_first(d, {"open box", "close box"}, max_drop=0.5) == 0  # jump is ruled out: the choice stays
    d.q_values = np.zeros(3, dtype=np.float32)
    assert untried_first(d, {"open box", "close box"}, max_drop=0.5) == 2
    d.q_values = None
    assert untried_first(d, {"open box", "close box"}, max_drop=0.5) == 2


def test_a_loop_may_be_broken_with_a_move_the_search_expects_to_lose_nothing_on():
    """The loop's own move looks good (an imagined +10); ending the game (Q 0) may still break it, a fall may not."""
    d = WaryToggleAgent().act([type("V", (), {"timestep": BoxPool().reset([0])[0]})()], "wm")[0]
    d.q_values = np.array([10.0, 0.0, -10.0], dtype=np.float32)
    assert untried_first(d, {"open box"}, max_drop=0.25) == 1
    assert untried_first(d, {"open box", "close box"}, max_drop=0.25) == 0


class JumpyAgent(ToggleAgent):
    """Ranks "jump" first wherever it is: its search expects nothing bad of it."""

    def act(self, views, mode):
        decisions = super().act(views, mode)
        for d in decisions:
            d.valid_actions = list(CliffPool.actions)
            d.policy_target = d.visit_dist = np.array([0.2, 0.1, 0.7], dtype=np.float32)
            d.action_index, d.action = 2, "jump"
        return decisions


@pytest.mark.parametrize("lost, avoid, break_loops, score, length, avoided", [
    (3, True, True, 0, 10, 10.0),  # jump lost 3 of 3 times in both states: never taken, the box moves instead
    (3, True, False, 0, 10, 10.0),  # the same without loop breaking
    (1, True, True, -10, 1, 0.0),  # 1 of 3 is below eval.known_loss_rate 0.5: taken
    (3, False, True, -10, 1, None),  # avoidance off (the default): taken
])
def test_the_greedy_agent_avoids_a_move_its_experience_saw_lose_the_game_where_it_is(lost, avoid, break_loops, score,
                                                                                   length, avoided):
    counts = {}
    pool = CliffPool()
    for state in ("closed", "open"):
        pool.state = state
        for k in range(3):
            record(counts, pool._ts(0, False), "jump", lost=k < lost)
    rules = EvalConfig(num_episodes=2, avoid_known_losses=avoid, break_loops=break_loops)
    result = evaluate(pool, JumpyAgent(), ["wm"], rules, max_steps=10, losses=LossMemory(counts))

    assert result.metrics["evals/reward_mean"] == score and result.metrics["evals/episode_length"] == length
    assert result.metrics.get("evals/wm/avoided_losses") == avoided
    # the random baseline never avoids anything
    assert "evals/random/avoided_losses" not in evaluate(pool, JumpyAgent(), ["random"], rules, 10,
                                                         losses=LossMemory(counts)).metrics
