import numpy as np
import pytest
import torch

from priorzero_core.config import MCTSConfig, WorldModelConfig
from priorzero_core.mcts import RootOutput, search
from priorzero_core.world_model import (
    RootContext,
    WMBatch,
    WorldModel,
    WorldModelLearner,
    scalar_to_support,
    support_to_scalar,
    update_target,
)

E, A = 16, 5  # small embedding width keeps these tests fast; the real encoder gives 384


def make_batch(cfg: WorldModelConfig, B: int = 4, seed: int = 0) -> WMBatch:
    g = torch.Generator().manual_seed(seed)
    L = cfg.unroll_steps + 1
    valid_mask = torch.rand(B, L, A, generator=g) < 0.7
    valid_mask[..., 0] = True
    visits = torch.rand(B, L, A, generator=g) * valid_mask
    step_mask = torch.ones(B, L, dtype=torch.bool)
    step_mask[0, -2:] = False  # an episode that ended inside the sample
    return WMBatch(
        obs_emb=torch.nn.functional.normalize(torch.randn(B, L, E, generator=g), dim=-1),
        act_emb=torch.nn.functional.normalize(torch.randn(B, L, E, generator=g), dim=-1),
        valid_emb=torch.nn.functional.normalize(torch.randn(B, L, A, E, generator=g), dim=-1),
        valid_mask=valid_mask,
        rewards=torch.randint(0, 3, (B, L), generator=g).float(),
        value_targets=torch.randn(B, L, generator=g) * 5,
        policy_targets=visits / visits.sum(-1, keepdim=True),
        step_mask=step_mask,
    )


def root_context(batch: WMBatch, t: int, C: int) -> RootContext:
    """The search root at step t of each sequence, with the history the training window sees."""
    B = batch.obs_emb.shape[0]
    past = slice(max(0, t - C + 1), t)
    n = t - past.start
    past_obs = torch.zeros(B, C - 1, E)
    past_act = torch.zeros(B, C - 1, E)
    if n:
        past_obs[:, -n:] = batch.obs_emb[:, past]
        past_act[:, -n:] = batch.act_emb[:, past]
    return RootContext(
        past_obs, past_act, torch.full((B,), n), batch.obs_emb[:, t], batch.valid_emb[:, t], batch.valid_mask[:, t]
    )


def test_support_transforms_are_inverses():
    x = torch.tensor([-250.0, -7.3, -1.0, 0.0, 0.4, 1.0, 3.0, 42.0, 250.0], dtype=torch.float64)
    probs = scalar_to_support(x, 20)
    assert probs.shape == (9, 41)
    torch.testing.assert_close(probs.sum(-1), torch.ones(9, dtype=torch.float64))
    assert ((probs > 0).sum(-1) <= 2).all()
    torch.testing.assert_close(support_to_scalar(probs.log(), 20), x)


def test_support_clamps_beyond_its_range():
    big = support_to_scalar(scalar_to_support(torch.tensor([1e6]), 5).log(), 5)
    assert 30 < big.item() < 40  # h⁻¹(5) ≈ 34.6


def test_root_and_recurrent_inference_shapes_and_masks(tiny_wm_config):
    model = WorldModel(tiny_wm_config, input_dim=E).eval()
    C, D = tiny_wm_config.context_length, tiny_wm_config.embed_dim
    batch = make_batch(tiny_wm_config, B=3)
    ctx = root_context(batch, t=1, C=C)
    state, logits, value = model.root_inference(ctx)
    assert state.tokens.shape == (3, 2 * C - 1, D) and state.length.tolist() == [3, 3, 3]
    assert logits.shape == (3, A) and value.shape == (3,)
    assert (logits[~ctx.valid_mask] < -1e8).all() and (logits[ctx.valid_mask] > -1e3).all()

    for expected_length in (5, 5):  # grows by one pair, then the window is full
        action = torch.tensor([0, 1, 0])
        state, reward, logits, value = model.recurrent_inference(state, action, ctx.valid_emb, ctx.valid_mask)
        assert state.tokens.shape == (3, 2 * C - 1, D) and state.length.tolist() == [expected_length] * 3
        assert reward.shape == (3,) and value.shape == (3,) and logits.shape == (3, A)
        assert (logits[~ctx.valid_mask] < -1e8).all()


