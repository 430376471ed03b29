import numpy as np
import pytest
import torch

from priorzero_core import mcts
from priorzero_core.config import MCTSConfig
from priorzero_core.mcts import (
    NO_CHILD,
    RootOutput,
    dirichlet_noise,
    improved_policy,
    masked_softmax,
    root_prior,
    search,
    select_action,
)

A = 4


class ChainMDP:
    """Known model: `good` twice in a row pays 3 on the second step; `decoy` at the root pays 0.5 at once.

    Values are 0 and priors uniform, so only search can find the delayed reward. Records every action
    it is asked to imagine.
    """

    def __init__(self):
        self.imagined: list[torch.Tensor] = []

    def root(self, good: list[int], decoy: list[int], prior_logits: torch.Tensor | None = None) -> RootOutput:
        B = len(good)
        depth, on_path = torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.bool)
        state = (depth, torch.tensor(good), torch.tensor(decoy), on_path)
        logits = torch.zeros(B, A) if prior_logits is None else prior_logits
        return RootOutput(state, logits, torch.zeros(B))

    def __call__(self, state, action):
        depth, good, decoy, on_path = state
        self.imagined.append(action.clone())
        right = on_path & (action == good)
        reward = 3.0 * (right & (depth == 1)) + 0.5 * (on_path & (depth == 0) & (action == decoy))
        logits = torch.zeros(len(action), A)
        return (depth + 1, good, decoy, right), reward.float(), logits, torch.zeros(len(action))


def run(model, root, mask, simulations=100, add_noise=False, seed=0):
    cfg = MCTSConfig(num_simulations=simulations)
    return search(model, root, mask, cfg, np.random.default_rng(seed), add_noise, discount=0.997, temperature=0)


GOOD_OR_DECOY = torch.tensor([[True, False, True, False], [False, True, False, True]])


def test_search_prefers_a_delayed_reward_to_an_immediate_decoy():
    model = ChainMDP()
    out = run(model, model.root(good=[2, 1], decoy=[0, 3]), GOOD_OR_DECOY)
    assert out.selected_action.tolist() == [2, 1]
    assert out.visit_counts.sum(-1).tolist() == [100, 100]
    torch.testing.assert_close(out.visit_dist.sum(-1), torch.ones(2))
    assert out.q_values[0, 2] > 2.5 and out.q_values[0, 0] == pytest.approx(0.5)
    assert out.root_value.min() > 2


def test_too_few_simulations_take_the_decoy():
    model = ChainMDP()
    out = run(model, model.root(good=[2, 1], decoy=[0, 3]), GOOD_OR_DECOY, simulations=10)
    assert out.selected_action.tolist() == [0, 3]


def test_invalid_actions_are_never_imagined_or_visited():
    model = ChainMDP()
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    out = run(model, model.root(good=[2, 1], decoy=[3, 0]), mask, simulations=60, add_noise=True)
    imagined = torch.stack(model.imagined)  # [simulations, B]
    assert mask.gather(1, imagined.T).all()
    assert (out.visit_counts[~mask] == 0).all()
    assert (out.tree.children[~mask.unsqueeze(1).expand(-1, 61, -1)] == NO_CHILD).all()


def test_noise_reaches_only_the_root_and_only_valid_actions():
    model = ChainMDP()
    mask = torch.tensor([[True, True, False, True]])
    prior_logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    out = run(model, model.root(good=[1], decoy=[0], prior_logits=prior_logits), mask, simulations=10, add_noise=True)
    root, clean = out.tree.prior[0, 0], masked_softmax(prior_logits, mask)[0]
    assert root[2] == 0 and root.sum().item() == pytest.approx(1.0)
    assert not torch.allclose(root, clean)
    torch.testing.assert_close(out.tree.prior[0, 1:], mask.expand(10, -1) / 3.0)  # the model's uniform prior


