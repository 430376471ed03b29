import gzip

import pytest

from priorzero_core.errors import CheckpointError
from priorzero_core.replay import GameSegment, ReplayBuffer, StepRecord


def step(reward, value, terminal=False, truncated=False):
    return StepRecord("obs", ["a", "b"], 0, "a", reward, 0, [1.0, 0.0], value, terminal=terminal, truncated=truncated)


def test_value_targets_follow_the_episode_across_segments_and_stop_at_terminal():
    buf = ReplayBuffer(100, discount=0.5, n_step=2)
    first = GameSegment("e", 0, 0, [step(1, 10), step(2, 20)])
    second = GameSegment("e", 1, 2, [step(4, 40), step(8, 80, terminal=True)])
    buf.add([first, second])
    assert buf.value_target(first, 0) == pytest.approx(1 + 0.5 * 2 + 0.25 * 40)
    assert buf.value_target(first, 1) == pytest.approx(2 + 0.5 * 4 + 0.25 * 80)
    assert buf.value_target(second, 0) == pytest.approx(4 + 0.5 * 8)  # no bootstrap past the end
    assert buf.value_target(second, 1) == pytest.approx(8)


def test_value_target_bootstraps_where_collected_data_stops():
    buf = ReplayBuffer(100, discount=0.5, n_step=3)
    seg = GameSegment("f", 0, 0, [step(1, 10), step(2, 20)])
    buf.add([seg])
    assert buf.value_target(seg, 0) == pytest.approx(1 + 0.5 * 20)
    cut = GameSegment("g", 0, 0, [step(1, 10, truncated=True)])
    buf.add([cut])
    assert buf.value_target(cut, 0) == pytest.approx(10)


def test_sequences_pad_after_episode_end_and_carry_context():
    buf = ReplayBuffer(100, discount=0.9, n_step=1)
    a = GameSegment("e", 0, 0, [step(0, 0), step(1, 0)])
    b = GameSegment("e", 1, 2, [step(2, 0), step(3, 0, terminal=True)])
    buf.add([a, b])
    seq = buf.sequence(b, 0, length=4, context=3)
    assert [s and s.reward for s in seq.steps] == [2, 3, None, None]
    assert [s.reward for s in seq.context] == [0, 1]
    assert seq.value_targets.shape == (4,)
    assert len(buf.sample(7, 3, 1)) == 7


def test_with_absorbing_states_a_game_s_end_is_followed_by_steps_worth_nothing_but_a_cut_is_not():
    """world_model.absorbing: after a terminal step the sequence goes on in MuZero's absorbing state (empty
    observation, one of the last step's moves, reward 0, value target 0, no policy target); where the data stops
    without the game ending (truncated) nothing is known, so nothing follows."""
    import numpy as np
    import torch

    from priorzero_core.agent import sequences_to_wm_batch

    buf = ReplayBuffer(100, discount=0.9, n_step=2, absorbing=True)
    died = GameSegment("e", 0, 0, [step(0, 3), step(-10, 5, terminal=True)])
    cut = GameSegment("f", 0, 0, [step(1, 4), step(2, 6, truncated=True)])
    buf.add([died, cut])
    seq = buf.sequence(died, 0, length=4, context=0)
    assert [s.reward for s in seq.steps] == [0, -10, 0, 0]
    assert [s.observation for s in seq.steps[2:]] == ["", ""] and all(s.visit_dist == [] for s in seq.steps[2:])
    assert all(s.action in ("a", "b") for s in seq.steps[2:])
    np.testing.assert_allclose(seq.value_targets, [0.9 * -10, -10, 0, 0])
    assert buf.sequence(cut, 0, length=4, context=0).steps[2:] == [None, None]
    assert ReplayBuffer(100, 0.9, 2).sequence(died, 0, length=4, context=0).steps[2:] == [None, None]

    class Encoder:  # a text's embedding: its length and a constant
        def encode(self, texts):
            return torch.tensor([[float(len(t)), 1.0] for t in texts])

    batch = sequences_to_wm_batch([seq], Encoder(), 2, torch.device("cpu"))
    assert batch.step_mask.tolist() == [[True] * 4]  # reward and value losses after the end: 0 and 0
    assert batch.rewards.tolist() == [[0, -10, 0, 0]] and batch.policy_targets[0, 2:].sum() == 0


