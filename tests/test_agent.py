"""The acting policy: which search output each learner is taught."""

import numpy as np
import pytest
import torch

from priorzero_core.agent import Agent, EnvView, sequences_to_wm_batch
from priorzero_core.config import load_config
from priorzero_core.games import EnvPool, game_spec
from priorzero_core.replay import GameSegment, ReplayBuffer, StepRecord
from priorzero_core.world_model import WorldModel


@pytest.mark.parametrize("policy_target", ["visits", "improved"])
def test_both_learners_are_taught_the_configured_policy_target(text_encoder, policy_target):
    """`mcts.policy_target: visits` teaches the visit distribution, `improved` the completed-Q policy: the
    world model and the LLM's SFT get the same one."""
    cfg = load_config("debug", ["llm.enabled=false", "world_model.embed_dim=32", "world_model.num_heads=2",
                                "mcts.num_simulations=3", f"mcts.policy_target={policy_target}"])
    torch.manual_seed(0)
    model = WorldModel(cfg.world_model, text_encoder.dim)
    for head in (model.value_head, model.reward_head):  # values that differ, so the improved policy moves
        torch.nn.init.normal_(head[-1].weight, std=1.0)
    spec = game_spec(cfg.game)
    agent = Agent(cfg, spec, text_encoder, model, None, np.random.default_rng(0), torch.device("cpu"))
    pool = EnvPool(cfg.game, 1)
    try:
        ts = pool.reset_all()[0]
        (d,) = agent.act([EnvView([], ts)], mode="collect")
    finally:
        pool.close()
    if policy_target == "visits":
        np.testing.assert_array_equal(d.policy_target, d.visit_dist)
    else:
        assert not np.allclose(d.policy_target, d.visit_dist)
    step = StepRecord(ts.observation, d.valid_actions, d.action_index, d.action, 0.0, 0, list(map(float, d.visit_dist)),
                      d.root_value, policy_target=list(map(float, d.policy_target)), prompt="p")
    seg = GameSegment("e", 0, 0, [step, step])
    buf = ReplayBuffer(10, 0.9, 1)
    buf.add([seg])
    batch = sequences_to_wm_batch([buf.sequence(seg, 0, 1, 0)], text_encoder, spec.action_space_size, torch.device("cpu"))
    k = len(d.valid_actions)
    np.testing.assert_allclose(batch.policy_targets[0, 0, :k].numpy(), d.policy_target, atol=1e-6)
    (sample,) = agent.llm_samples([(seg, 0)], [0.0], [buf.sequence(seg, 0, 1, 0)])
    np.testing.assert_allclose(sample.visit_dist, d.policy_target, atol=1e-6)


def test_the_greedy_agent_acts_on_what_eval_act_on_names(text_encoder):
    cfg = load_config("debug", ["llm.enabled=false", "world_model.embed_dim=32", "world_model.num_heads=2",
                                "mcts.num_simulations=4"])
    torch.manual_seed(7)  # a model whose search visits one action most and whose improved policy picks the other
    model = WorldModel(cfg.world_model, text_encoder.dim)
    for head in (model.value_head, model.reward_head):
        torch.nn.init.normal_(head[-1].weight, std=1.0)
    pool = EnvPool(cfg.game, 1)
    try:
        ts = pool.reset_all()[0]
        for act_on in ("visits", "improved"):  # the greedy search is the same both times: no root noise
            cfg.eval.act_on = act_on
            agent = Agent(cfg, game_spec(cfg.game), text_encoder, model, None, np.random.default_rng(0),
                          torch.device("cpu"))
            (d,) = agent.act([EnvView([], ts)], mode="wm")
            visits_first = int(np.argmax(np.asarray(d.visit_dist) + 1e-3 * np.asarray(d.policy_target)))
            assert visits_first != int(np.argmax(d.policy_target))
            assert d.action_index == (visits_first if act_on == "visits" else int(np.argmax(d.policy_target)))
    finally:
        pool.close()


def learned_policy(agent: Agent, model: WorldModel, ts) -> np.ndarray:
    """The world model's learned policy over the valid actions of `ts`, with no history."""
    ctx = agent._root_context([[]], [ts.observation], [list(ts.valid_actions)])
    _, logits, _ = model.root_inference(ctx)
    return logits[0, : len(ts.valid_actions)].softmax(-1).detach().numpy()


