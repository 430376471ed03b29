"""A trained agent as a self-contained directory: what acting needs, nothing of what training needs.

`export_agent` copies from a committed checkpoint the world model's weights and, when the LLM was trained, its
weights (full model or LoRA adapter), beside the run's config.yaml and an `agent.json` with the game's spec, the
iteration, the evaluation it scored and each file's SHA-256, and the run's counts of which moves lost the game where
(`outcomes.LossMemory`, for `eval.avoid_known_losses`). No optimizer states, archive or replay: the world model of
a Zork run is ≈ 9 MB. MLflow logs this directory as a pyfunc model (`PriorZeroAgentModel`) that the
Model Registry versions (`priorzero-<game>@best`); `load_agent` rebuilds the agent in any process and
`evaluate_agent` plays it under the evaluation protocol (`priorzero eval models:/priorzero-zork@best`).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .checkpoint import _sha256, json_path, load_json
from .config import PriorZeroConfig, dump_config, load_config
from .errors import CheckpointError
from .games.base import GameSpec
from .outcomes import CHECKPOINT_NAME as LOSSES, LossMemory

AGENT_FILE = "agent.json"
WORLD_MODEL_FILE = "world_model.safetensors"
LLM_WEIGHTS_FILE = "llm_weights.safetensors"


def export_agent(checkpoint: Path, cfg: PriorZeroConfig, spec: GameSpec, dest: Path, iteration: int,
                 evaluation: dict[str, float]) -> Path:
    """Write the agent of `checkpoint` (a committed checkpoint directory) to `dest` (made; must not exist), with the
    `evaluation` it scored at iteration `iteration`."""
    from .llm_train import WEIGHTS_FILE

    checkpoint, dest = Path(checkpoint), Path(dest)
    dest.mkdir(parents=True)
    shutil.copyfile(checkpoint / WORLD_MODEL_FILE, dest / WORLD_MODEL_FILE)
    if (checkpoint / "llm" / WEIGHTS_FILE).is_file():
        shutil.copyfile(checkpoint / "llm" / WEIGHTS_FILE, dest / LLM_WEIGHTS_FILE)
    if json_path(checkpoint, LOSSES).is_file():
        shutil.copyfile(json_path(checkpoint, LOSSES), json_path(dest, LOSSES))
    (dest / "config.yaml").write_text(dump_config(cfg))
    files = sorted(p.name for p in dest.iterdir())
    spec_fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items()}
    (dest / AGENT_FILE).write_text(json.dumps({
        "iteration": iteration, "checkpoint": checkpoint.name, "evaluation": evaluation, "spec": spec_fields,
        "sha256": {name: _sha256(dest / name) for name in files}}, indent=1, sort_keys=True))
    return dest


def read_agent(src: Path) -> tuple[PriorZeroConfig, dict[str, Any]]:
    """The agent's config and agent.json, every file checked against its hash."""
    src = Path(src)
    try:
        info = json.loads((src / AGENT_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{src} is not an exported agent ({AGENT_FILE}: {err})") from None
    for name, digest in info["sha256"].items():
        if not (src / name).is_file() or _sha256(src / name) != digest:
            raise CheckpointError(f"agent {src}: {name} is missing or does not match its hash")
    return load_config(src / "config.yaml"), info


def load_agent(src: Path, overrides: Optional[list[str]] = None, device: str | torch.device = "cpu"):
    """(cfg, spec, Agent) rebuilt from an exported agent; `overrides` apply to its config (e.g. eval.*)."""
    from safetensors.torch import load_file

    from .agent import Agent
    from .text_encoder import TextEncoder
    from .world_model import WorldModel

    src = Path(src)
    cfg, info = read_agent(src)
    if overrides:
        cfg = load_config(src / "config.yaml", overrides)
    spec = GameSpec(**{**info["spec"], "path": Path(info["spec"]["path"]) if info["spec"].get("path") else None})
    device = torch.device(device)
    encoder = TextEncoder.from_config(cfg.world_model, device=device)
    model = WorldModel(cfg.world_model, input_dim=encoder.dim).to(device)
    model.load_state_dict(load_file(str(src / WORLD_MODEL_FILE), device=str(device)))
    model.eval()
    prior = None
    if cfg.llm.enabled:
        from .llm_prior import make_llm_prior

        prior = make_llm_prior(cfg.llm, device=device)
        if (src / LLM_WEIGHTS_FILE).is_file():
            from .llm_train import LLMTrainer

            LLMTrainer(prior, cfg.llm, seed=cfg.run.seed).load_weights(src / LLM_WEIGHTS_FILE)
    rng = np.random.default_rng(cfg.run.seed)
    return cfg, spec, Agent(cfg, spec, encoder, model, prior, rng, device)


def load_losses(src: Path) -> Optional[LossMemory]:
    """The exported agent's counts of losing moves (None when its run had none)."""
    return LossMemory.from_json(load_json(src, LOSSES)) if json_path(src, LOSSES).is_file() else None


def evaluate_agent(src: Path, overrides: Optional[list[str]] = None, transcript: Optional[Path] = None):
    """Play an exported agent under the evaluation protocol (its config's `eval.*`, after `overrides`)."""
    from .evaluator import eval_modes, evaluate
    from .games import EnvPool

    cfg, spec, agent = load_agent(src, overrides)
    losses = load_losses(src)
    if losses is None and cfg.eval.avoid_known_losses:
        logging.getLogger("priorzero").warning("eval.avoid_known_losses: agent %s has no loss counts (its run "
                                               "predates them); it plays without avoiding any move", src)
    pool = EnvPool(cfg.game, min(cfg.eval.num_episodes, 16), seed=cfg.run.seed + 10_000)
    try:
        with torch.inference_mode():
            result = evaluate(pool, agent, eval_modes(cfg, agent.llm is not None), cfg.eval,
                              cfg.eval.max_episode_steps or spec.max_episode_steps, losses=losses)
    finally:
        pool.close()
    if transcript is not None:
        transcript.parent.mkdir(parents=True, exist_ok=True)
        transcript.write_text(result.transcript)
    return result


try:
    import mlflow.pyfunc

    class PriorZeroAgentModel(mlflow.pyfunc.PythonModel):
        """The agent as an MLflow pyfunc model. Input: rows with `observation` (str), `valid_actions` (list of
        str) and optionally `history` (list of [observation, action, reward]); output: the action the agent takes
        in each (greedy search, the agent's main evaluation mode). Rows are single states: the evaluation's rules
        that need an episode or the game's response (`eval.break_loops`, `eval.avoid_known_losses`) do not apply."""

        def load_context(self, context: Any) -> None:
            from .evaluator import eval_modes

            self.cfg, self.spec, self.agent = load_agent(Path(context.artifacts["agent"]))
            self.mode = eval_modes(self.cfg, self.agent.llm is not None)[0]

        def predict(self, context, model_input, params=None):  # no hints: MLflow would read them as a signature
            from .agent import EnvView
            from .games.base import TimeStep

            rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
            views = []
            for row in rows:
                history = [(str(o), str(a), float(r)) for o, a, r in (row.get("history") or [])]
                ts = TimeStep(observation=str(row["observation"]), raw="", score=0, reward=0.0, done=False,
                              moves=len(history), valid_actions=[str(a) for a in row["valid_actions"]],
                              state_hash="")
                views.append(EnvView(history=history, timestep=ts))
            with torch.inference_mode():
                return [d.action for d in self.agent.act(views, mode=self.mode)]
except ImportError:  # MLflow is a dependency of the flows, not of the algorithm
    pass