def test_dirichlet_noise_mixes_with_the_documented_weight():
    prior = torch.tensor([[0.5, 0.5, 0.0]])
    mask = torch.tensor([[True, True, False]])
    noisy = dirichlet_noise(prior, mask, alpha=0.3, weight=0.25, rng=np.random.default_rng(1))
    noise = (noisy - 0.75 * prior) / 0.25
    assert noise[0, 2] == 0 and noise.sum().item() == pytest.approx(1.0) and (noise >= 0).all()


def test_batched_search_equals_separate_searches():
    good, decoy = [2, 1, 3], [0, 3, 1]
    mask = torch.tensor([[True, True, True, False], [True, True, True, True], [False, True, True, True]])
    for add_noise in (False, True):  # noise draws rows in order from one stream, so seeds line up
        model = ChainMDP()
        batched = run(model, model.root(good, decoy), mask, simulations=30, add_noise=add_noise)
        rng = np.random.default_rng(0)
        for b in range(3):
            cfg = MCTSConfig(num_simulations=30)
            root = model.root([good[b]], [decoy[b]])
            one = search(model, root, mask[b : b + 1], cfg, rng, add_noise, discount=0.997, temperature=0)
            assert torch.equal(one.visit_counts[0], batched.visit_counts[b])
            torch.testing.assert_close(one.root_value[0], batched.root_value[b])


def test_each_rows_kept_choice_is_the_fresh_puct_argmax_after_every_simulation():
    """The walk reads choices that backup keeps; recomputing PUCT everywhere must always agree with them."""
    g = torch.Generator().manual_seed(0)
    B, D, N = 3, 8, 40
    w = torch.randn(D + A, D, generator=g)

    def model(state, action):  # a random deterministic model whose rewards and values move the Q bounds
        x = torch.tanh(torch.cat([state[0], torch.nn.functional.one_hot(action, A).float()], -1) @ w)
        return (x,), x[:, 0] * 2, x[:, 1:1 + A] * 3, x[:, -1]

    cfg = MCTSConfig(num_simulations=N)
    mask = torch.ones(B, A, dtype=torch.bool)
    mask[0, 3] = False
    root = RootOutput((torch.randn(B, D, generator=g),), torch.randn(B, A, generator=g), torch.zeros(B))
    tree = mcts.init_tree(root, mask, N, masked_softmax(root.prior_logits, mask), cfg, 0.997)
    envs = np.arange(B)
    for sim in range(1, N + 1):
        path, actions = mcts.simulate(tree)
        last = (path != tree.empty).sum(1) - 1
        leaf = tree.root + sim
        value = mcts.expand(tree, model, leaf, path[envs, last], actions[envs, last], mask)
        path = np.concatenate([path, np.full((B, 1), tree.empty)], 1)
        path[envs, last + 1] = leaf
        mcts.backup(tree, path, actions, value, 0.997, cfg)
        rows = (tree.root[:, None] + np.arange(sim + 1)).ravel()
        low, scale = mcts.q_bounds(tree)
        env = rows // tree.num_nodes
        score = tree.explore[rows] + np.where(tree.child_visits[rows] > 0, (tree.child_q[rows] - low[env]) * scale[env], 0)
        np.testing.assert_array_equal(tree.best[rows], score.argmax(-1))
    assert (tree.max_value > tree.min_value).all() and tree.child_visits[tree.root][0, 3] == 0


def test_select_action_argmax_at_zero_temperature_and_samples_by_counts_otherwise():
    counts = torch.tensor([[1.0, 3.0, 0.0]]).expand(20_000, -1)
    rng = np.random.default_rng(0)
    assert (select_action(counts, 0.0, rng) == 1).all()
    freq = torch.bincount(select_action(counts, 1.0, rng), minlength=3) / 20_000
    torch.testing.assert_close(freq, torch.tensor([0.25, 0.75, 0.0]), atol=0.02, rtol=0)
    sharp = torch.bincount(select_action(counts, 0.5, rng), minlength=3) / 20_000  # ∝ N², so 1:9
    torch.testing.assert_close(sharp, torch.tensor([0.1, 0.9, 0.0]), atol=0.02, rtol=0)