def test_the_greedy_agent_acting_on_its_policy_skips_the_search(text_encoder, monkeypatch):
    import priorzero_core.agent as agent_module

    cfg = load_config("debug", ["llm.enabled=false", "world_model.embed_dim=32", "world_model.num_heads=2",
                                "eval.act_on=policy"])
    torch.manual_seed(7)
    model = WorldModel(cfg.world_model, text_encoder.dim)
    pool = EnvPool(cfg.game, 1)
    try:
        ts = pool.reset_all()[0]
        agent = Agent(cfg, game_spec(cfg.game), text_encoder, model, None, np.random.default_rng(0), torch.device("cpu"))
        policy = learned_policy(agent, model, ts)
        monkeypatch.setattr(agent_module, "search", lambda *a, **k: pytest.fail("searched"))
        (d,) = agent.act([EnvView([], ts)], mode="wm")
        assert d.action_index == int(np.argmax(policy))
        np.testing.assert_allclose(d.policy_target, policy, atol=1e-5)
    finally:
        pool.close()


def test_the_greedy_agent_takes_the_policy_s_move_where_the_policy_is_as_sure_as_eval_policy_confidence(text_encoder):
    cfg = load_config("debug", ["llm.enabled=false", "world_model.embed_dim=32", "world_model.num_heads=2",
                                "mcts.num_simulations=4"])
    torch.manual_seed(7)
    model = WorldModel(cfg.world_model, text_encoder.dim)
    for head in (model.value_head, model.reward_head):  # values that differ, so the search overrules the policy
        torch.nn.init.normal_(head[-1].weight, std=1.0)
    pool = EnvPool(cfg.game, 1)
    try:
        ts = pool.reset_all()[0]
        agent = Agent(cfg, game_spec(cfg.game), text_encoder, model, None, np.random.default_rng(0), torch.device("cpu"))
        policy = learned_policy(agent, model, ts)
        cfg.eval.policy_confidence = None
        (searched,) = agent.act([EnvView([], ts)], mode="wm")
        assert searched.action_index == int(np.argmax(searched.policy_target)) != int(np.argmax(policy))
        for confidence, expected in ((float(policy.max()) - 1e-4, int(np.argmax(policy))),
                                     (float(policy.max()) + 1e-4, searched.action_index)):
            cfg.eval.policy_confidence = confidence
            (d,) = agent.act([EnvView([], ts)], mode="wm")
            assert d.action_index == expected
            np.testing.assert_allclose(d.policy_target, searched.policy_target, atol=1e-6)  # what it learns: unchanged
        cfg.eval.policy_confidence = 1e-3  # collection follows its search whatever the policy's confidence
        rng_state = agent.rng.bit_generator.state
        (collected,) = agent.act([EnvView([], ts)], mode="collect")
        cfg.eval.policy_confidence = None
        agent.rng.bit_generator.state = rng_state
        assert agent.act([EnvView([], ts)], mode="collect")[0].action_index == collected.action_index
    finally:
        pool.close()


def test_evaluation_searches_with_eval_num_simulations_and_collection_with_mcts_num_simulations(text_encoder,
                                                                                              monkeypatch):
    import priorzero_core.agent as agent_module

    searched = []

    def recording_search(fn, root, mask, cfg, *args, **kwargs):
        searched.append(cfg.num_simulations)
        return real_search(fn, root, mask, cfg, *args, **kwargs)

    real_search = agent_module.search
    monkeypatch.setattr(agent_module, "search", recording_search)
    torch.manual_seed(7)
    pool = EnvPool(load_config("debug").game, 1)
    try:
        ts = pool.reset_all()[0]
        for eval_sims, expected in ((None, [3, 3]), (6, [3, 6])):
            cfg = load_config("debug", ["llm.enabled=false", "world_model.embed_dim=32", "world_model.num_heads=2",
                                        "mcts.num_simulations=3"])
            cfg.eval.num_simulations = eval_sims
            agent = Agent(cfg, game_spec(cfg.game), text_encoder, WorldModel(cfg.world_model, text_encoder.dim), None,
                          np.random.default_rng(0), torch.device("cpu"))
            searched.clear()
            agent.act([EnvView([], ts)], mode="collect")
            (d,) = agent.act([EnvView([], ts)], mode="wm")
            assert searched == expected
            assert cfg.mcts.num_simulations == 3  # the collection config is left as it was
    finally:
        pool.close()


