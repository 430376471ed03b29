import math

import pytest
import torch

from priorzero_core.config import PriorZeroConfig
from priorzero_core.llm_prior import plain_state_dict
from priorzero_core.ppo import PPOTrainer, orz_enabled
from priorzero_core.ppo.trainer import PPOStartupError, placement_plan
from priorzero_core.ppo.adapter import read_prompts, write_prompts

METRICS = ("train/ppo_policy_loss", "train/ppo_value_loss", "train/ppo_kl", "train/ppo_reward_mean",
           "train/ppo_response_len", "train/ppo_tokens_per_s")


def test_use_orz_trainer_auto_needs_ray_and_a_gpu(monkeypatch):
    """Unset, PPO trains the LLM only where it is fast enough to pay: Ray importable and a CUDA GPU present."""
    from priorzero_core.ppo import trainer as ppo_trainer

    for ray, gpu, expected in ((True, True, True), (True, False, False), (False, True, False)):
        monkeypatch.setattr(ppo_trainer, "ray_available", lambda: ray)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        assert orz_enabled(PriorZeroConfig()) is expected
    assert orz_enabled(PriorZeroConfig.model_validate({"ppo": {"use_orz_trainer": False}})) is False
    assert orz_enabled(PriorZeroConfig.model_validate({"ppo": {"use_orz_trainer": True}})) is True


