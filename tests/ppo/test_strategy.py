import pytest
import torch

from priorzero_core.config import LLMConfig, PPOConfig
from priorzero_core.ppo.actors import CriticActor, PolicyActor, ReferenceActor
from priorzero_core.ppo.experience import make_rollout
from priorzero_core.ppo.losses import gae, normalise, token_rewards
from priorzero_core.ppo.strategy import TorchStrategy, make_strategy

PROMPTS = ["<|im_start|>user\nYou are in a kitchen.<|im_end|>\n<|im_start|>assistant\n<answer>", "west of house <answer>"]


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def ppo_step(cfg: PPOConfig, llm: LLMConfig) -> tuple[dict, dict, bool]:
    """One full PPO update (rollout, reference, critic, GAE, both trainings) run in-process; whether it changed the
    policy's weights and the critic's (value head and trunk)."""
    policy, reference, critic = PolicyActor(cfg, llm), ReferenceActor(cfg, llm), CriticActor(cfg, llm)
    before, critic_before = policy.state_dict(), {k: v.clone() for k, v in critic.model.module.state_dict().items()}
    samples = policy.generate(PROMPTS, 2, seed=0)
    rollout = make_rollout([s.prompt_ids for s in samples], [s.response_ids for s in samples], pad_id=2)
    rollout.old_logp, rollout.ref_logp = policy.logprobs(rollout), reference.logprobs(rollout)
    rollout.values = critic.values(rollout) * rollout.action_mask
    rewards = token_rewards(torch.tensor([1.0, -1.0, 0.5, 0.0]), torch.zeros_like(rollout.old_logp), rollout.action_mask, 0.0)
    adv, rollout.returns = gae(rewards, rollout.values, rollout.action_mask, 1.0, 1.0)
    rollout.advantages = normalise(adv, rollout.action_mask)
    p_stats, c_stats = policy.train(rollout), critic.train(rollout)
    critic_after = critic.model.module.state_dict()
    critic_moved = changed({k: v for k, v in critic_before.items() if "value_head" in k}, critic_after) and \
        changed({k: v for k, v in critic_before.items() if "value_head" not in k}, critic_after)
    return p_stats, c_stats, changed(before, policy.state_dict()) and critic_moved


def test_torch_strategy_runs_a_ppo_step(tiny_llm_dir):
    cfg = PPOConfig(strategy="torch", bf16=False, actor_lr=1e-3, critic_lr=1e-3, train_batch_size=2, critic_update_steps=2,
                    generate_max_tokens=6)
    p_stats, c_stats, moved = ppo_step(cfg, LLMConfig(model=str(tiny_llm_dir)))
    assert moved and all(torch.isfinite(torch.tensor(v)) for v in [*p_stats.values(), *c_stats.values()])


def test_a_grpo_update_moves_the_policy_toward_the_better_answer_of_its_group(tiny_llm_dir):
    """GRPO (no critic): with one answer of a prompt's group rewarded over the other, the update changes the
    policy's weights and raises that answer's log-probability relative to the other's."""
    from priorzero_core.ppo.losses import group_advantages

    llm = LLMConfig(model=str(tiny_llm_dir))
    cfg = PPOConfig(algorithm="grpo", strategy="torch", bf16=False, actor_lr=1e-3, train_batch_size=4,
                    generate_max_tokens=6, n_samples_per_prompt=2)
    policy, reference = PolicyActor(cfg, llm), ReferenceActor(cfg, llm)
    before = policy.state_dict()
    samples = policy.generate(PROMPTS, 2, seed=0)
    rollout = make_rollout([s.prompt_ids for s in samples], [s.response_ids for s in samples], pad_id=2)
    assert rollout.sequences[0].tolist() != rollout.sequences[1].tolist()  # the group's two answers differ
    rollout.old_logp, rollout.ref_logp = policy.logprobs(rollout), reference.logprobs(rollout)
    reward = torch.tensor([1.0, 0.0, 0.0, 1.0])  # each prompt's group: one answer rewarded
    rollout.advantages = group_advantages(reward, 2, rollout.action_mask)
    stats = policy.train(rollout)
    assert changed(before, policy.state_dict()) and all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    gain = ((policy.logprobs(rollout) - rollout.old_logp) * rollout.action_mask).sum(-1)
    assert gain[0] > gain[1] and gain[3] > gain[2], gain


