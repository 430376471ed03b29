"""The acting policy: text → embeddings → world model + LLM prior → batched MCTS → an action per env."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from .config import PriorZeroConfig
from .games.base import GameSpec, TimeStep
from .llm_prior import LLMPrior
from .llm_train import LLMSample
from .mcts import RootOutput, root_prior, search
from .replay import GameSegment, SampledSequence, StepRecord
from .text_encoder import TextEncoder
from .world_model import RootContext, WMBatch, WorldModel

Mode = Literal["collect", "wm", "wm_llm", "llm", "random"]
FALLBACK_ACTION = "wait"  # a state without valid actions still needs a command; "wait" lets timed events happen


@dataclass
class EnvView:
    """What the agent knows of one running episode."""

    history: list[tuple[str, str, float]]  # (observation, action, reward) so far
    timestep: TimeStep


@dataclass
class Decision:
    valid_actions: list[str]
    action_index: int
    action: str
    visit_dist: np.ndarray  # MCTS visit distribution over valid_actions
    policy_target: np.ndarray  # what the world-model policy learns (visits, or the improved policy)
    root_value: float
    llm_prior: Optional[np.ndarray]  # log-prior over valid_actions
    prompt: Optional[str]
    q_values: Optional[np.ndarray] = None  # the search's completed Q over valid_actions (None: no search)


def kept_actions(ts: TimeStep, limit: int) -> list[str]:
    return list(ts.valid_actions[:limit]) or [FALLBACK_ACTION]


def uniform_decision(acts: list[str], rng: np.random.Generator) -> Decision:
    """A uniformly random one of `acts` (the random baseline, search-free exploration)."""
    k = len(acts)
    idx = int(rng.integers(k))
    dist = np.full(k, 1.0 / k, dtype=np.float32)
    return Decision(valid_actions=acts, action_index=idx, action=acts[idx], visit_dist=dist, policy_target=dist,
                    root_value=0.0, llm_prior=None, prompt=None)


class Agent:
    """Shared by collector and evaluator; holds no episode state of its own."""

    def __init__(self, cfg: PriorZeroConfig, spec: GameSpec, encoder: TextEncoder, model: WorldModel,
                 llm: Optional[LLMPrior], rng: np.random.Generator, device: torch.device):
        self.cfg = cfg
        self.spec = spec
        self.encoder = encoder
        self.model = model
        self.llm = llm
        self.rng = rng
        self.device = device

    # ------------------------------------------------------------------ inputs
    def _root_context(self, pasts: Sequence[Sequence[tuple[str, str]]], observations: Sequence[str],
                      valid: Sequence[Sequence[str]]) -> RootContext:
        """Embeds history (right-aligned, ≤ context_length−1 pairs), current observations and valid actions."""
        C1 = self.cfg.world_model.context_length - 1
        A = max(len(v) for v in valid)
        B = len(observations)
        texts: dict[str, int] = {}
        for past, obs, acts in zip(pasts, observations, valid):
            for o, a in past[-C1:] if C1 else []:
                texts.setdefault(o, len(texts)), texts.setdefault(a, len(texts))
            texts.setdefault(obs, len(texts))
            for a in acts:
                texts.setdefault(a, len(texts))
        emb = self.encoder.encode(list(texts)).to(self.device)
        E = emb.shape[-1]
        past_obs = torch.zeros(B, C1, E, device=self.device)
        past_act = torch.zeros(B, C1, E, device=self.device)
        past_len = torch.zeros(B, dtype=torch.long, device=self.device)
        valid_emb = torch.zeros(B, A, E, device=self.device)
        valid_mask = torch.zeros(B, A, dtype=torch.bool, device=self.device)
        for b, (past, acts) in enumerate(zip(pasts, valid)):
            recent = list(past[-C1:]) if C1 else []
            n = len(recent)
            if n:
                past_obs[b, C1 - n:] = emb[[texts[o] for o, _ in recent]]
                past_act[b, C1 - n:] = emb[[texts[a] for _, a in recent]]
            past_len[b] = n
            valid_emb[b, : len(acts)] = emb[[texts[a] for a in acts]]
            valid_mask[b, : len(acts)] = True
        obs = emb[[texts[o] for o in observations]]
        return RootContext(past_obs, past_act, past_len, obs, valid_emb, valid_mask)

    def _llm_log_prior(self, prompts: list[str], valid: list[list[str]], A: int) -> torch.Tensor:
        scores = self.llm.score(list(zip(prompts, valid)))
        out = torch.full((len(valid), A), -1e9, device=self.device)
        for b, s in enumerate(scores):
            out[b, : len(s)] = torch.as_tensor(s, dtype=torch.float32, device=self.device)
        return out

    @torch.inference_mode()
    def llm_prior(self, view: EnvView, valid: list[str]) -> tuple[Optional[str], Optional[np.ndarray]]:
        """The LLM's prompt and log-prior over `valid` at `view` (the prior's cache answers repeats); (None, None)
        without an LLM."""
        if self.llm is None:
            return None, None
        prompt = self.llm.build_prompt(view.history, view.timestep.observation, valid)
        return prompt, self.llm.score([(prompt, valid)])[0]

    # ------------------------------------------------------------------ acting
    @torch.inference_mode()
    def act(self, views: Sequence[EnvView], mode: Mode) -> list[Decision]:
        """One decision per view. `collect` explores (root noise, collect temperature); eval modes act greedily."""
        A = self.spec.action_space_size
        valid = [kept_actions(v.timestep, A) for v in views]
        if mode == "random":  # the baseline: uniform over the same valid actions the agent gets
            return [uniform_decision(acts, self.rng) for acts in valid]
        use_llm = self.llm is not None and (mode in ("wm_llm", "llm") or (mode == "collect" and self.cfg.mcts.prior_mode != "wm"))
        prompts: list[Optional[str]] = [None] * len(views)
        llm_lp = None
        width = max(len(v) for v in valid)
        if use_llm:
            prompts = [self.llm.build_prompt(v.history, v.timestep.observation, acts) for v, acts in zip(views, valid)]
            llm_lp = self._llm_log_prior(prompts, valid, width)
        if mode == "llm":
            probs = improved = llm_lp.softmax(-1)
            actions = probs.argmax(-1)
            values = torch.zeros(len(views))
            q = None
        else:
            pasts = [[(o, a) for o, a, _ in v.history] for v in views]
            ctx = self._root_context(pasts, [v.timestep.observation for v in views], valid)
            state, wm_logits, value = self.model.root_inference(ctx)
            # Collection searches with the configured prior; evaluation's "wm" leaves the LLM out and "wm_llm" puts
            # it in, as collection does or (when collection leaves it out) by the default mix.
            configured = self.cfg.mcts.prior_mode
            prior_mode = {"collect": configured, "wm": "wm", "wm_llm": configured if configured != "wm" else "mix"}[mode]
            logits = root_prior(wm_logits, llm_lp, ctx.valid_mask, prior_mode, self.cfg.mcts.mix_weight)
            if mode != "collect" and self.cfg.eval.act_on == "policy":  # the learned policy alone, no search
                probs = improved = logits.masked_fill(~ctx.valid_mask, -1e9).softmax(-1)
                return self._decisions(valid, probs, improved, probs.argmax(-1), value, llm_lp, prompts, None)
            temperature = self.cfg.mcts.collect_temperature if mode == "collect" else 0.0
            width = ctx.valid_mask.shape[1]

            def every_root_action(states, actions):  # B·A rows; built only when the search asks (one_step Q)
                return self.model.recurrent_inference(states, actions, valid_emb=ctx.valid_emb.repeat_interleave(width, 0),
                                                      valid_mask=ctx.valid_mask.repeat_interleave(width, 0))

            # "visits": no lookahead, so the improved policy is the visit distribution, for acting and as target
            lookahead = every_root_action if self.cfg.mcts.policy_target == "improved" else None
            mcts = self.cfg.mcts
            if mode != "collect" and self.cfg.eval.num_simulations is not None:
                mcts = mcts.model_copy(update={"num_simulations": self.cfg.eval.num_simulations})
            out = search(self.model.search_fn(ctx), RootOutput(state, logits, value), ctx.valid_mask, mcts,
                         self.rng, add_noise=mode == "collect", discount=self.cfg.world_model.discount,
                         temperature=temperature, lookahead_fn=lookahead)
            probs, actions, values = out.visit_dist, out.selected_action, out.root_value
            improved, q = out.improved_policy, out.completed_q
            if mode != "collect" and self.cfg.eval.act_on == "visits":  # improved < 1 only breaks ties
                actions = (out.visit_counts + improved).argmax(-1)
            if mode != "collect" and self.cfg.eval.policy_confidence is not None:
                policy = logits.masked_fill(~ctx.valid_mask, -1e9).softmax(-1)
                sure = policy.max(-1).values >= self.cfg.eval.policy_confidence
                actions = torch.where(sure, policy.argmax(-1), actions.to(policy.device))
        return self._decisions(valid, probs, improved, actions, values, llm_lp, prompts, q)

    @staticmethod
    def _decisions(valid, probs, improved, actions, values, llm_lp, prompts, q) -> list[Decision]:
        decisions = []
        for b, acts in enumerate(valid):
            k = len(acts)
            idx = int(actions[b])
            decisions.append(Decision(
                valid_actions=acts,
                action_index=idx,
                action=acts[idx],
                visit_dist=probs[b, :k].float().cpu().numpy(),
                policy_target=improved[b, :k].float().cpu().numpy(),
                root_value=float(values[b]),
                llm_prior=None if llm_lp is None else llm_lp[b, :k].cpu().numpy(),
                prompt=prompts[b],
                q_values=None if q is None else q[b, :k].float().cpu().numpy(),
            ))
        return decisions

    # ------------------------------------------------------------------ learning inputs
    @torch.inference_mode()
    def values(self, seqs: Sequence[SampledSequence]) -> np.ndarray:
        """The world model's value of each sequence's first step, with its real history as context."""
        A = self.spec.action_space_size
        pasts = [[(s.observation, s.action) for s in seq.context] for seq in seqs]
        first = [seq.steps[0] for seq in seqs]
        ctx = self._root_context(pasts, [s.observation for s in first], [s.valid_actions[:A] for s in first])
        _, _, value = self.model.root_inference(ctx)
        return value.float().cpu().numpy()

    def llm_samples(self, picks: Sequence[tuple[GameSegment, int]], targets: Sequence[float],
                    contexts: Sequence[SampledSequence]) -> list[LLMSample]:
        """SFT/RFT samples: the SFT target is the world model's own (the step's policy target: the improved policy,
        the visit distribution, or a demonstration's action); advantage = n-step value target − current value."""
        values = self.values(contexts)
        out = []
        for (seg, t), target, value in zip(picks, targets, values):
            step = seg.steps[t]
            policy = step.policy_target if step.policy_target is not None else step.visit_dist
            out.append(LLMSample(prompt=step.prompt, valid_actions=step.valid_actions,
                                 visit_dist=np.asarray(policy, dtype=np.float32),
                                 action_index=step.action_index, advantage=float(target - value)))
        return out