def test_a_step_without_a_policy_target_gets_no_policy_loss_but_its_reward(text_encoder):
    """Hazard steps (collector.hazard_segments) carry neither visits nor a policy target."""
    plain = StepRecord("here", ["a", "b"], 0, "a", 0.0, 0, [0.25, 0.75], 0.0)
    hazard = StepRecord("there", ["a", "b"], 1, "b", -10.0, 0, [], -10.0, terminal=True)
    buf = ReplayBuffer(10, 0.9, 1)
    segs = [GameSegment("p", 0, 0, [plain]), GameSegment("h", 0, 0, [hazard], hazard=True)]
    buf.add(segs)
    batch = sequences_to_wm_batch([buf.sequence(s, 0, 1, 0) for s in segs], text_encoder, 4, torch.device("cpu"))
    np.testing.assert_allclose(batch.policy_targets[:, 0, :2].numpy(), [[0.25, 0.75], [0.0, 0.0]])
    assert batch.rewards[:, 0].tolist() == [0.0, -10.0] and batch.step_mask[:, 0].tolist() == [True, True]


def test_a_searched_decision_carries_the_completed_q_the_improved_policy_was_built_from(text_encoder):
    from priorzero_core.mcts import improved_policy

    cfg = load_config("debug", ["llm.enabled=false", "world_model.embed_dim=32", "world_model.num_heads=2",
                                "mcts.num_simulations=1"])
    torch.manual_seed(7)
    pool = EnvPool(cfg.game, 1)
    try:
        ts = pool.reset_all()[0]
        agent = Agent(cfg, game_spec(cfg.game), text_encoder, WorldModel(cfg.world_model, text_encoder.dim), None,
                      np.random.default_rng(0), torch.device("cpu"))
        (d,) = agent.act([EnvView([], ts)], mode="wm")
        k = len(d.valid_actions)
        assert d.q_values is not None and d.q_values.shape == (k,)
        # one simulation leaves an action unvisited: its Q is completed (one-step), not the tree's 0
        assert k > 1 and np.count_nonzero(d.visit_dist) == 1 and np.count_nonzero(d.q_values) == k
        ctx = agent._root_context([[]], [ts.observation], [list(d.valid_actions)])
        _, logits, _ = agent.model.root_inference(ctx)
        visits = torch.from_numpy(d.visit_dist).float()[None]
        rebuilt = improved_policy(logits[:, :k], torch.from_numpy(d.q_values)[None], visits,
                                  ctx.valid_mask[:, :k], cfg.mcts.c_visit, cfg.mcts.c_scale, cfg.mcts.min_q_spread)
        np.testing.assert_allclose(d.policy_target, rebuilt[0].numpy(), atol=1e-5)
        cfg.eval.act_on = "policy"
        assert agent.act([EnvView([], ts)], mode="wm")[0].q_values is None
    finally:
        pool.close()


def test_a_batch_says_which_of_the_previous_steps_valid_actions_each_step_keeps(text_encoder):
    """The validity head's labels (world_model.validity_loss_weight), by action text, history steps included."""
    steps = [StepRecord("hall", ["north", "take lamp", "open door"], 1, "take lamp", 0.0, 0, [0.2, 0.5, 0.3], 0.0),
             StepRecord("hall, lamp held", ["open door", "north", "drop lamp"], 1, "north", 0.0, 0, [.3, .4, .3], 0.0),
             StepRecord("dark", ["south"], 0, "south", -10.0, 0, [1.0], 0.0, terminal=True)]
    seg = GameSegment("e", 0, 0, steps)
    buf = ReplayBuffer(10, 0.9, 1)
    buf.add([seg])
    batch = sequences_to_wm_batch([buf.sequence(seg, 1, 2, 1)], text_encoder, 4, torch.device("cpu"), history=1)
    assert batch.known[0].tolist() == [True, True, True] and batch.step_mask[0].tolist() == [False, True, True]
    assert batch.carried_valid[0].tolist() == [[False] * 4,
                                               [True, False, True, False],  # north and open door stay
                                               [False, False, False, False]]  # nothing stays in the dark