def test_an_actor_runs_the_torch_threads_configured_else_those_of_its_reserved_cpus(tiny_llm_dir):
    """ppo.actor_threads: a PPO step runs mostly one actor at a time, so an actor may use more threads than the
    CPUs Ray reserves for it."""
    from priorzero_core.ppo.actors import actor_threads

    assert actor_threads(PPOConfig(actor_num_cpus=0.5)) == 1 and actor_threads(PPOConfig(actor_num_cpus=2)) == 2
    before = torch.get_num_threads()
    try:
        ReferenceActor(PPOConfig(actor_num_cpus=1, actor_threads=3), LLMConfig(model=str(tiny_llm_dir)))
        assert torch.get_num_threads() == 3
        ReferenceActor(PPOConfig(actor_num_cpus=2), LLMConfig(model=str(tiny_llm_dir)))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_deepspeed_strategy_runs_a_ppo_step_on_cpu(tiny_llm_dir):
    """ZeRO-2 + bf16 + gradient checkpointing, one gloo rank: the code path a GPU run takes."""
    pytest.importorskip("deepspeed")
    cfg = PPOConfig(strategy="deepspeed", gradient_checkpointing=True, actor_lr=1e-3, critic_lr=1e-3, train_batch_size=2,
                    critic_update_steps=1, generate_max_tokens=6, num_warmup_steps=1,  # one step: bf16 must see it
                    micro_train_batch_size=1)  # each minibatch's gradients accumulated over two micro-batches
    p_stats, c_stats, moved = ppo_step(cfg, LLMConfig(model=str(tiny_llm_dir)))
    assert moved and all(torch.isfinite(torch.tensor(v)) for v in [*p_stats.values(), *c_stats.values()])
    from deepspeed.comm import comm

    assert comm.cdb.shm_comm_op is None  # one rank: DeepSpeed's shared-memory all-reduce op is not compiled


def test_learning_rates_warm_up_over_the_first_updates_and_resume_where_they_were(tiny_llm_dir, tmp_path):
    """ORZ ramps both learning rates over num_warmup_steps updates; without it the first PPO updates of a fresh
    critic moved the policy at full rate."""
    from transformers import AutoModelForCausalLM

    cfg = PPOConfig(strategy="torch", num_warmup_steps=4, gradient_checkpointing=False)
    model = TorchStrategy(cfg, torch.device("cpu")).prepare(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), 1e-3)
    rates = []
    for _ in range(5):
        rates.append(model.optimizer.param_groups[0]["lr"])
        model.module(torch.tensor([[1, 2, 3]])).logits.sum().backward()
        model.step()
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    model.save(tmp_path)
    again = TorchStrategy(cfg, torch.device("cpu")).prepare(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), 1e-3)
    again.load(tmp_path)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_auto_strategy_is_torch_on_cpu():
    assert isinstance(make_strategy(PPOConfig(), torch.device("cpu")), TorchStrategy)


def test_checkpointing_works_with_either_transformers_method_name(tiny_llm_dir):
    """transformers renamed gradient_checkpointing_enable to activation_checkpointing_enable; a GPU image with the
    older name failed every DeepSpeed PPO actor before enable_checkpointing handled both."""
    from priorzero_core.ppo.models import Critic, enable_checkpointing
    from priorzero_core.llm_prior import load_causal_lm

    lm, _ = load_causal_lm(LLMConfig(model=str(tiny_llm_dir)))
    calls = []

    class OldName(torch.nn.Module):
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs):
            calls.append(gradient_checkpointing_kwargs)

    enable_checkpointing(OldName())
    assert calls == [{"use_reentrant": False}]
    Critic(lm).activation_checkpointing_enable()
    assert lm.model.gradient_checkpointing


