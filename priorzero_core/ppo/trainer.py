"""PPOTrainer: ORZ's make-experience → train loop over Ray actor groups, fed by game segments.

One rollout: generate n responses per prompt → judge them (reward actors) → policy/reference log-probs and
critic values → token rewards (last token, minus KL) → GAE or GRPO group advantages → train critic and
policy in parallel → push the new weights to the generation engine.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..config import PriorZeroConfig
from ..errors import first_line
from ..llm_prior import load_plain_state_dict, load_tokenizer, plain_state_dict, resolve_model_dir
from ..ray_cluster import connect_ray
from ..replay import GameSegment
from .actors import ActorGroup, CriticActor, PolicyActor, ReferenceActor, RewardActor, StateDict
from .adapter import GameSegmentToORZAdapter, PromptRecord, read_prompts, write_prompts
from .experience import make_rollout
from .generation import GenerationEngine, Sample, engine_kind, make_engine
from .losses import approx_kl, gae, group_advantages, masked_mean, normalise, token_rewards
from .reward import Judgement

logger = logging.getLogger(__name__)

STATE_FILE = "ppo_state.json"


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def orz_enabled(cfg: PriorZeroConfig) -> bool:
    """`ppo.use_orz_trainer`, or when unset: on when Ray is importable and a CUDA GPU is there. On a CPU a PPO
    stage (rollouts, 4 actor copies, 12 critic updates) takes tens of minutes where SFT/RFT takes one or two,
    so unset means SFT/RFT there."""
    if cfg.ppo.use_orz_trainer is not None:
        return cfg.ppo.use_orz_trainer
    import torch

    return ray_available() and torch.cuda.is_available()


class PPOStartupError(RuntimeError):
    """The PPO actors could not be placed or started on the Ray cluster."""


def placement_plan(gpus: int, grpo: bool, ranks: int = 1, engines: int = 0,
                   engine_tp: int = 1) -> dict[str, list[tuple[Optional[int], float]]]:
    """{model group: [(GPU index, GPU share) for each data-parallel rank]} on `gpus` GPUs, and with `engines`
    vLLM engines {"engine": [(first GPU, GPUs) for each engine]}; (None, 0) each without GPUs.

    Each rank gets `gpus // ranks` GPUs of its own, so no two ranks of one group share a GPU (NCCL cannot put two
    ranks of a communicator on one device). Within a rank's GPUs each group gets one of its own when there are
    enough; with fewer they are spread over all of them in order, policy + reference first (ORZ/OpenRLHF colocate
    the policy with its reference), each taking an equal share of its GPU, so every plan fits (a share of gpus /
    groups did not: 0.667 of a GPU three times on 2 GPUs waits forever). Extra GPUs stay free for the driver's
    world model.

    Engines of one GPU (`engine_tp` 1) join the ranks' groups (engine i with rank i mod ranks, after its critic)
    and share GPUs by the same rule; engines of `engine_tp` > 1 GPUs (tensor parallel) each take `engine_tp` GPUs
    of their own at the end, and the ranks share what is left."""
    groups = ["policy", "reference"] + ([] if grpo else ["critic"])
    if gpus <= 0:
        plan = {g: [(None, 0.0)] * ranks for g in groups}
        return {**plan, "engine": [(None, 0.0)] * engines} if engines else plan
    dedicated = engines * engine_tp if engine_tp > 1 else 0
    left = gpus - dedicated
    if ranks > left:
        raise PPOStartupError(f"ppo.dp_size={ranks} needs a GPU for each rank (NCCL ranks of one model cannot share "
                              f"a GPU); the Ray cluster has {gpus}"
                              + (f", {dedicated} of them for {engines} vLLM engine(s) of {engine_tp} GPUs" if dedicated
                                 else ""))
    own = left // ranks
    plan: dict[str, list[tuple[Optional[int], float]]] = {g: [] for g in groups}
    shared_engines: list[tuple[int, float]] = []
    for r in range(ranks):
        members = groups + [f"engine{i}" for i in range(engines) if engine_tp == 1 and i % ranks == r]
        # one GPU each while there are enough; else spread over all of them, so none stays idle
        gpu_of = [j if len(members) <= own else j * own // len(members) for j in range(len(members))]
        for j, member in enumerate(members):
            spot = (r * own + gpu_of[j], 1.0 / gpu_of.count(gpu_of[j]))
            if member in plan:
                plan[member].append(spot)
            else:
                shared_engines.append((int(member[len("engine"):]), spot))
    if engines:
        plan["engine"] = ([spot for _, spot in sorted(shared_engines)] if engine_tp == 1
                          else [(left + i * engine_tp, float(engine_tp)) for i in range(engines)])
    return plan


def place(plan: dict[str, list[tuple[Optional[int], float]]], cpus: float, timeout_s: float,
          what: str) -> tuple[Any, dict[str, list[dict[str, Any]]]]:
    """A placement group for `plan`'s GPUs (None without any) and each group's Ray options in it: one bundle per
    GPU used, of 1 GPU, or of a tensor-parallel engine's GPUs; the groups on one bundle are colocated, as in ORZ.
    A group that cannot be placed within `timeout_s` is a one-line PPOStartupError naming `what` was placed."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    size: dict[int, float] = {}  # a bundle's first GPU → its GPUs
    members: dict[int, int] = {}
    for places in plan.values():
        for first, share in places:
            if first is not None:
                size[first] = max(size.get(first, 1.0), share)
                members[first] = members.get(first, 0) + 1
    if not size:
        return None, {}
    index = {first: i for i, first in enumerate(sorted(size))}
    pg = placement_group([{"GPU": size[b], "CPU": cpus * members[b]} for b in sorted(size)], strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise PPOStartupError(f"PPO could not place {len(size)} GPU bundle(s) ({sum(size.values()):g} GPUs, up to "
                              f"{cpus * max(members.values()):g} CPU each: {what}) within {timeout_s:g} s; the Ray "
                              f"cluster has {ray.available_resources()}")
    return pg, {name: [{"num_cpus": cpus, "num_gpus": share, "scheduling_strategy":
                        PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index[first])}
                       for first, share in places] for name, places in plan.items()}