def sequences_to_wm_batch(seqs: Sequence[SampledSequence], encoder: TextEncoder, A: int,
                          device: torch.device, history: int = 0) -> WMBatch:
    """Replay sequences → tensors; every text is embedded once per batch (and cached by the encoder).

    The first `history` positions hold each sequence's context steps (right-aligned, missing ones unknown):
    they fill the training windows of the first sampled steps as a search root's history does, and get no loss.
    """
    B, L = len(seqs), history + len(seqs[0].steps)
    texts: dict[str, int] = {}
    rows: list[list[tuple[int, StepRecord]]] = []  # (position, step) per sequence
    for seq in seqs:
        context = seq.context[max(0, len(seq.context) - history):] if history else []
        row = [(history - len(context) + i, s) for i, s in enumerate(context)]
        row += [(history + t, s) for t, s in enumerate(seq.steps) if s is not None]
        rows.append(row)
        for _, s in row:
            texts.setdefault(s.observation, len(texts)), texts.setdefault(s.action, len(texts))
            for a in s.valid_actions[:A]:
                texts.setdefault(a, len(texts))
    emb = encoder.encode(list(texts)).to(device)
    # Filled as numpy arrays and turned into tensors once: a tensor per step cost more than the model's update.
    obs_idx = np.zeros((B, L), dtype=np.int64)
    act_idx = np.zeros((B, L), dtype=np.int64)
    valid_idx = np.zeros((B, L, A), dtype=np.int64)
    valid_mask = np.zeros((B, L, A), dtype=bool)
    rewards = np.zeros((B, L), dtype=np.float32)
    policy = np.zeros((B, L, A), dtype=np.float32)
    known = np.zeros((B, L), dtype=bool)
    value_targets = np.zeros((B, L), dtype=np.float32)
    reanalysed = any(seq.bootstrap_offset is not None for seq in seqs)
    if reanalysed:  # targets to re-bootstrap from a later position of the same row, where one is given
        value_partial = np.zeros((B, L), dtype=np.float32)
        bootstrap_discount = np.zeros((B, L), dtype=np.float32)
        bootstrap_pos = np.full((B, L), -1, dtype=np.int64)
    for b, (seq, row) in enumerate(zip(seqs, rows)):
        value_targets[b, history:] = seq.value_targets
        if reanalysed and seq.bootstrap_offset is not None:
            value_partial[b, history:] = seq.value_partial
            bootstrap_discount[b, history:] = seq.bootstrap_discount
            offset = seq.bootstrap_offset
            bootstrap_pos[b, history:] = np.where(offset >= 0, history + np.arange(len(offset)) + offset, -1)
        for t, step in row:
            k = min(len(step.valid_actions), A)
            obs_idx[b, t] = texts[step.observation]
            act_idx[b, t] = texts[step.action]
            valid_idx[b, t, :k] = [texts[a] for a in step.valid_actions[:k]]
            valid_mask[b, t, :k] = True
            rewards[b, t] = step.reward
            target = step.policy_target if step.policy_target is not None else step.visit_dist
            if target:  # none: no policy loss at this step (hazard_segments)
                policy[b, t, :k] = target[:k]
            known[b, t] = True
    policy /= np.maximum(policy.sum(-1, keepdims=True), np.float32(1e-8))
    step_mask = known & (np.arange(L) >= history)
    # Which of step t − 1's valid actions step t has too, by text (the validity head's labels)
    carried = np.zeros((B, L, A), dtype=bool)
    same = (valid_idx[:, :-1, :, None] == valid_idx[:, 1:, None, :]) & valid_mask[:, 1:, None, :]
    carried[:, 1:] = same.any(-1) & valid_mask[:, :-1] & (known[:, :-1] & known[:, 1:])[..., None]
    obs_idx, act_idx, valid_idx = (torch.from_numpy(x) for x in (obs_idx, act_idx, valid_idx))
    valid_mask, rewards, policy, known, value_targets, step_mask = (
        torch.from_numpy(x) for x in (valid_mask, rewards, policy, known, value_targets, step_mask))
    valid_emb = emb[valid_idx.to(device)] * valid_mask.to(device).unsqueeze(-1)
    return WMBatch(
        obs_emb=emb[obs_idx.to(device)],
        act_emb=emb[act_idx.to(device)],
        valid_emb=valid_emb,
        valid_mask=valid_mask.to(device),
        rewards=rewards.to(device),
        value_targets=value_targets.to(device),
        policy_targets=policy.to(device),
        step_mask=step_mask.to(device),
        known=known.to(device),
        carried_valid=torch.from_numpy(carried).to(device),
        **({"value_partial": torch.from_numpy(value_partial).to(device),
            "bootstrap_discount": torch.from_numpy(bootstrap_discount).to(device),
            "bootstrap_pos": torch.from_numpy(bootstrap_pos).to(device)} if reanalysed else {}),
    )