def test_response_logprobs_in_blocks_equal_one_full_forward_with_their_gradients(tiny_llm_dir):
    """The LM head runs a few rows at a time (and is recomputed in the backward), so the rollout's fp32
    full-vocabulary logits never exist at once; values and gradients are those of the plain forward."""
    from transformers import AutoModelForCausalLM

    from priorzero_core.ppo.experience import position_ids
    from priorzero_core.ppo.models import response_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 1000, (5, 20), generator=g)
    mask = torch.ones_like(seqs)
    mask[0, :3] = 0  # a left-padded prompt

    def plain() -> torch.Tensor:
        logits = model(input_ids=seqs, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
        logits, targets = logits[:, -8:-1].float(), seqs[:, -7:]
        return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)

    with torch.no_grad():
        assert torch.allclose(response_logprobs(model, seqs, mask, 7, rows=2), plain(), atol=1e-6)
    grads = []
    for forward in (plain, lambda: response_logprobs(model, seqs, mask, 7, rows=2)):
        model.zero_grad()
        (forward() * torch.linspace(-1, 1, 7)).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_making_experience_in_micro_batches_gives_the_one_batch_result(tiny_llm_dir):
    llm = LLMConfig(model=str(tiny_llm_dir))
    rollout = make_rollout([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]], [[1, 2], [3], [4, 5, 6], [7, 8]], pad_id=2)
    results = []
    for micro in (1, 16):
        cfg = PPOConfig(strategy="torch", micro_forward_batch_size=micro)
        reference, critic = ReferenceActor(cfg, llm), CriticActor(cfg, llm)
        with torch.no_grad():  # a value head that is not zero, the same in both
            critic.model.module.value_head.weight.copy_(torch.linspace(-1, 1, critic.model.module.value_head.in_features))
        results.append((reference.logprobs(rollout), critic.values(rollout)))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*results))


def test_training_in_micro_batches_makes_the_same_update_as_whole_minibatches(tiny_llm_dir):
    """Gradients accumulate over micro-batches weighted by their share of the minibatch's response tokens, so
    memory follows micro_train_batch_size while each update applies the minibatch's gradient."""
    llm = LLMConfig(model=str(tiny_llm_dir))
    rollout = make_rollout([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]], [[1, 2], [3], [4, 5, 6], [7, 8]], pad_id=2)
    runs = []
    for micro in (1, 4):
        cfg = PPOConfig(strategy="torch", train_batch_size=4, critic_update_steps=1, num_warmup_steps=0,
                        micro_train_batch_size=micro, gradient_checkpointing=False)
        policy, critic = PolicyActor(cfg, llm), CriticActor(cfg, llm)
        rollout.old_logp = rollout.ref_logp = policy.logprobs(rollout)
        rollout.values = torch.zeros_like(rollout.old_logp)
        rollout.advantages = torch.linspace(-1, 1, rollout.old_logp.numel()).view_as(rollout.old_logp) * rollout.action_mask
        rollout.returns = rollout.advantages
        grads: list[list[torch.Tensor]] = []
        for actor in (policy, critic):  # the gradient each update applies
            step = actor.model.step
            actor.model.step = lambda step=step, model=actor.model: (
                grads.append([p.grad.clone() for p in model.params]), step())[1]
        stats = policy.train(rollout), critic.train(rollout)
        runs.append((grads, stats))
    (g1, s1), (g4, s4) = runs
    assert len(g1) == len(g4) == 2  # one update each for policy and critic, however many micro-batches
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for x, y in zip(g1, g4) for a, b in zip(x, y))
    assert s1[0]["policy_loss"] == pytest.approx(s4[0]["policy_loss"], abs=1e-6)
    assert s1[1]["value_loss"] == pytest.approx(s4[1]["value_loss"], abs=1e-6)


