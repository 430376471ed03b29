import pytest
from hypothesis import given, settings, strategies as st

from priorzero_core.config import PriorZeroConfig, config_from_dict, dump_config, load_config
from priorzero_core.errors import ConfigError


@pytest.mark.parametrize("name", ["debug", "zork", "detective"])
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert isinstance(cfg, PriorZeroConfig)
    assert config_from_dict(__import__("yaml").safe_load(dump_config(cfg))) == cfg


def test_debug_mode_applies_the_debug_sizes(monkeypatch):
    monkeypatch.setenv("DEBUG_MODE", "True")
    cfg = load_config("zork")
    assert (cfg.world_model.batch_size, cfg.mcts.num_simulations, cfg.schedule.iterations) == (20, 5, 100)
    assert cfg.game.name == "zork1"


@pytest.mark.parametrize(
    "override, message",
    [
        ("world_model.num_layerz=3", "unknown key 'world_model.num_layerz' (allowed keys here: absorbing, batch_size"),
        ("mcts.prior_mode=foo", "'mcts.prior_mode': Input should be 'wm', 'llm' or 'mix'"),
        ("collect.num_envs=-1", "bad value -1 for 'collect.num_envs'"),
        ("collect.num_envs=abc", "bad value 'abc' for 'collect.num_envs'"),
        ("mcts.mix_weight=2.0", "mix_weight must be in [0, 1]"),
        ("world_model.embed_dim=130", "divisible by num_heads"),
        ("gam.name=zork1", "unknown key 'gam' (allowed keys here: collect, eval, explore, game"),
    ],
)
def test_bad_values_give_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("debug", [override])
    text = str(err.value)
    assert message in text and "\n" not in text


def test_bad_yaml_and_unknown_config_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("game:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"unknown config 'zrok' \(known in .*debug, detective, zork"):
        load_config("zrok")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_hash_ignores_schedule_but_not_model_shape():
    base = load_config("debug")
    assert base.config_hash() == load_config("debug", ["schedule.iterations=7"]).config_hash()
    assert base.config_hash() != load_config("debug", ["world_model.embed_dim=64"]).config_hash()
    # the validity head is part of the shape; how much its loss weighs is not
    with_head = load_config("debug", ["world_model.validity_loss_weight=0.5"]).config_hash()
    assert with_head != base.config_hash()
    assert with_head == load_config("debug", ["world_model.validity_loss_weight=2"]).config_hash()


scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5))
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                     st.dictionaries(st.sampled_from(["game", "llm", "mcts", "name", "num_envs", "collect", "x"]), inner, max_size=3)),
                     max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(trees)
def test_loader_fuzz_only_raises_config_errors(data):
    try:
        config_from_dict(data)
    except ConfigError as err:
        assert "\n" not in str(err)


def test_td_lambda_is_a_world_model_option_that_refuses_reanalyse():
    from priorzero_core.errors import ConfigError

    assert load_config("debug", ["world_model.td_lambda=0.8"]).world_model.td_lambda == 0.8
    with pytest.raises(ConfigError, match="td_lambda"):
        load_config("debug", ["world_model.td_lambda=0.8", "world_model.reanalyse=true"])
