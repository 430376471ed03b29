import pytest

from priorzero_core.config import GameConfig, PPOConfig
from priorzero_core.ppo.adapter import ANSWER_PREFILL, PromptRecord
from priorzero_core.ppo.reward import RewardFunction, match_action, mcts_agreement, parse_answer

VALID = ["north", "open mailbox", "take egg", "examine leaflet"]


@pytest.mark.parametrize("text, finished, expected", [
    ("<think> hm </think> <answer> open mailbox </answer>", True, "open mailbox"),
    ("<answer>north</answer> trailing", True, "north"),
    ("<think> x </think> <answer> take egg", True, "take egg"),  # closed by EOS
    ("<think> x </think> <answer> take egg", False, None),  # cut off by the token cap
    ("no tags at all", True, None),
    ("<answer>   </answer>", True, None),
])
def test_parse_answer(text, finished, expected):
    assert parse_answer(text, finished) == expected


@pytest.mark.parametrize("answer, expected", [
    ("open mailbox", 1), ("Open the mailbox.", 1), ("n", 0), ("get egg", 2), ("x leaflet", 3),
    ("examine leaflett", 3), ("dance wildly", -1),
])
def test_match_action_exact_normalised_then_fuzzy(answer, expected):
    assert match_action(answer, VALID, cutoff=0.85) == expected


def test_agreement_is_relative_to_the_most_visited_action():
    assert mcts_agreement([0.1, 0.6, 0.3], 1) == 1.0
    assert mcts_agreement([0.1, 0.6, 0.3], 2) == pytest.approx(0.5)
    assert mcts_agreement([0.0, 0.0], 0) == 0.0


def test_reward_combines_replayed_game_reward_and_mcts_agreement(zork_segment, rom_dir):
    step = next(s for s in zork_segment.steps if s.reward > 0)  # "Get egg" from the tree: +5
    cfg = PPOConfig(game_reward_weight=0.1, mcts_agreement_weight=1.0, invalid_action_penalty=-2.0)
    record = PromptRecord("p", ANSWER_PREFILL, step.valid_actions, step.visit_dist, step.env_state, step.action, "e", 3)
    reward = RewardFunction(cfg, GameConfig(name="zork1", rom_dir=str(rom_dir)))
    try:
        good = reward.judge(record, " take egg </answer>", finished=True)
        assert good.valid and good.game_reward == 5.0 and good.agreement == 1.0
        assert good.reward == pytest.approx(0.1 * 5.0 + 1.0)
        other = reward.judge(record, " take nest </answer>", finished=True)
        assert other.valid and other.game_reward == 0.0 and 0 < other.agreement < 1
        bad = reward.judge(record, " fly away </answer>", finished=True)
        assert not bad.valid and bad.reward == -2.0
        clipped = RewardFunction(cfg.model_copy(update={"game_reward_weight": 100.0, "reward_clip": 3.0}),
                                 GameConfig(name="zork1", rom_dir=str(rom_dir)))
        assert clipped.judge(record, " take egg </answer>", True).reward == 3.0
        clipped.close()
    finally:
        reward.close()