class PPOTrainer:
    """Owns the Ray actor groups and the generation engine for one run; `close()` releases all of them."""

    def __init__(self, cfg: PriorZeroConfig, run_dir: Path | str, policy_model: Optional[nn.Module] = None):
        self.cfg = cfg
        self.ppo = cfg.ppo
        self.run_dir = Path(run_dir)
        self.work_dir = self.run_dir / "ppo"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.model_dir = resolve_model_dir(cfg.llm)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.adapter = GameSegmentToORZAdapter(self.ppo)
        self.global_step = 0
        self._rng = np.random.default_rng(cfg.run.seed)
        self._passes: dict[str, tuple[np.ndarray, int]] = {}  # prompt file → (shuffled order, next position)
        self._groups: list[ActorGroup] = []
        self._engine: Optional[GenerationEngine] = None
        self._owns_ray = False
        self._pg: Any = None  # the GPU placement group, when there are GPUs
        self._closed = False
        atexit.register(self.close)
        try:
            self._start(policy_model)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ set-up
    def _start(self, policy_model: Optional[nn.Module]) -> None:
        import ray

        grpo = self.ppo.algorithm == "grpo"
        self._owns_ray = connect_ray(self.cfg, self.ppo.ray_address or self.cfg.ray.address, ppo=True, who="PPO")
        ranks = self.ppo.dp_size
        kind = engine_kind(self.ppo)
        engines = self.ppo.vllm_num_engines if kind == "actors" else 0
        plan = placement_plan(int(ray.cluster_resources().get("GPU", 0.0)), grpo, ranks, engines,
                              self.ppo.vllm_tensor_parallel_size)
        weights = None
        if policy_model is not None:
            # LoRA adapters (llm.lora with LLM training) merged in: PPO trains the full weights
            weights = ray.put({k: v.detach().to("cpu", torch.float32) for k, v in plain_state_dict(policy_model).items()})
        cpus = self.ppo.actor_num_cpus
        opts: dict[str, list[dict[str, Any]]] = {name: [{"num_cpus": cpus, "scheduling_strategy": "SPREAD"}] * len(places)
                                                 for name, places in plan.items()}
        what = (f"policy, reference{'' if grpo else ', critic'} x {ranks} rank(s)"
                + (f", {engines} vLLM engine(s)" if engines else ""))
        self._pg, placed = place(plan, cpus, self.ppo.startup_timeout_s, what)
        opts.update(placed)
        seed = self.cfg.run.seed
        # the ranks of a trained model meet at a store this driver holds: reachable from every node of a cluster
        host = "127.0.0.1" if self._owns_ray else ray.util.get_node_ip_address()
        self.policy = self._group(PolicyActor, ranks, self.ppo, self.cfg.llm, weights, seed, options=opts["policy"],
                                  process_group=True, store_host=host)
        self.reference = self._group(ReferenceActor, ranks, self.ppo, self.cfg.llm, weights, seed,
                                     options=opts["reference"])
        self.critic = None if grpo else self._group(CriticActor, ranks, self.ppo, self.cfg.llm, weights, seed,
                                                    options=opts["critic"], process_group=True, store_host=host)
        self.reward = self._group(RewardActor, self.ppo.reward_workers, self.ppo, self.cfg.game, num_cpus=cpus)
        # Wait for every actor's constructor, so a broken model or game fails here and not mid-rollout, and one
        # that cannot be placed fails in one line instead of waiting forever.
        refs = {a.__ray_ready__.remote(): g.name for g in self._groups for a in g.actors}
        done, waiting = ray.wait(list(refs), num_returns=len(refs), timeout=self.ppo.startup_timeout_s)
        if waiting:
            raise PPOStartupError(f"PPO actors not started within {self.ppo.startup_timeout_s:g} s: "
                                  f"{', '.join(sorted({refs[r] for r in waiting}))} (Ray cluster free: "
                                  f"{ray.available_resources()})")
        ray.get(done)
        self._engine = make_engine(self.ppo, self.policy, self.model_dir, self.tokenizer, self.work_dir, kind,
                                   opts.get("engine"))
        logger.info("PPO trainer ready: %s, generation %s, actors on %d node(s)", self.ppo.algorithm, self._engine.name,
                    len(set(self.actor_nodes())))

    def _group(self, cls: type, n: int, *args: Any, **opts: Any) -> ActorGroup:
        group = ActorGroup(cls, n, *args, **opts)
        self._groups.append(group)
        return group

    def actor_nodes(self) -> list[str]:
        """Node ids of every actor (policy, reference, critic, reward…), for placement checks."""
        return [node for g in self._groups for node in g.nodes()]

    # ------------------------------------------------------------------ data
    def adapt(self, segments: Sequence[GameSegment], iteration: Optional[int] = None) -> Path:
        """Write the segments' steps as a JSON-lines prompt file in run_dir/ppo and return its path."""
        records = self.adapter.convert_segments_to_prompts(segments, self.tokenizer)
        if not records:
            raise ValueError("no segment step has a saved env_state; the collector must record env_state for PPO")
        tag = f"{iteration:06d}" if iteration is not None else f"step{self.global_step:06d}"
        path = write_prompts(self.work_dir / f"prompts-{tag}.jsonl", records)
        logger.info("PPO adapt: %d prompts from %d segments → %s", len(records), len(segments), path)
        return path

    def _draw(self, path: Path, records: list[PromptRecord]) -> list[PromptRecord]:
        """The next `rollout_batch_size` prompts of a shuffled pass over the file (reshuffled when used up)."""
        order, start = self._passes.get(str(path), (np.empty(0, dtype=np.int64), 0))
        if start >= len(order):
            order, start = self._rng.permutation(len(records)), 0
        picks = order[start : start + self.ppo.rollout_batch_size]
        self._passes[str(path)] = (order, start + len(picks))
        return [records[i] for i in picks]

    # ------------------------------------------------------------------ PPO
    def train(self, prompts_path: Path | str) -> dict[str, float]:
        """`rollouts_per_train` make-experience → train cycles on prompts from the file; mean metrics."""
        path = Path(prompts_path)
        records = read_prompts(path)
        if not records:
            raise ValueError(f"prompt file {path} is empty")
        rows = []
        for _ in range(self.ppo.rollouts_per_train):
            batch = self._draw(path, records)
            rows.append(self._rollout_and_train(batch))
            order, start = self._passes[str(path)]
            if self.ppo.refresh_reference and start >= len(order):  # an episode (pass over the prompts) ended:
                self.reference.call_all("load_weights", self.policy_state_dict())  # KL is measured from here on
        return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}

    def evaluate(self, prompts_path: Path | str, samples_per_prompt: int = 1) -> dict[str, float]:
        """Sample every prompt of the file with the current policy and judge the answers; nothing trains."""
        records = read_prompts(Path(prompts_path))
        _, judgements, _ = self._sample_and_judge(records, samples_per_prompt)
        return {
            "eval/ppo_reward_mean": float(np.mean([j.reward for j in judgements])),
            "eval/ppo_valid_rate": float(np.mean([j.valid for j in judgements])),
            "eval/ppo_agreement_mean": float(np.mean([j.agreement for j in judgements])),
        }

    def _sample_and_judge(self, batch: list[PromptRecord], n: int) -> tuple[list[Sample], list[Judgement], float]:
        """`n` responses per prompt (grouped by prompt), their judgements, and when generation finished."""
        samples = self._engine.generate([r.prompt for r in batch], n, seed=int(self._rng.integers(1 << 31)))
        t_gen = time.perf_counter()
        records = [r for r in batch for _ in range(n)]
        judgements = self.reward.map("judge", records, [s.text for s in samples], [s.finished for s in samples])
        return samples, judgements, t_gen

    def _rollout_and_train(self, batch: list[PromptRecord]) -> dict[str, float]:
        import ray

        t0 = time.perf_counter()
        n = self.ppo.n_samples_per_prompt
        samples, judgements, t_gen = self._sample_and_judge(batch, n)
        reward = torch.tensor([j.reward for j in judgements], dtype=torch.float32)

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        rollout = make_rollout([s.prompt_ids for s in samples], [s.response_ids for s in samples], pad)
        # each forward splits the rollout's rows over its group's ranks
        refs = [self.policy.submit_rows("logprobs", rollout), self.reference.submit_rows("logprobs", rollout)]
        if self.critic is not None:
            refs.append(self.critic.submit_rows("values", rollout))
        out = [ActorGroup.rows(ray.get(parts), rollout.response_len) for parts in refs]
        rollout.old_logp, rollout.ref_logp = out[0], out[1]
        mask = rollout.action_mask
        kl_k1 = approx_kl(rollout.old_logp, rollout.ref_logp, k3=False) * mask
        kl_penalty = torch.zeros_like(kl_k1)
        if self.critic is None:
            rollout.advantages = group_advantages(reward, n, mask)
        else:
            rollout.values = out[2] * mask
            kl_penalty = kl_penalty if self.ppo.use_kl_loss else kl_k1
            rewards = token_rewards(reward, kl_penalty, mask, self.ppo.kl_coef)
            advantages, rollout.returns = gae(rewards, rollout.values, mask, self.ppo.gamma, self.ppo.lam)
            rollout.advantages = normalise(advantages, mask)

        # every rank gets the whole rollout (put once) and trains on its share of each minibatch
        shared = ray.put(rollout)
        train_refs = [self.policy.submit_all("train", shared)]
        if self.critic is not None:
            train_refs.append(self.critic.submit_all("train", shared))
        stats = [ray.get(refs)[0] for refs in train_refs]  # the ranks return the same totals
        self._engine.update_weights(self.policy)
        self.global_step += 1

        seconds = time.perf_counter() - t0
        tokens = float(mask.sum())
        valid = [j.valid for j in judgements]
        metrics = {
            "train/ppo_policy_loss": stats[0]["policy_loss"],
            "train/ppo_value_loss": stats[1]["value_loss"] if len(stats) > 1 else 0.0,
            "train/ppo_kl": float(masked_mean(approx_kl(rollout.old_logp, rollout.ref_logp, k3=True), mask)),
            # what the KL took off each response's return (PPO without use_kl_loss): kl_coef · Σ KL over its tokens
            "train/ppo_kl_penalty": float((self.ppo.kl_coef * kl_penalty).sum(-1).mean()),
            "train/ppo_reward_mean": float(reward.mean()),
            "train/ppo_response_len": float(mask.sum(-1).float().mean()),
            "train/ppo_tokens_per_s": tokens / seconds,
            "train/ppo_rollout_tokens_per_s": tokens / max(t_gen - t0, 1e-9),
            "train/ppo_valid_rate": float(np.mean(valid)),
            "train/ppo_agreement_mean": float(np.mean([j.agreement for j in judgements])),
            "train/ppo_game_reward_mean": float(np.mean([j.game_reward for j in judgements])),
            "train/ppo_clip_frac": stats[0]["clip_frac"],
            "train/ppo_grad_norm": stats[0]["grad_norm"],
        }
        logger.info("PPO step %d: reward %.3f, valid %.2f, kl %.4f, %.0f tokens/s", self.global_step,
                    metrics["train/ppo_reward_mean"], metrics["train/ppo_valid_rate"], metrics["train/ppo_kl"],
                    metrics["train/ppo_tokens_per_s"])
        return metrics

    # ------------------------------------------------------------------ weights
    def policy_state_dict(self) -> StateDict:
        """The trained policy's weights (fp32, CPU), in the HF causal-LM naming the MCTS prior uses."""
        return self.policy.call_one("state_dict")

    def sync_to(self, module: nn.Module) -> None:
        """Copy the trained policy into `module` (e.g. the LLM prior's model) in place; a module with LoRA
        adapters takes it as its base weights, adapters zeroed."""
        load_plain_state_dict(module, self.policy_state_dict())

    def save(self, directory: Path | str, timeout_s: Optional[float] = None) -> None:
        """Policy and critic weights with their optimizer state, the step counter, the RNG and where each prompt
        file's shuffled pass has got to (a shared FS across nodes)."""
        import ray

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        refs = self.policy.submit_all("save", str(directory / "policy"))  # DeepSpeed's save is a collective
        if self.critic is not None:
            refs += self.critic.submit_all("save", str(directory / "critic"))
        # Every save settles (or the time is up) before a failure is raised: a rescue that finds the critic dead
        # must not delete the directory while the policy actor is still writing into it.
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        ray.get(ready)
        if pending:
            raise ray.exceptions.GetTimeoutError(f"the PPO actors' save did not finish within {timeout_s} s")
        passes = {path: [order.tolist(), start] for path, (order, start) in self._passes.items()}
        (directory / STATE_FILE).write_text(json.dumps({"global_step": self.global_step, "passes": passes,
                                                        "rng": self._rng.bit_generator.state}))

    def rescue(self, directory: Path | str, timeout_s: float = 120.0) -> bool:
        """After a failed stage, save the state as `save` does if the policy and critic actors still answer (the
        stage failed in generation, in a reward actor, on one bad batch), so that new actors go on from it instead
        of from the last checkpoint or, with none, a fresh critic. False (and nothing left in `directory`) when
        one of them is gone or does not answer within `timeout_s`."""
        try:
            self.save(directory, timeout_s=timeout_s)
            return True
        except Exception as err:  # noqa: BLE001 - a dead actor is what this finds out
            logger.warning("PPO: the failed stage's policy/critic could not be saved (%s: %s)", type(err).__name__,
                           first_line(err))
            shutil.rmtree(directory, ignore_errors=True)
            return False

    def load(self, directory: Path | str) -> None:
        """Restore `save`; the reference becomes the loaded policy (KL is measured from where training resumed)."""
        import ray

        directory = Path(directory)
        refs = self.policy.submit_all("load", str(directory / "policy"))
        if self.critic is not None:
            refs += self.critic.submit_all("load", str(directory / "critic"))
        ray.get(refs)
        self.reference.call_all("load_weights", self.policy_state_dict())
        self._engine.update_weights(self.policy)
        state = json.loads((directory / STATE_FILE).read_text())
        self.global_step = state["global_step"]
        if "rng" in state:  # the prompt passes go on where they were, and generation draws the same seeds
            self._rng.bit_generator.state = state["rng"]
            self._passes = {path: (np.asarray(order, dtype=np.int64), int(start))
                            for path, (order, start) in state["passes"].items()}

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Stop the engine, the reward games and every actor, then the local Ray cluster; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._engine is not None:
            self._engine.close()
        try:
            import ray

            if ray.is_initialized():
                for group in self._groups:
                    if group.name == "RewardActor":
                        try:
                            ray.get([a.close.remote() for a in group.actors], timeout=30)
                        except Exception as err:  # noqa: BLE001 - a dead actor must not stop the shutdown
                            logger.warning("PPO: reward actors did not close cleanly (%s)", err)
                    group.kill()
                if self._pg is not None:
                    from ray.util.placement_group import remove_placement_group

                    remove_placement_group(self._pg)
                if self._owns_ray:
                    ray.shutdown()
        finally:
            self._groups = []

    def __enter__(self) -> "PPOTrainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