def test_reanalysed_targets_name_the_step_inside_the_sequence_they_bootstrap_from():
    """world_model.reanalyse: each collected step's target splits into its rewards and the discounted value of a
    later step of the same sequence; with the stored values put back the split gives the stored targets. Targets
    that end with the game, or bootstrap from past the sequence, and those of demonstrations keep their values."""
    import numpy as np

    buf = ReplayBuffer(100, discount=0.5, n_step=2)
    seg = GameSegment("e", 0, 0, [step(1, 10), step(2, 20), step(4, 40), step(8, 80), step(16, 160, terminal=True)])
    buf.add([seg])
    seq = buf.sequence(seg, 0, length=4, context=0, reanalyse=True)
    assert seq.bootstrap_offset.tolist() == [2, 2, -1, -1]  # steps 2 and 3 bootstrap from 4 (outside), end
    np.testing.assert_allclose(seq.value_partial[:2], [1 + 0.5 * 2, 2 + 0.5 * 4])
    np.testing.assert_allclose(seq.bootstrap_discount[:2], [0.25, 0.25])
    stored = np.array([s.root_value for s in seq.steps])
    rebuilt = seq.value_partial + seq.bootstrap_discount * stored[np.arange(4) + np.maximum(seq.bootstrap_offset, 0)]
    np.testing.assert_allclose(np.where(seq.bootstrap_offset >= 0, rebuilt, seq.value_targets), seq.value_targets)
    assert seq.value_targets[3] == pytest.approx(8 + 0.5 * 16)  # the game's end: nothing to bootstrap from
    cut = GameSegment("f", 0, 0, [step(1, 10), step(2, 20, truncated=True)])
    buf.add([cut])
    assert buf.sequence(cut, 0, length=3, context=0, reanalyse=True).bootstrap_offset.tolist() == [1, 0, -1]
    assert buf.sequence(seg, 0, length=4, context=0).bootstrap_offset is None  # off: no split
    buf.set_demos([GameSegment("d", 0, 0, [step(1, 3), step(2, 2), step(0, 0, truncated=True)])])
    demo, = buf.sample(1, 2, 0, demo_fraction=1.0, reanalyse=True)
    assert demo.bootstrap_offset is None  # a demonstration's targets are its exact returns


def test_capacity_evicts_oldest_segments():
    buf = ReplayBuffer(5, discount=0.9, n_step=1)
    for i in range(4):
        buf.add([GameSegment(f"e{i}", 0, 0, [step(i, 0), step(i, 0)])])
    assert len(buf) <= 5 and buf.segments[0].episode_id == "e2"


def test_segments_round_trip_on_disk_and_corrupt_files_are_reported(tmp_path):
    segs = [GameSegment("e", 0, 0, [step(1.5, 2.0), step(0, 1.0, terminal=True)], iteration=3)]
    path = ReplayBuffer.segment_file(tmp_path, 3, "abc")
    ReplayBuffer.write_segments(path, segs)
    loaded = ReplayBuffer.read_segments(path)
    assert loaded[0] == segs[0]
    buf = ReplayBuffer(100, 0.9, 1)
    assert buf.load_dir(tmp_path) == 1 and len(buf) == 2
    bad = ReplayBuffer.segment_file(tmp_path, 4, "bad")
    bad.write_bytes(gzip.compress(b'{"episode_id": "x"')[:-4])
    with pytest.raises(CheckpointError, match="corrupt"):
        ReplayBuffer.read_segments(bad)


