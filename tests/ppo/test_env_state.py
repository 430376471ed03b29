import numpy as np
import pytest

from priorzero_core.games.base import TimeStep
from priorzero_core.games.jericho_env import JerichoState
from priorzero_core.ppo.env_state import decode_state, encode_state


def test_jericho_snapshot_round_trips_with_arrays_bytes_and_tuples():
    frotz = (np.arange(10, dtype=np.uint8), np.zeros(4, dtype=np.uint16), 7, 3, (1, 2), b"\x00\xffrng")
    last = TimeStep("obs", "raw", 5, 1.0, False, 3, ["north"], "abc", info={"game_moves": 3})
    state = JerichoState(frotz, 3, last)
    back = decode_state(encode_state(state))
    assert isinstance(back, JerichoState) and back.steps == 3 and back.last == last
    assert back.frotz[0].dtype == np.uint8 and np.array_equal(back.frotz[0], frotz[0])
    assert back.frotz[1].dtype == np.uint16 and back.frotz[4] == (1, 2) and back.frotz[5] == b"\x00\xffrng"


def test_textworld_history_round_trips():
    assert decode_state(encode_state(("open door", "go east"))) == ("open door", "go east")


def test_decoding_refuses_unknown_types_and_foreign_strings():
    with pytest.raises(TypeError):
        encode_state(object())
    with pytest.raises(ValueError):
        decode_state("gASVCAAAAAAAAACMBHBvc3iUjAZzeXN0ZW2Uk5Qu")  # a pickle, not ours


def test_a_real_zork_state_replays_the_same_reward(zork_segment, rom_dir):
    from priorzero_core.config import GameConfig
    from priorzero_core.ppo.reward import GameReplayer

    step = next(s for s in zork_segment.steps if s.reward > 0)
    replayer = GameReplayer(GameConfig(name="zork1", rom_dir=str(rom_dir)))
    try:
        assert replayer.reward(step.env_state, step.action) == step.reward
    finally:
        replayer.close()
