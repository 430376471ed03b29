import subprocess
import sys
import textwrap

import jericho
import pytest

from priorzero_core.games.tagger import install_tagger, jericho_util, tag


@pytest.fixture(scope="module")
def zork(rom_dir):
    install_tagger()
    env = jericho.FrotzEnv(str(rom_dir / "zork1.z5"))
    env.reset()
    yield env
    env.close()


def test_tags_the_words_jericho_reads_as_objects():
    tokens = tag("There is a small mailbox here. You see a brass lantern and the Troll.")
    pos = {t.text: t.pos_ for t in tokens}
    assert pos["mailbox"] == pos["lantern"] == "NOUN"
    assert pos["small"] == pos["brass"] == "ADJ"
    assert pos["Troll"] == "PROPN"
    assert pos["There"] != "NOUN" and pos["the"] == "DET" and pos["."] == "PUNCT"


def test_jericho_tokenize_and_extract_objs_run_on_the_installed_tagger():
    install_tagger()
    assert jericho_util.tokenize("Open the Mailbox.") == ["open", "the", "mailbox", "."]
    assert jericho_util.extract_objs("There is a small mailbox here.") == {("small", "ADJ"), ("mailbox", "NOUN")}


def test_the_tagger_and_the_candidate_lister_reach_jericho_util_when_ctypes_util_was_imported_first(rom_dir):
    """torch, Ray and DeepSpeed import ctypes.util; jericho imported after it exports ctypes.util as `jericho.util`."""
    code = textwrap.dedent(f"""
        import ctypes.util, sys
        from priorzero_core.games import valid_actions
        from priorzero_core.games.tagger import Tagger, install_tagger
        import jericho
        install_tagger()
        assert valid_actions.jutil is sys.modules["jericho.util"], valid_actions.jutil
        assert isinstance(sys.modules["jericho.util"].spacy_nlp, Tagger)
        env = jericho.FrotzEnv({str(rom_dir / "zork1.z5")!r})
        env.reset()
        assert "open mailbox" in valid_actions.candidate_actions(env, env.get_state())
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_valid_actions_at_the_start_of_zork1(zork):
    assert {"open mailbox", "north", "south", "west"} <= set(zork.get_valid_actions(use_parallel=False))


def _equivalent_valid_action(env, action, valid):
    """Whether `action` or a valid action that leads to the same world state and score is in `valid`."""
    state = env.get_state()
    env.step(action)
    target = (env.get_world_state_hash(), env.get_score())
    found = False
    for candidate in valid:
        env.set_state(state)
        env.step(candidate)
        if (env.get_world_state_hash(), env.get_score()) == target:
            found = True
            break
    env.set_state(state)
    return found


def test_the_walkthrough_action_is_mostly_among_the_valid_actions(zork):
    # Measured on every step: 391 of 396 (98.7%); misses are read/look/examine, which change nothing.
    # Every 20th step keeps this test short.
    zork.reset()
    hits = checked = 0
    for i, action in enumerate(zork.get_walkthrough()):
        if i % 20 == 0:
            hits += _equivalent_valid_action(zork, action, zork.get_valid_actions(use_parallel=False))
            checked += 1
        zork.step(action)
    assert zork.get_score() == 350
    assert checked == 20 and hits / checked >= 0.9
