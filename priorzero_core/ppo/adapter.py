"""Game segments → ORZ-style PPO prompts (`<think> … </think> <answer> action </answer>`), one JSON line each."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import PPOConfig
from ..llm_prior import user_message
from ..replay import GameSegment, StepRecord

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You play a text adventure game. Think inside <think> </think>, then give one of the valid actions inside "
    "<answer> </answer>, e.g. <think> it is dark </think> <answer> turn on lamp </answer>"
)
THINK_PREFILL = "<think>"
ANSWER_PREFILL = "<think> </think> <answer>"
STOP = "</answer>"


@dataclass
class PromptRecord:
    """One PPO prompt with what the reward needs to judge any answer to it."""

    prompt: str  # chat-rendered, ending inside the assistant turn (the prefill)
    prefill: str  # the assistant text the prompt already holds; the parser reads prefill + response
    valid_actions: list[str]
    visit_dist: list[float]  # MCTS root visits over valid_actions
    env_state: str  # ppo.env_state snapshot before the step
    action: str  # what the collector executed there
    episode_id: str
    step: int  # step index within its episode


@dataclass
class TrainingData:
    """Per-step arrays of a batch of segments, in segment order."""

    states: list[Optional[str]]
    actions: list[str]
    rewards: list[float]
    mcts_policies: list[list[float]]
    valid_actions: list[list[str]]


class GameSegmentToORZAdapter:
    """Renders each stored step as a dialogue prompt cut to `max_prompt_tokens` on token boundaries."""

    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.prefill = THINK_PREFILL if cfg.think else ANSWER_PREFILL

    # ------------------------------------------------------------------ rendering
    def _render(self, tokenizer: Any, history: Sequence[StepRecord], observation: str, valid: Sequence[str]) -> str:
        user = user_message([(s.observation, s.action, s.reward) for s in history], observation, valid)
        if not tokenizer.chat_template:
            return f"{SYSTEM_PROMPT}\n\nUser: {user}\nAssistant: {self.prefill}"
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + self.prefill

    def render_prompt(self, tokenizer: Any, history: Sequence[StepRecord], observation: str, valid: Sequence[str]) -> str:
        """Drop the oldest history first, then the observation's oldest tokens; valid actions are never cut."""
        budget = self.cfg.max_prompt_tokens
        history = list(history[-self.cfg.history_length:]) if self.cfg.history_length else []
        prompt = self._render(tokenizer, history, observation, valid)
        while history and _num_tokens(tokenizer, prompt) > budget:
            history.pop(0)
            prompt = self._render(tokenizer, history, observation, valid)
        over = _num_tokens(tokenizer, prompt) - budget
        if over <= 0:
            return prompt
        # Keep the observation's tail (Jericho puts the room and the action's result last), whole tokens only.
        ids = tokenizer.encode(observation, add_special_tokens=False)
        keep = len(ids) - over
        while keep > 0:
            # A cut inside a multi-byte character decodes to U+FFFD; drop it rather than show garbage.
            tail = tokenizer.decode(ids[len(ids) - keep:]).lstrip("\ufffd")
            prompt = self._render(tokenizer, [], tail, valid)
            over = _num_tokens(tokenizer, prompt) - budget
            if over <= 0:
                return prompt
            keep -= over
        prompt = self._render(tokenizer, [], "", valid)
        if _num_tokens(tokenizer, prompt) > budget:
            raise ValueError(
                f"the valid actions alone need {_num_tokens(tokenizer, prompt)} prompt tokens; raise ppo.max_prompt_tokens "
                f"above {budget} or lower game.action_space_size"
            )
        return prompt

    # ------------------------------------------------------------------ public
    def convert_segments_to_prompts(self, segments: Sequence[GameSegment], tokenizer: Any) -> list[PromptRecord]:
        """One record per step that saved its env state; history follows the episode across segments."""
        records: list[PromptRecord] = []
        skipped = 0
        for episode_id, steps, start in _episodes(segments):
            for t, step in enumerate(steps):
                if step.env_state is None or not step.valid_actions:
                    skipped += 1
                    continue
                prompt = self.render_prompt(tokenizer, steps[:t], step.observation, step.valid_actions)
                records.append(PromptRecord(
                    prompt=prompt,
                    prefill=self.prefill,
                    valid_actions=list(step.valid_actions),
                    visit_dist=[float(v) for v in step.visit_dist],
                    env_state=step.env_state,
                    action=step.action,
                    episode_id=episode_id,
                    step=start + t,
                ))
        if skipped:
            logger.info("PPO adapter: %d of %d steps have no saved env state and give no prompt", skipped, skipped + len(records))
        return records

    @staticmethod
    def extract_training_data(segments: Sequence[GameSegment]) -> TrainingData:
        steps = [s for seg in segments for s in seg.steps]
        return TrainingData(
            states=[s.env_state for s in steps],
            actions=[s.action for s in steps],
            rewards=[float(s.reward) for s in steps],
            mcts_policies=[[float(v) for v in s.visit_dist] for s in steps],
            valid_actions=[list(s.valid_actions) for s in steps],
        )


def _num_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _episodes(segments: Sequence[GameSegment]) -> list[tuple[str, list[StepRecord], int]]:
    """(episode id, its consecutive steps, first step index) for each run of chained segments."""
    by_episode: dict[str, list[GameSegment]] = defaultdict(list)
    for seg in segments:
        by_episode[seg.episode_id].append(seg)
    out = []
    for episode_id, segs in by_episode.items():
        segs.sort(key=lambda s: s.index)
        run: list[StepRecord] = []
        start = segs[0].start_step
        for prev, seg in zip([None, *segs], segs):
            if prev is not None and seg.index != prev.index + 1:  # a gap: history must not jump over it
                out.append((episode_id, run, start))
                run, start = [], seg.start_step
            run.extend(seg.steps)
        out.append((episode_id, run, start))
    return out


def write_prompts(path: Path, records: Sequence[PromptRecord]) -> Path:
    """JSON lines, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        for rec in records:
            fh.write(json.dumps(asdict(rec), separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return path


def read_prompts(path: Path) -> list[PromptRecord]:
    with open(path) as fh:
        return [PromptRecord(**json.loads(line)) for line in fh if line.strip()]