def test_root_prior_modes():
    wm = torch.tensor([[2.0, 0.0, 1.0, 9.0]])
    llm = torch.log(torch.tensor([[0.1, 0.6, 0.3, 0.0]]))
    mask = torch.tensor([[True, True, True, False]])
    p_wm = masked_softmax(wm, mask)
    torch.testing.assert_close(root_prior(wm, None, mask, "mix", 0.5).exp(), p_wm, atol=1e-6, rtol=0)
    torch.testing.assert_close(root_prior(wm, llm, mask, "wm", 0.5).exp(), p_wm, atol=1e-6, rtol=0)
    torch.testing.assert_close(root_prior(wm, llm, mask, "llm", 0.5).exp(), llm.exp(), atol=1e-6, rtol=0)
    mixed = root_prior(wm, llm, mask, "mix", 0.3)
    torch.testing.assert_close(mixed, torch.log(0.3 * p_wm + 0.7 * llm.exp() + 1e-8).masked_fill(~mask, -1e9))
    assert mixed[0, 3] < -1e8


def test_adaptive_mix_gives_the_llm_between_0_3_and_0_7():
    mask = torch.tensor([[True, True, True, False]] * 2)
    wm = torch.tensor([[0.0, 0.0, 0.0, 7.0], [50.0, 0.0, 0.0, 0.0]])  # uniform over the valid actions; certain
    llm = torch.log(torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 2))
    p = root_prior(wm, llm, mask, "mix", "adaptive").exp()
    # p[2] = (1 - w_llm)·p_wm[2] + w_llm: max entropy gives w_llm 0.3, zero entropy 0.7
    torch.testing.assert_close(p[:, 2], torch.tensor([0.7 / 3 + 0.3, 0.7]), atol=1e-4, rtol=0)
    single = mask & torch.tensor([True, False, False, False])
    assert root_prior(wm, llm, single, "mix", "adaptive").isfinite().all()


class Bandit:
    """One-step model: action k pays rewards[k]; the lookahead sees B·A rows, search sees B."""

    def __init__(self, rewards):
        self.rewards = torch.tensor(rewards)

    def __call__(self, state, action):
        reward = self.rewards[action]
        return state, reward, torch.zeros(len(action), A), torch.zeros(len(action))


def test_improved_policy_finds_the_best_action_that_few_simulations_never_visit():
    model = Bandit([0.0, 0.1, 1.0, 0.2])
    prior = torch.tensor([[4.0, 0.0, 0.0, 0.0]])  # the prior loves action 0, which pays nothing
    root = RootOutput((torch.zeros(1),), prior, torch.zeros(1))
    mask = torch.ones(1, A, dtype=torch.bool)
    cfg = MCTSConfig(num_simulations=2, policy_target="improved")
    out = search(model, root, mask, cfg, np.random.default_rng(0), False, discount=1.0, temperature=0, lookahead_fn=model)
    assert out.visit_counts[0, 2] == 0  # search alone never tried it
    assert out.improved_policy.argmax(-1).item() == 2 and out.selected_action.item() == 2
    torch.testing.assert_close(out.improved_policy.sum(-1), torch.ones(1))
    visits_cfg = MCTSConfig(num_simulations=2, policy_target="visits")
    out = search(model, root, mask, visits_cfg, np.random.default_rng(0), False, discount=1.0, temperature=0, lookahead_fn=model)
    assert out.selected_action.item() == 0  # the reference behaviour follows the visits


