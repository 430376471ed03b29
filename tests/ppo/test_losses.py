import torch

from priorzero_core.ppo.losses import approx_kl, gae, group_advantages, normalise, policy_loss, token_rewards, value_loss


def test_reward_lands_on_each_rows_last_response_token_minus_kl():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    kl = torch.full((2, 3), 0.5)
    out = token_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.1)
    assert torch.allclose(out, torch.tensor([[-0.05, -0.05, 0.95], [1.95, 0.0, 0.0]]))


def test_gae_with_gamma_and_lambda_one_is_return_minus_value():
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])  # the padded 9 must not count
    values = torch.tensor([[0.2, 0.5, 0.7, 3.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert torch.allclose(adv, torch.tensor([[0.8, 0.5, 0.3, 0.0]]))


def test_gae_discounts_with_gamma_and_lambda():
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]]), mask, gamma=0.9, lam=0.5)
    delta1, delta0 = 1.0 - 0.5, 0.9 * 0.5 - 0.5
    assert torch.allclose(adv, torch.tensor([[delta0 + 0.45 * delta1, delta1]]))


def test_normalised_advantages_are_white_over_real_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    out = normalise(torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]]), mask)
    real = out[mask]
    assert abs(float(real.mean())) < 1e-6 and abs(float(real.std(unbiased=False)) - 1) < 1e-4 and out[0, 2] == 0


def test_grpo_advantages_are_standardised_within_each_prompt_group():
    mask = torch.ones(4, 2, dtype=torch.bool)
    adv = group_advantages(torch.tensor([1.0, 0.0, 5.0, 5.0]), group_size=2, mask=mask)
    assert adv[0, 0] > 0 > adv[1, 0] and torch.allclose(adv[0], adv[0, :1].expand(2))
    assert torch.all(adv[2:] == 0)  # equal rewards: no signal


def test_k3_kl_is_non_negative_and_zero_at_equality():
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.all(approx_kl(a, b, k3=True) >= -1e-7)
    assert torch.allclose(approx_kl(a, a, k3=True), torch.zeros(5, 7))


def test_policy_loss_clips_the_ratio():
    mask = torch.ones(1, 1, dtype=torch.bool)
    old = torch.zeros(1, 1)
    loss, frac = policy_loss(torch.log(torch.tensor([[2.0]])), old, torch.ones(1, 1), mask, clip_eps=0.2)
    assert torch.isclose(loss, torch.tensor(-1.2)) and frac == 1.0
    loss, frac = policy_loss(torch.zeros(1, 1), old, torch.ones(1, 1), mask, clip_eps=0.2)
    assert torch.isclose(loss, torch.tensor(-1.0)) and frac == 0.0


def test_value_loss_takes_the_worse_of_clipped_and_unclipped():
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), mask, clip=0.2)
    assert torch.isclose(loss, torch.tensor(0.5 * 0.8 ** 2))


def test_k3_kl_is_accurate_near_zero():
    """In fp32, e^{-r} - 1 + r cancelled to 0 or noise for the small log-ratios of early training."""
    r = torch.tensor([1e-5, -3e-5, 2e-4], dtype=torch.float32)
    kl = approx_kl(r, torch.zeros(3), k3=True)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, r.double().pow(2).div(2).float(), rtol=1e-3, atol=0)