def test_hazards_are_kept_apart_bounded_and_drawn_by_their_share():
    buf = ReplayBuffer(100, discount=0.9, n_step=2, seed=0, hazard_capacity=2)
    buf.add([GameSegment("play", 0, 0, [step(0, 0) for _ in range(6)])])
    for i in range(3):
        buf.add([GameSegment(f"h{i}", 0, 0, [step(-10, -10, terminal=True)], hazard=True)])
    assert len(buf) == 6 and [h.episode_id for h in buf.hazards] == ["h1", "h2"]  # the oldest went
    assert "h0" not in buf._episodes
    drawn = buf.sample(8, 2, 0, hazard_fraction=0.25)
    assert [s.steps[0].reward for s in drawn[-2:]] == [-10, -10] and [s.steps[1] for s in drawn[-2:]] == [None, None]
    assert all(s.steps[0].reward == 0 for s in drawn[:-2])
    assert [s.value_targets[0] for s in drawn[-2:]] == [-10, -10]


def test_hazard_segments_keep_the_losing_move_and_the_one_before_without_a_policy_target():
    from priorzero_core.collector import hazard_segments

    def s(reward, obs, terminal=False):
        return StepRecord(obs, ["a", "b"], 1, "b", reward, 0, [0.5, 0.5], 3.0, policy_target=[0.5, 0.5],
                          terminal=terminal, env_state="blob")

    back = [s(0, "c0"), s(0, "c1")]  # the trajectory the episode returned along
    first = GameSegment("e", 0, 5, [s(0, "o0"), s(-5, "o1"), s(0, "o2")], context=back, iteration=4)
    second = GameSegment("e", 1, 8, [s(0, "o3"), s(-10, "o4", terminal=True)], iteration=4)
    safe = GameSegment("f", 0, 0, [s(1, "p0"), s(0, "p1")], iteration=4)
    out = hazard_segments([second, safe, first], steps=2, context=3)
    assert [[x.observation for x in h.steps] for h in out] == [["o0", "o1"], ["o3", "o4"]]
    assert [[x.observation for x in h.context] for h in out] == [["c0", "c1"], ["o0", "o1", "o2"]]
    assert all(h.hazard and h.iteration == 4 for h in out) and len({h.episode_id for h in out}) == 2
    for h in out:
        assert all(x.visit_dist == [] and x.policy_target is None and x.env_state is None for x in h.steps)
        assert h.steps[-1].root_value == h.steps[-1].reward and h.steps[0].root_value == 3.0
    assert out[0].steps[-1].truncated and not out[1].steps[-1].truncated and out[1].steps[-1].terminal
    buf = ReplayBuffer(100, discount=0.5, n_step=5)
    buf.add(out)
    assert buf.value_target(out[0], 0) == pytest.approx(0.5 * -5) and buf.value_target(out[1], 1) == -10
    assert hazard_segments([first, second], steps=1, context=0)[0].context == []


def test_lambda_returns_mix_the_stored_values_into_the_n_step_return():
    """G_i = r_i + γ((1 − λ)V_{i+1} + λG_{i+1}), from the bootstrap value or the game's last reward."""
    steps = [step(1, 10), step(2, 20), step(4, 40), step(8, 80)]
    for lam, expected in ((1.0, 1 + 0.5 * 2 + 0.25 * 40),  # the n-step return
                          (0.0, 1 + 0.5 * 20),  # one-step TD
                          (0.5, 1 + 0.5 * (0.5 * 20 + 0.5 * (2 + 0.5 * 40)))):
        buf = ReplayBuffer(100, discount=0.5, n_step=2, td_lambda=lam)
        seg = GameSegment("e", 0, 0, list(steps))
        buf.add([seg])
        assert buf.value_target(seg, 0) == pytest.approx(expected)
        assert buf.sequence(seg, 0, 1, 0).value_targets[0] == pytest.approx(expected)
    buf = ReplayBuffer(100, discount=0.5, n_step=3, td_lambda=0.5)
    ended = GameSegment("f", 0, 0, [step(1, 10), step(2, 20, terminal=True)])
    cut = GameSegment("g", 0, 0, [step(1, 10), step(2, 20)])
    buf.add([ended, cut])
    assert buf.value_target(ended, 0) == pytest.approx(1 + 0.5 * (0.5 * 20 + 0.5 * 2))  # nothing after the end
    assert buf.value_target(cut, 0) == pytest.approx(1 + 0.5 * 20)  # the data stops: V of the last step stands in