def test_cached_expansion_equals_rerunning_the_window(tiny_wm_config):
    """A node's keys/values stand in for its window: each imagined step gives what re-running it gives."""
    model = WorldModel(tiny_wm_config, input_dim=E).eval()
    torch.nn.init.normal_(model.reward_head[-1].weight)  # zero at init: it would hide a mismatch
    ctx = root_context(make_batch(tiny_wm_config, B=3), t=2, C=tiny_wm_config.context_length)
    state, _, _ = model.root_inference(ctx)
    batch = torch.arange(3)
    for step in range(4):  # the window fills up, then slides
        action = torch.tensor([step % A, (step + 1) % A, 0])
        token = model.action_token(ctx.valid_emb[batch, action]).unsqueeze(1)
        with torch.no_grad():
            h = model.transformer(torch.cat([state.tokens, token], 1), state.length + 1)[:, -1]
        expected = support_to_scalar(model.reward_head(h), tiny_wm_config.support_size)
        state, reward, _, _ = model.recurrent_inference(state, action, ctx.valid_emb, ctx.valid_mask)
        torch.testing.assert_close(reward, expected, atol=1e-5, rtol=1e-5)
        assert reward.abs().min() > 1e-3
    assert state.keys.shape == (3, tiny_wm_config.num_layers, tiny_wm_config.num_heads,
                                state.tokens.shape[1], tiny_wm_config.embed_dim // tiny_wm_config.num_heads)


def test_search_sees_exactly_what_training_sees(tiny_wm_config):
    model = WorldModel(tiny_wm_config, input_dim=E).eval()
    batch = make_batch(tiny_wm_config)
    C, S = tiny_wm_config.context_length, tiny_wm_config.support_size
    with torch.no_grad():
        predictions = model(batch.obs_emb, batch.act_emb, batch.valid_emb, batch.valid_mask)
    value_logits, policy_logits, reward_logits, _ = predictions
    for t in (0, 1, 4):  # no history, partial history, a window that slid past the start
        ctx = root_context(batch, t, C)
        state, logits, value = model.root_inference(ctx)
        torch.testing.assert_close(value, support_to_scalar(value_logits[:, t], S), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, policy_logits[:, t], atol=1e-5, rtol=1e-5)
        executed = torch.zeros(4, dtype=torch.long)
        actions = ctx.valid_emb.clone()
        actions[:, 0] = batch.act_emb[:, t]
        _, reward, _, _ = model.recurrent_inference(state, executed, actions, ctx.valid_mask)
        torch.testing.assert_close(reward, support_to_scalar(reward_logits[:, t], S), atol=1e-5, rtol=1e-5)


def test_every_loss_term_is_finite_and_non_zero(tiny_wm_config):
    model = WorldModel(tiny_wm_config, input_dim=E)
    total, metrics = model.compute_loss(make_batch(tiny_wm_config), model)
    assert set(metrics) == {
        "train/wm_total_loss",
        "train/wm_reward_loss",
        "train/wm_value_loss",
        "train/wm_policy_loss",
        "train/wm_latent_loss",
        "train/wm_policy_entropy",
    }
    assert all(torch.isfinite(torch.tensor(v)) and v != 0 for v in metrics.values())
    assert total.requires_grad and total.item() == pytest.approx(metrics["train/wm_total_loss"])


def test_train_steps_reduce_the_loss_and_move_the_target_only_by_ema(tiny_wm_config):
    cfg = tiny_wm_config.model_copy(update={"lr": 3e-3})
    learner = WorldModelLearner(cfg, input_dim=E)
    batch = make_batch(cfg)
    weight = learner.model.blocks[0].attn.c_attn.weight
    before = weight.detach().clone()
    first = learner.train_step(batch)
    assert first["train/wm_grad_norm"] > 0
    assert not torch.equal(weight, before)

    target_before = [p.clone() for p in learner.target.parameters()]
    loss, _ = learner.model.compute_loss(batch, learner.target)
    loss.backward()
    learner.optimizer.step()  # an optimiser step never touches the target network
    assert all(torch.equal(p, q) for p, q in zip(learner.target.parameters(), target_before))
    update_target(learner.model, learner.target, cfg.target_update_tau)
    for p_target, p_old, p in zip(learner.target.parameters(), target_before, learner.model.parameters()):
        torch.testing.assert_close(p_target, p_old + cfg.target_update_tau * (p - p_old))

    for _ in range(15):
        last = learner.train_step(batch)
    assert last["train/wm_total_loss"] < first["train/wm_total_loss"] - 0.5


def test_learner_checkpoint_round_trip_continues_identically(tiny_wm_config):
    learner = WorldModelLearner(tiny_wm_config, input_dim=E)
    batch = make_batch(tiny_wm_config)
    learner.train_step(batch)
    restored = WorldModelLearner(tiny_wm_config, input_dim=E)
    restored.load_state_dict(learner.state_dict())
    assert restored.steps == 1
    assert learner.train_step(batch) == restored.train_step(batch)


def test_search_runs_on_the_world_model_with_the_roots_valid_actions(tiny_wm_config):
    model = WorldModel(tiny_wm_config, input_dim=E).eval()
    ctx = root_context(make_batch(tiny_wm_config, B=3), t=2, C=tiny_wm_config.context_length)
    state, logits, value = model.root_inference(ctx)
    cfg = MCTSConfig(num_simulations=12)
    out = search(model.search_fn(ctx), RootOutput(state, logits, value), ctx.valid_mask, cfg,
                 np.random.default_rng(0), add_noise=True, discount=tiny_wm_config.discount)
    assert out.visit_counts.sum(-1).tolist() == [12, 12, 12]
    assert (out.visit_counts[~ctx.valid_mask] == 0).all()
    assert ctx.valid_mask.gather(1, out.selected_action.unsqueeze(-1)).all()


def test_reanalysed_targets_bootstrap_from_the_target_network_s_value_at_the_named_step():
    """world_model.reanalyse: where a batch names a bootstrap position, the value loss's target is the rewards
    part plus the discount times the target network's value there; elsewhere the stored target."""
    cfg = WorldModelConfig(embed_dim=32, num_layers=1, num_heads=2, context_length=2, unroll_steps=3)
    torch.manual_seed(0)
    model, target = WorldModel(cfg, input_dim=E), WorldModel(cfg, input_dim=E)
    with torch.no_grad():  # value heads that tell states apart (they start at 0 everywhere, as MuZero's)
        target.value_head[-1].weight.normal_(0.0, 1.0)
        model.value_head[-1].weight.normal_(0.0, 1.0)
    batch = make_batch(cfg)
    B, L = batch.value_targets.shape
    batch.value_partial = torch.full((B, L), 1.0)
    batch.bootstrap_discount = torch.full((B, L), 0.5)
    batch.bootstrap_pos = torch.full((B, L), -1, dtype=torch.long)
    batch.bootstrap_pos[:, 0] = 2
    batch.bootstrap_pos[1, 1] = 3
    first = torch.zeros(B, dtype=torch.long)
    values = support_to_scalar(target(batch.obs_emb, batch.act_emb, batch.valid_emb, batch.valid_mask, first)[0],
                               cfg.support_size)
    assert not torch.allclose(values[:, 2], values[:, 3])  # the test can tell the positions apart
    got = model.reanalysed_targets(batch, target, first)
    torch.testing.assert_close(got[:, 0], 1.0 + 0.5 * values[:, 2])
    torch.testing.assert_close(got[1, 1], 1.0 + 0.5 * values[1, 3])
    keep = batch.bootstrap_pos < 0
    torch.testing.assert_close(got[keep], batch.value_targets[keep])
    # the value loss trains on them: a target network that values every state at 100 moves the loss
    with torch.no_grad():
        target.value_head[-1].weight.zero_()
        target.value_head[-1].bias.copy_(scalar_to_support(torch.tensor(100.0), cfg.support_size).log().clamp(min=-30))
    _, reanalysed = model.compute_loss(batch, target)
    batch.bootstrap_pos = None
    _, stored = model.compute_loss(batch, target)
    assert reanalysed["train/wm_value_loss"] != pytest.approx(stored["train/wm_value_loss"])
    assert reanalysed["train/wm_reanalyse_shift"] > 10 and "train/wm_reanalyse_shift" not in stored


def alternating_rooms(cfg: WorldModelConfig, B: int = 8) -> WMBatch:
    """Sequences that alternate between two observations: in X the valid actions are 0, 1, 2, in Y 0 and 3; the
    executed action is 0 everywhere. What the validity head must learn: of X's actions, 1 and 2 are not valid
    in Y (and of Y's, 3 not in X)."""
    g = torch.Generator().manual_seed(1)
    L = cfg.unroll_steps + 1
    actions = torch.nn.functional.normalize(torch.randn(4, E, generator=g), dim=-1)
    rooms = torch.nn.functional.normalize(torch.randn(2, E, generator=g), dim=-1)
    valid = {0: [0, 1, 2], 1: [0, 3]}
    room = (torch.arange(L) + torch.arange(B).unsqueeze(1)) % 2  # [B, L] 0: X, 1: Y
    valid_emb, valid_mask = torch.zeros(B, L, A, E), torch.zeros(B, L, A, dtype=torch.bool)
    carried = torch.zeros(B, L, A, dtype=torch.bool)
    for b in range(B):
        for t in range(L):
            here = valid[int(room[b, t])]
            valid_emb[b, t, :len(here)] = actions[here]
            valid_mask[b, t, :len(here)] = True
            if t:
                before = valid[int(room[b, t - 1])]
                carried[b, t, :len(before)] = torch.tensor([a in here for a in before])
    policy = valid_mask.float() / valid_mask.sum(-1, keepdim=True)
    return WMBatch(obs_emb=rooms[room], act_emb=actions[0].expand(B, L, E), valid_emb=valid_emb,
                   valid_mask=valid_mask, rewards=torch.zeros(B, L), value_targets=torch.zeros(B, L),
                   policy_targets=policy, step_mask=torch.ones(B, L, dtype=torch.bool), carried_valid=carried)


def test_without_a_validity_weight_there_is_no_validity_head(tiny_wm_config):
    """The default: the model's parameters (and so its checkpoints) are what they were before the option."""
    assert tiny_wm_config.validity_loss_weight == 0
    model = WorldModel(tiny_wm_config, input_dim=E)
    assert not model.has_validity and not [n for n in model.state_dict() if "validity" in n]
    _, metrics = model.compute_loss(alternating_rooms(tiny_wm_config), model)
    assert "train/wm_validity_loss" not in metrics


def test_the_validity_head_learns_which_of_the_previous_steps_actions_stay_valid(tiny_wm_config):
    cfg = tiny_wm_config.model_copy(update={"validity_loss_weight": 1.0, "lr": 3e-3})
    torch.manual_seed(0)
    learner = WorldModelLearner(cfg, input_dim=E)
    batch = alternating_rooms(cfg)
    first = learner.train_step(batch)
    assert first["train/wm_validity_gone_caught"] == 0  # it starts calling every action valid
    for _ in range(150):
        last = learner.train_step(batch)
    assert last["train/wm_validity_loss"] < 0.1 * first["train/wm_validity_loss"]
    assert last["train/wm_validity_gone_caught"] == 1
    model = learner.model.eval()
    with torch.no_grad():
        h = model._teacher_forced(batch.obs_emb, batch.act_emb, batch.valid_emb, batch.valid_mask)[-1]
        x_actions = batch.valid_emb[0, 0]  # row 0 starts in X
        in_y = model.validity_logits(h[0, 1], x_actions)[:3]  # X's actions, judged in Y
        in_x = model.validity_logits(h[0, 2], x_actions)[:3]
    assert in_y[0] > 0 and (in_y[1:] < 0).all() and (in_x > 0).all()


def test_below_the_root_search_drops_the_actions_the_validity_head_rules_out(tiny_wm_config, monkeypatch):
    cfg = tiny_wm_config.model_copy(update={"validity_loss_weight": 1.0})
    model = WorldModel(cfg, input_dim=E).eval()
    ctx = root_context(make_batch(cfg, B=3), t=2, C=cfg.context_length)
    state, root_logits, value = model.root_inference(ctx)
    assert (root_logits[ctx.valid_mask] > -1e3).all()  # the root keeps its real valid actions
    _, _, logits, _ = model.recurrent_inference(state, torch.zeros(3, dtype=torch.long), ctx.valid_emb,
                                                ctx.valid_mask)
    assert (logits[ctx.valid_mask] > -1e3).all()  # a fresh head (p 0.95 everywhere) drops nothing

    judged = torch.full((3, A), -5.0)
    judged[:, 0] = 5.0  # action 0 (valid at every root) is the only one valid below it
    monkeypatch.setattr(model, "validity_logits", lambda h, emb: judged[: h.shape[0]].expand(*emb.shape[:-1]))
    _, _, logits, _ = model.recurrent_inference(state, torch.zeros(3, dtype=torch.long), ctx.valid_emb,
                                                ctx.valid_mask)
    assert (logits[:, 0] > -1e3).all() and (logits[:, 1:] < -1e8).all()
    out = search(model.search_fn(ctx), RootOutput(state, root_logits, value), ctx.valid_mask,
                 MCTSConfig(num_simulations=20), np.random.default_rng(0), add_noise=True, discount=cfg.discount)
    below = out.tree.depth >= 2  # nodes reached by a move below the root
    assert below.any() and (out.tree.action_from_parent[below] == 0).all()
    assert out.visit_counts[ctx.valid_mask].gt(0).sum() > 3  # the root still spreads over its own actions

    judged[:] = -5.0
    judged[:, 2] = -1.0  # none judged valid: the likeliest one stays
    _, _, logits, _ = model.recurrent_inference(state, torch.zeros(3, dtype=torch.long), ctx.valid_emb,
                                                ctx.valid_mask)
    kept = logits > -1e3
    assert (kept.sum(-1) == 1).all() and (kept[:, 2] == ctx.valid_mask[:, 2]).all()