PEAK_RSS_STEP = """
import sys, threading, psutil, torch
from priorzero_core.config import LLMConfig, PPOConfig
from priorzero_core.ppo.actors import CriticActor, PolicyActor, ReferenceActor
from priorzero_core.ppo.experience import make_rollout
torch.manual_seed(0)
batch, micro = int(sys.argv[2]), int(sys.argv[3])
cfg = PPOConfig(strategy="torch", train_batch_size=batch, critic_update_steps=1, num_warmup_steps=0,
                micro_forward_batch_size=micro, micro_train_batch_size=micro)
llm = LLMConfig(model=sys.argv[1])
policy, reference, critic = PolicyActor(cfg, llm), ReferenceActor(cfg, llm), CriticActor(cfg, llm)
prompts = torch.randint(10, 1000, (batch, 32)).tolist()
responses = torch.randint(10, 1000, (batch, 48)).tolist()
rollout = make_rollout(prompts, responses, pad_id=2)
me = psutil.Process()
before = peak = me.memory_info().rss
done = threading.Event()
def sample():  # the high-water mark of this step alone (ru_maxrss would include loading the models)
    global peak
    while not done.is_set():
        peak = max(peak, me.memory_info().rss)
        done.wait(0.001)
sampler = threading.Thread(target=sample)
sampler.start()
rollout.old_logp, rollout.ref_logp = policy.logprobs(rollout), reference.logprobs(rollout)
rollout.values = critic.values(rollout) * rollout.action_mask
rollout.advantages = rollout.returns = torch.linspace(-1, 1, rollout.old_logp.numel()).view_as(rollout.old_logp) * rollout.action_mask
policy.train(rollout), critic.train(rollout)
done.set()
sampler.join()
print((peak - before) / 2**20)
"""


@pytest.mark.slow  # three fresh processes with torch and a tiny LM: ≈ 35 s
def test_peak_memory_of_a_ppo_step_follows_the_micro_batch_not_the_rollout(tiny_llm_dir):
    """Making experience and updating with a 4x larger rollout at the same micro-batch raises peak RSS by far
    less than the 4x more full-vocabulary logits would; with micro-batches as large as the rollout it does not."""
    import subprocess
    import sys

    def peak_mb(batch: int, micro: int) -> float:
        out = subprocess.run([sys.executable, "-c", PEAK_RSS_STEP, str(tiny_llm_dir), str(batch), str(micro)],
                             capture_output=True, text=True, check=True, env={"TOKENIZERS_PARALLELISM": "false",
                                                                               "OMP_NUM_THREADS": "1", "PATH": ""})
        return float(out.stdout.split()[-1])

    logits_mb = 48 * 49152 * 4 / 2**20  # one response's fp32 logits over the vocabulary: 9 MB
    small, large = peak_mb(8, 4), peak_mb(32, 4)
    assert large - small < 6 * logits_mb, (small, large)  # 24 more responses would be 216 MB of logits alone
    whole = peak_mb(32, 32)
    assert whole - large > 10 * logits_mb, (large, whole)  # the same rollout in one piece: the test can tell


DP_RANK = """
import sys, torch
import torch.nn.utils as U
from priorzero_core.config import LLMConfig, PPOConfig
from priorzero_core.ppo.actors import CriticActor, PolicyActor
from priorzero_core.ppo.experience import Rollout

model, rank, world, port, data, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
strategy = sys.argv[7]
torch.set_num_threads(1)
grads, clip = [], U.clip_grad_norm_
def capture(params, *args, **kwargs):  # the gradient each update applies, after the ranks' all-reduce
    params = list(params)
    grads.append([p.grad.clone() for p in params])
    return clip(params, *args, **kwargs)
U.clip_grad_norm_ = capture
cfg = PPOConfig(strategy=strategy, bf16=False, actor_lr=1e-3, critic_lr=1e-3, train_batch_size=4, micro_train_batch_size=1,
                policy_update_steps=2, critic_update_steps=1, num_warmup_steps=0, gradient_checkpointing=False,
                actor_num_cpus=1, dp_size=world)
dist = (rank, world, "127.0.0.1", port) if world > 1 else None
rollout = Rollout(**torch.load(data, weights_only=True))
policy = PolicyActor(cfg, LLMConfig(model=model), dist=dist)
p_stats = policy.train(rollout)
torch.manual_seed(0)  # the critic's value head starts alike in every process
critic = CriticActor(cfg, LLMConfig(model=model), dist=dist)
c_stats = critic.train(rollout)
torch.save({"grads": grads, "stats": {**p_stats, **c_stats}, "weights": policy.state_dict()}, out)
"""