# GRPO on Ray (no critic) in the slow set: its losses and placement are unit-tested in the default one
@pytest.mark.parametrize("algorithm", ["ppo", pytest.param("grpo", marks=pytest.mark.slow)])
def test_trainer_runs_on_ray_syncs_weights_and_leaves_no_process(algorithm, tiny_ppo_config, tiny_llm_dir, zork_segment,
                                                                process_tracker, tmp_path):
    children, still_running = process_tracker
    before = children()
    # GRPO: all 12 prompts in one rollout, so each train() ends a pass over the file (an ORZ episode) and with
    # refresh_reference the reference becomes the policy; PPO keeps the default (the starting policy stays it).
    grpo = algorithm == "grpo"
    # Placement: the local cluster declares 2 GPUs this machine lacks; the actors then run on the CPU where Ray
    # placed them. On 2 GPUs the old even share (0.667 each) never placed the third actor. GRPO runs 2
    # data-parallel ranks (ppo.dp_size), one per GPU, each with its reference: gloo between the policy's ranks.
    cfg = tiny_ppo_config(algorithm=algorithm, local_num_gpus=2, startup_timeout_s=120,
                          **(dict(refresh_reference=True, rollout_batch_size=12, dp_size=2) if grpo else {}))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def with_lora():
        """The tiny LM with non-zero LoRA adapters injected in place, as LLM training with llm.lora leaves the
        prior's model (PPO used to fail at start-up on its base_layer/lora_A keys)."""
        model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
        get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        return model

    start_model = with_lora() if grpo else None
    trainer = PPOTrainer(cfg, tmp_path / "run", policy_model=start_model)
    spawned = children() - before
    try:
        import ray

        assigned = {g.name: [ray.get(a.__ray_call__.remote(lambda actor: ray.get_gpu_ids())) for a in g.actors]
                    for g in (trainer.policy, trainer.reference, trainer.critic) if g is not None}
        if grpo:  # each rank of the policy on a GPU of its own, with its reference
            assert assigned["PolicyActor"] == assigned["ReferenceActor"] and sorted(assigned["PolicyActor"]) == [[0], [1]]
            assert ray.get([a.__ray_call__.remote(lambda actor: (actor.rank, actor.world)) for a in trainer.policy.actors]) \
                == [(0, 2), (1, 2)]
        else:  # the policy with its reference on one GPU, the critic on the other
            assert assigned["PolicyActor"] == assigned["ReferenceActor"] != assigned["CriticActor"]
        if grpo:  # PPO starts from the adapters merged in
            merged = plain_state_dict(start_model)
            assert all(torch.equal(merged[k], v) for k, v in trainer.policy_state_dict().items())
        prompts = trainer.adapt([zork_segment], iteration=5)
        assert prompts.name == "prompts-000005.jsonl" and len(read_prompts(prompts)) == len(zork_segment.steps)
        metrics = trainer.train(prompts)
        assert set(METRICS) <= set(metrics) and all(math.isfinite(metrics[k]) for k in METRICS)
        assert metrics["train/ppo_response_len"] > 0 and metrics["train/ppo_tokens_per_s"] > 0
        if algorithm == "grpo":
            assert trainer.critic is None and metrics["train/ppo_value_loss"] == 0.0

        # the MCTS prior gets exactly the trained policy (with LoRA adapters: as its base weights, adapters zeroed)
        prior = with_lora() if grpo else AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
        trainer.sync_to(prior)
        trained = trainer.policy_state_dict()
        assert all(torch.equal(plain_state_dict(prior)[k], v) for k, v in trained.items())

        trainer.save(tmp_path / "ckpt")
        next_draw = ([r.prompt for r in trainer._draw(prompts, read_prompts(prompts))], trainer._rng.integers(1 << 31))
        second = trainer.train(prompts)
        reference = ray.get(trainer.reference.actors[0].__ray_call__.remote(
            lambda actor: {k: v.cpu() for k, v in actor.model.state_dict().items()}))
        policy = trainer.policy_state_dict()
        if grpo:  # the pass ended: the reference is the policy it trained; both ranks hold the same policy
            assert all(torch.equal(reference[k], v) for k, v in policy.items())
            other = ray.get(trainer.policy.actors[1].state_dict.remote())
            assert all(torch.equal(other[k], v) for k, v in policy.items())
        else:  # the starting policy: once the policy has moved, the KL and its penalty on the returns are not 0
            start = AutoModelForCausalLM.from_pretrained(tiny_llm_dir).state_dict()
            assert all(torch.equal(reference[k], start[k]) for k in policy)
            # (the first rollout's advantages are all 0 here: equal rewards and a critic head that starts at 0)
            assert metrics["train/ppo_grad_norm"] == 0 and second["train/ppo_grad_norm"] > 0
            third = trainer.train(prompts)
            assert third["train/ppo_kl"] > 0 and third["train/ppo_kl_penalty"] != 0, third
        if algorithm == "ppo":  # (GRPO's groups here may all tie, leaving no advantage to move the policy)
            assert any(not torch.equal(policy[k], v) for k, v in trained.items())  # and that policy moved on
        trainer.load(tmp_path / "ckpt")
        assert trainer.global_step == 1
        # the prompt pass and the generation seeds go on from the checkpoint (not from run.seed again)
        assert ([r.prompt for r in trainer._draw(prompts, read_prompts(prompts))],
                trainer._rng.integers(1 << 31)) == next_draw
        assert all(torch.equal(trainer.policy_state_dict()[k], v) for k, v in trained.items())

        # a stage failing inside an actor (empty prompts cannot be generated from) raises; close() still cleans up
        bad = read_prompts(prompts)
        for rec in bad:
            rec.prompt = ""
        with pytest.raises(Exception):
            trainer.train(write_prompts(tmp_path / "bad.jsonl", bad))
        # the actors still answer after that failure: their state is saved for the actors that replace them
        assert trainer.rescue(tmp_path / "rescue") and (tmp_path / "rescue" / "policy").is_dir()
        if not grpo:  # a critic actor that is gone: nothing is saved, nothing left half-written
            ray.kill(trainer.critic.actors[0])
            assert not trainer.rescue(tmp_path / "rescue2", timeout_s=60)
            assert not (tmp_path / "rescue2").exists()
        spawned |= children() - before
    finally:
        trainer.close()
    assert spawned, "a local Ray cluster should have started processes"
    leaked = still_running(spawned)
    assert not leaked, f"still running after close(): {[p.name() for p in leaked]}"


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("grpo", [False, True], ids=["ppo", "grpo"])
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_every_placement_plan_fits_its_gpus_keeps_the_policy_with_its_reference_and_ranks_apart(gpus, grpo, ranks):
    if ranks > gpus:
        with pytest.raises(PPOStartupError, match=f"ppo.dp_size={ranks} needs a GPU for each rank"):
            placement_plan(gpus, grpo, ranks)
        return
    plan = placement_plan(gpus, grpo, ranks)
    assert set(plan) == {"policy", "reference"} | (set() if grpo else {"critic"})
    per_bundle: dict[int, float] = {}
    for places in plan.values():
        assert len(places) == ranks
        assert len({bundle for bundle, _ in places}) == ranks  # NCCL: the ranks of one model on GPUs apart
        for bundle, share in places:
            assert 0 <= bundle < gpus and 0 < share <= 1
            per_bundle[bundle] = per_bundle.get(bundle, 0.0) + share
    assert all(total <= 1 + 1e-9 for total in per_bundle.values())  # each GPU holds what is placed on it
    if gpus // ranks < len(plan):
        assert plan["policy"] == plan["reference"]
    else:
        assert all(share == 1.0 for places in plan.values() for _, share in places)
    assert placement_plan(0, grpo, ranks) == {g: [(None, 0.0)] * ranks for g in plan}


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("grpo", [False, True], ids=["ppo", "grpo"])
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("engines,tp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_vllm_engines_in_the_placement_plan_fit_beside_the_training_actors(gpus, grpo, ranks, engines, tp):
    dedicated = engines * tp if tp > 1 else 0
    if ranks > gpus - dedicated:
        with pytest.raises(PPOStartupError, match=f"dp_size={ranks} needs a GPU for each rank.*vLLM engine"
                           if dedicated else f"dp_size={ranks}"):
            placement_plan(gpus, grpo, ranks, engines, tp)
        return
    plan = placement_plan(gpus, grpo, ranks, engines, tp)
    assert len(plan["engine"]) == engines
    load: dict[int, float] = {}
    for name, places in plan.items():
        for first, share in places:
            for gpu in range(first, first + (tp if name == "engine" and tp > 1 else 1)):
                assert 0 <= gpu < gpus
                load[gpu] = load.get(gpu, 0.0) + min(share, 1.0)
    assert all(total <= 1 + 1e-9 for total in load.values())  # no GPU holds more than it has
    if tp > 1:  # tensor-parallel engines: whole GPUs of their own, after the training actors'
        assert plan["engine"] == [(gpus - dedicated + i * tp, float(tp)) for i in range(engines)]
        assert {k: v for k, v in plan.items() if k != "engine"} == placement_plan(gpus - dedicated, grpo, ranks)
    else:  # engine i sits among rank i mod ranks's GPUs
        own = gpus // ranks
        assert all((i % ranks) * own <= first < (i % ranks + 1) * own for i, (first, _) in enumerate(plan["engine"]))
        members = len(plan) - 1 + engines  # the groups and engines, each rank's GPUs shared by its members
        if members > ranks * own:  # more members than GPUs: none of them stays idle
            assert set(load) == set(range(ranks * own))
    assert placement_plan(0, grpo, ranks, engines, tp)["engine"] == [(None, 0.0)] * engines


@pytest.mark.parametrize("gpus,ranks,engines,tp,sleeps", [
    (1, 1, 1, 1, [True]),  # the engine shares GPU 0 with all three groups
    (2, 1, 1, 1, [True]),  # beside the critic
    (8, 2, 2, 1, [False, False]),  # a GPU of its own each
    (4, 1, 1, 2, [False]),  # tensor parallel: 2 GPUs of its own
    (0, 1, 1, 1, [False]),  # no GPU: vLLM on CPU has no sleep mode
])
def test_a_vllm_engine_sleeps_while_the_actors_train_when_it_shares_their_gpu(gpus, ranks, engines, tp, sleeps):
    from priorzero_core.config import PPOConfig
    from priorzero_core.ppo.generation import engine_sleeps

    options = [{"num_cpus": 1, "num_gpus": share} for _, share in placement_plan(gpus, False, ranks, engines, tp)["engine"]]
    assert [engine_sleeps(PPOConfig(), o) for o in options] == sleeps
    for forced in (True, False):  # vllm_sleep set: every engine does as it says
        assert [engine_sleeps(PPOConfig(vllm_sleep=forced), o) for o in options] == [forced] * engines


def test_the_plan_s_groups_and_engines_are_placed_on_the_gpus_it_gives_them(monkeypatch):
    """Ray accepts GPUs a machine lacks: on 4 declared GPUs each group lands where the plan says, a tensor-parallel
    engine gets its 2 GPUs whole, and a plan the cluster cannot hold is a one-line error instead of a hang."""
    import ray

    from priorzero_core.ppo.trainer import place

    class Probe:
        def gpus(self) -> list[str]:
            return sorted(str(g) for g in ray.get_gpu_ids())

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(_node_ip_address="127.0.0.1", num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False)
    try:
        for engines, tp in ((2, 1), (1, 2)):
            plan = placement_plan(4, False, 1, engines, tp)
            pg, opts = place(plan, 0.25, 60, "test")
            probes = {name: [ray.remote(Probe).options(**o).remote() for o in group] for name, group in opts.items()}
            got = {name: ray.get([p.gpus.remote() for p in group]) for name, group in probes.items()}
            for group in probes.values():
                for probe in group:
                    ray.kill(probe)
            ray.util.remove_placement_group(pg)
            assert len(got["policy"][0]) == 1 and got["policy"] == got["reference"]  # colocated, as in ORZ
            if tp == 1:  # 5 members on 4 GPUs: policy with reference, then a GPU each for critic and engines
                assert len(set(map(tuple, got["engine"]))) == 2
                assert not set(got["critic"][0]) & set(got["engine"][0] + got["engine"][1] + got["policy"][0])
            else:  # the engine's 2 GPUs are neither the policy's nor the critic's
                assert len(got["engine"][0]) == 2
                assert not set(got["engine"][0]) & set(got["policy"][0] + got["critic"][0])
        with pytest.raises(PPOStartupError, match=r"could not place 6 GPU bundle\(s\) \(8 GPUs.*within 2 s") as err:
            place(placement_plan(8, False, 2, 2, 2), 0.25, 2, "test")  # 2 ranks on 4 GPUs, 2 engines on 4 more
        assert "\n" not in str(err.value)
    finally:
        ray.shutdown()


def test_grpo_without_groups_is_a_config_error():
    from priorzero_core.config import config_from_dict
    from priorzero_core.errors import ConfigError

    with pytest.raises(ConfigError, match="n_samples_per_prompt"):
        config_from_dict({"ppo": {"algorithm": "grpo", "n_samples_per_prompt": 1}})