def test_mixed_value_completion_takes_unvisited_actions_to_be_as_good_as_the_state():
    """mcts.complete_q: mixed_value gives every unvisited action mctx's v_mix, so an action the search never
    visited is not preferred on the model's one-step guess (one_step finds the bandit's best arm; this does not)."""
    value, q = torch.tensor([1.0]), torch.tensor([[2.0, 4.0, 0.0, 0.0]])
    visits, prior = torch.tensor([[1.0, 3.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    weighted = (0.5 * 2.0 + 0.25 * 4.0) / 0.75
    torch.testing.assert_close(mcts.mixed_value(value, q, visits, prior), torch.tensor([[(1.0 + 4 * weighted) / 5]]))

    model = Bandit([0.0, 0.1, 1.0, 0.2])
    root = RootOutput((torch.zeros(1),), torch.tensor([[4.0, 0.0, 0.0, 0.0]]), torch.zeros(1))
    mask = torch.ones(1, A, dtype=torch.bool)
    cfg = MCTSConfig(num_simulations=2, policy_target="improved", complete_q="mixed_value")
    out = search(model, root, mask, cfg, np.random.default_rng(0), False, discount=1.0, temperature=0, lookahead_fn=model)
    assert out.visit_counts[0, 2] == 0 and out.selected_action.item() != 2


def test_a_minimum_q_spread_keeps_a_fraction_of_a_point_from_overruling_the_policy_but_not_a_real_difference():
    """mcts.min_q_spread: min-max alone stretches Q values 0.01 apart (model noise) to the full range."""
    prior = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    mask = torch.ones(1, A, dtype=torch.bool)
    visits = torch.tensor([[20.0, 3.0, 2.0, 0.0]])
    noise = torch.tensor([[0.00, 0.01, 0.004, 0.002]])
    assert improved_policy(prior, noise, visits, mask, 50.0, 0.1).argmax().item() == 1  # noise wins
    assert improved_policy(prior, noise, visits, mask, 50.0, 0.1, min_spread=1.0).argmax().item() == 0
    real = torch.tensor([[0.0, 5.0, 0.0, 0.0]])  # five points better: still taken
    assert improved_policy(prior, real, visits, mask, 50.0, 0.1, min_spread=1.0).argmax().item() == 1
    torch.testing.assert_close(improved_policy(prior, real, visits, mask, 50.0, 0.1, min_spread=1.0),
                               improved_policy(prior, real, visits, mask, 50.0, 0.1))  # spread above the floor


class NoisyBelow:
    """The model right one step ahead and wrong beyond: every imagined state one step below the root is worth 10,
    every deeper one -50 (as the model's guesses for moves that do not exist in an imagined state can be)."""

    def __call__(self, state, action):
        (depth,) = state
        value = torch.where(depth + 1 == 1, 10.0, -50.0)
        return (depth + 1,), torch.zeros(len(action)), torch.zeros(len(action), A), value


@pytest.mark.parametrize("compiled", [True, False])
def test_root_value_lookahead_stores_the_improved_policys_one_step_q_not_the_deeper_searchs_mean(compiled):
    model = NoisyBelow()
    root = RootOutput((torch.zeros(1, dtype=torch.long),), torch.zeros(1, A), torch.zeros(1))
    mask = torch.tensor([[True, True, True, False]])
    searched = MCTSConfig(num_simulations=30, compiled=compiled)
    out = search(model, root, mask, searched, np.random.default_rng(0), False, discount=1.0, temperature=0,
                 lookahead_fn=model)
    assert out.root_value.item() < 0  # the search backs the deeper states' -50 up into the root's value
    ahead = searched.model_copy(update={"root_value": "lookahead"})
    out = search(model, root, mask, ahead, np.random.default_rng(0), False, discount=1.0, temperature=0,
                 lookahead_fn=model)
    torch.testing.assert_close(out.root_value, torch.tensor([10.0]))  # every valid move's one-step Q is 10

    # Moves of different one-step Q: the improved policy's expectation of them, the invalid move left out.
    bandit = Bandit([0.0, 0.1, 1.0, 5.0])
    prior = torch.tensor([[4.0, 0.0, 0.0, 0.0]])
    out = search(bandit, RootOutput((torch.zeros(1),), prior, torch.zeros(1)), mask, ahead.model_copy(
        update={"num_simulations": 2}), np.random.default_rng(0), False, discount=1.0, temperature=0,
        lookahead_fn=bandit)
    assert out.improved_policy[0, 3].item() < 1e-6
    torch.testing.assert_close(out.root_value, (out.improved_policy[:, :3] * torch.tensor([0.0, 0.1, 1.0])).sum(-1))


def test_root_value_lookahead_needs_the_improved_policy():
    with pytest.raises(ValueError, match="root_value 'lookahead' needs mcts.policy_target 'improved'"):
        MCTSConfig(root_value="lookahead", policy_target="visits")
    with pytest.raises(ValueError, match="needs the one-step Q of every root action"):
        search(Bandit([0.0] * A), RootOutput((torch.zeros(1),), torch.zeros(1, A), torch.zeros(1)),
               torch.ones(1, A, dtype=torch.bool), MCTSConfig(root_value="lookahead"), np.random.default_rng(0),
               False, discount=1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_compiled_walk_and_backup_keep_the_numpy_paths_trees(seed):
    """Two trees stepped in lockstep, one by mcts.simulate/backup (numpy), one by the numba kernels: the same
    walks, choices, visit counts and children after every simulation; values equal up to summation order."""
    from priorzero_core import mcts_compiled

    g = torch.Generator().manual_seed(seed)
    B, D, N = 4, 8, 60
    w = torch.randn(D + A, D, generator=g)

    def model(state, action):
        x = torch.tanh(torch.cat([state[0], torch.nn.functional.one_hot(action, A).float()], -1) @ w)
        return (x,), x[:, 0] * 2, x[:, 1:1 + A] * 3, x[:, -1]

    cfg = MCTSConfig(num_simulations=N)
    mask = torch.rand(B, A, generator=g) > 0.2
    mask[:, 0] = True
    root = RootOutput((torch.randn(B, D, generator=g),), torch.randn(B, A, generator=g), torch.randn(B, generator=g))
    prior = masked_softmax(root.prior_logits, mask)
    trees = [mcts.init_tree(root, mask, N, prior, cfg, 0.997) for _ in range(2)]
    envs = np.arange(B)
    for sim in range(1, N + 1):
        walks = [mcts.simulate(trees[0]), mcts_compiled.simulate(trees[1].best, trees[1].children, trees[1].root,
                                                                   trees[1].empty)]
        for (p0, a0), (p1, a1) in zip(walks[:1], walks[1:]):
            np.testing.assert_array_equal(p0, p1)
            np.testing.assert_array_equal(a0, a1)
        for k, (tree, (path, actions)) in enumerate(zip(trees, walks)):
            last = (path != tree.empty).sum(1) - 1
            leaf = tree.root + sim
            value = mcts.expand(tree, model, leaf, path[envs, last], actions[envs, last], mask)
            path = np.concatenate([path, np.full((B, 1), tree.empty)], 1)
            path[envs, last + 1] = leaf
            if k == 0:
                mcts.backup(tree, path, actions, value, 0.997, cfg)
            else:
                mcts_compiled.backup(path, actions, value, 0.997, tree.reward, tree.returns, tree.value_sum,
                                     tree.visit_count, tree.min_value, tree.max_value, tree.child_visits, tree.child_q,
                                     tree.explore, tree.best, tree.prior, tree.valid_mask, tree.root, tree.num_nodes,
                                     tree.expanded, tree.empty, cfg.pb_c_base, cfg.pb_c_init)
        numpy_tree, compiled_tree = trees
        for name in ("best", "children", "child_visits", "visit_count"):
            np.testing.assert_array_equal(getattr(numpy_tree, name), getattr(compiled_tree, name), err_msg=name)
        for name in ("value_sum", "child_q", "explore", "min_value", "max_value"):
            np.testing.assert_allclose(getattr(numpy_tree, name), getattr(compiled_tree, name), rtol=1e-12, atol=1e-12,
                                       err_msg=name)


def test_search_gives_the_same_result_compiled_or_not():
    model = ChainMDP()
    mask = torch.tensor([[True, True, True, False], [True, True, True, True], [False, True, True, True]])
    outs = []
    for compiled in (True, False):
        cfg = MCTSConfig(num_simulations=30, compiled=compiled)
        outs.append(search(model, model.root([2, 1, 3], [0, 3, 1]), mask, cfg, np.random.default_rng(0), True,
                           discount=0.997, temperature=0))
    assert torch.equal(outs[0].visit_counts, outs[1].visit_counts)
    assert torch.equal(outs[0].selected_action, outs[1].selected_action)
    torch.testing.assert_close(outs[0].root_value, outs[1].root_value)