def run_ranks(model_dir, tmp_path, strategy: str) -> tuple[dict, dict, dict]:
    """One process training alone and two training as data-parallel ranks, on the same rollout: what each saved."""
    import subprocess
    import sys

    torch.manual_seed(1)
    rollout = make_rollout(torch.randint(10, 400, (8, 12)).tolist(),
                           [torch.randint(10, 400, (n,)).tolist() for n in (5, 3, 6, 2, 4, 6, 1, 5)], pad_id=2)
    shape = rollout.action_mask.shape
    data = {"sequences": rollout.sequences, "attention_mask": rollout.attention_mask,
            "action_mask": rollout.action_mask, "old_logp": -torch.rand(shape) * rollout.action_mask,
            "ref_logp": -torch.rand(shape) * rollout.action_mask, "values": torch.randn(shape) * rollout.action_mask,
            "advantages": torch.randn(shape) * rollout.action_mask, "returns": torch.randn(shape) * rollout.action_mask}
    torch.save(data, tmp_path / "rollout.pt")
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PATH": ""}
    runs = {name: subprocess.Popen([sys.executable, "-c", DP_RANK, str(model_dir), str(rank), str(world),
                                    str(store.port), str(tmp_path / "rollout.pt"), str(tmp_path / f"{name}.pt"),
                                    strategy], env=env, stderr=subprocess.PIPE, text=True)
            for name, rank, world in (("alone", 0, 1), ("rank0", 0, 2), ("rank1", 1, 2))}
    for name, proc in runs.items():
        assert proc.wait(timeout=300) == 0, f"{name}: {proc.stderr.read()[-3000:]}"
    return tuple(torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in runs)


def test_two_data_parallel_ranks_make_the_update_one_rank_makes_on_the_whole_minibatch(tiny_llm_dir, tmp_path):
    """ppo.dp_size: each rank (its own process, gloo over a store the driver holds, as the Ray actors do) trains
    on every other response of each minibatch; the summed gradients, the losses and the weights after six updates
    are those of one rank training on every response."""
    alone, rank0, rank1 = run_ranks(tiny_llm_dir, tmp_path, "torch")
    assert len(alone["grads"]) == len(rank0["grads"]) == 6  # 2 passes x 2 minibatches of 4 (policy), 1 x 2 (critic)
    for one, two in zip(alone["grads"], rank0["grads"]):
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(one, two))
    for key, value in alone["stats"].items():
        assert rank0["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert rank0["stats"] == rank1["stats"]  # every rank reports the totals
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])  # ranks in step
    assert all(torch.allclose(alone["weights"][k], rank0["weights"][k], atol=1e-5) for k in alone["weights"])
    # the test can tell: rank 0's share alone is not the minibatch's gradient
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-6)
                   for a, b in zip(alone["grads"][0], [g / 2 for g in rank0["grads"][0]]))


@pytest.mark.slow  # three processes starting DeepSpeed: ≈ 40 s
def test_two_deepspeed_ranks_make_the_update_one_rank_makes(tiny_llm_dir, tmp_path):
    """ZeRO-2 over two gloo ranks (fp32 here, so that the comparison is exact up to summation order): ZeRO averages
    the ranks' gradients, which the loss's factor turns back into the minibatch's sum."""
    pytest.importorskip("deepspeed")
    alone, rank0, rank1 = run_ranks(tiny_llm_dir, tmp_path, "deepspeed")
    for key, value in alone["stats"].items():
        assert rank0["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert rank0["stats"] == rank1["stats"]
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    assert all(torch.allclose(alone["weights"][k], rank0["weights"][k], atol=1e-5) for k in alone["weights"])
