"""What the world model predicted along one evaluation episode: replays the episode's moves from a transcript in
the evaluation env that played it (same game seed) and prints, at each step, the moves the greedy agent ranked
first with the model's one-step reward and Q (reward + discounted value of the imagined next state), and the
reward the game paid. With --below MOVE, where MOVE was a valid action, also what the search sees one step
below it: each of the root's moves imagined in the state MOVE leads to, with the model's prior, reward, value and
Q there (and whether the validity head keeps it, world_model.validity_loss_weight). Reads a run's latest
checkpoint; changes nothing in the run.

  python scripts/explain_episode.py runs/zork-2h-b runs/zork-2h-b/transcripts/eval-000020.txt --episode 1 \\
      --last 6 --set game.rom_dir=../shared/jericho-game-suite
  python scripts/explain_episode.py runs/zork-2h-d runs/zork-2h-d/transcripts/eval-000062.txt --last 2 \\
      --below down --set game.rom_dir=../shared/jericho-game-suite
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import NamedTuple

import torch

from priorzero_core import agent as agent_module
from priorzero_core.agent import EnvView, kept_actions
from priorzero_core.config import load_config
from priorzero_core.trainer import Trainer


def episode_moves(transcript: Path, episode: int) -> list[str]:
    """The moves of episode `episode` of the transcript's first mode, as played."""
    text = transcript.read_text()
    parts = re.split(r"^=== .* — episode (\d+) ===$", text, flags=re.M)
    for number, body in zip(parts[1::2], parts[2::2]):
        if int(number) == episode:
            return [re.sub(r"\s+\(reward [-+0-9.]+\)$", "", line[2:]).strip()
                    for line in body.splitlines() if line.startswith("> ")]
    raise SystemExit(f"{transcript} has no episode {episode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("transcript", type=Path)
    parser.add_argument("--episode", type=int, default=0)
    parser.add_argument("--last", type=int, default=8, help="print the last N steps (default 8)")
    parser.add_argument("--top", type=int, default=5, help="moves shown per step (default 5)")
    parser.add_argument("--below", metavar="MOVE", help="also show the imagined state after MOVE where it is valid")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, as for priorzero eval")
    args = parser.parse_args()

    cfg = load_config(args.run_dir / "config.yaml", [*args.set, "tracking.enabled=false"])
    trainer = Trainer(cfg, args.run_dir, resume=True, readonly=True, progress=False)
    try:
        moves = episode_moves(args.transcript, args.episode)
        pool, agent, model = trainer.eval_pool, trainer.agent, trainer.wm.model
        if args.episode >= pool.size:
            raise SystemExit(f"the evaluation pool has {pool.size} envs")
        (ts,) = pool.reset([args.episode])
        history: list[tuple[str, str, float]] = []
        gamma = cfg.world_model.discount
        searched = []  # the search's own output for the decision (its Q values of visited moves)
        search = agent_module.search
        agent_module.search = lambda *a, **k: searched.append(search(*a, **k)) or searched[-1]
        for t, move in enumerate(moves):
            view = EnvView(history=list(history), timestep=ts)
            if t >= len(moves) - args.last:
                valid = kept_actions(ts, agent.spec.action_space_size)
                look = one_step(agent, history, ts, valid, gamma)
                ctx, value, children, reward, child_logits, next_value, q = (
                    look.ctx, look.value, look.children, look.reward, look.child_logits, look.next_value, look.q)
                k = len(valid)
                (decision,) = agent.act([view], mode="wm")
                tree_q = searched[-1].q_values[0]
                order = sorted(range(k), key=lambda i: -decision.policy_target[i])[:args.top]
                print(f"[{t}] score {ts.score}, value {float(value[0]):+.2f}; played {move!r}"
                      + ("" if decision.action == move else f" (the agent now: {decision.action!r})"))
                for i in order:
                    mark = "*" if valid[i] == move else " "
                    print(f"   {mark} {valid[i]:<28} policy {decision.policy_target[i]:.2f}  visits "
                          f"{decision.visit_dist[i]:.2f}  reward {float(reward[i]):+6.2f}  Q {float(q[i]):+6.2f}"
                          + (f"  searched Q {float(tree_q[i]):+6.2f}" if decision.visit_dist[i] > 0 else ""))
                if move in valid and move not in [valid[i] for i in order]:
                    i = valid.index(move)
                    print(f"   * {move:<28} policy {decision.policy_target[i]:.2f}  visits {decision.visit_dist[i]:.2f}  "
                          f"reward {float(reward[i]):+6.2f}  Q {float(q[i]):+6.2f}")
                if args.below in valid:
                    i = valid.index(args.below)
                    below(model, ctx, tuple(s[i:i + 1] for s in children), child_logits[i], float(reward[i]),
                          float(next_value[i]), valid, i, gamma, args.top)
            (after,) = pool.step([move], [args.episode])
            if t >= len(moves) - args.last:
                print(f"     the game paid {after.reward:+g}{' and ended' if after.done else ''}")
            history.append((ts.observation, move, after.reward))
            ts = after
            if ts.done:
                break
    finally:
        trainer.close()


class OneStep(NamedTuple):
    ctx: object  # the root's RootContext
    logits: torch.Tensor  # [1, A] the learned policy's logits at the root
    value: torch.Tensor  # [1] the root's value
    children: tuple  # the imagined state after each valid action, [k] rows
    reward: torch.Tensor  # [k] the model's reward for each valid action
    child_logits: torch.Tensor  # [k, A] the policy logits in the state each leads to
    next_value: torch.Tensor  # [k] the value of the state each leads to
    q: torch.Tensor  # [k] one-step Q: reward + discount * next_value


def one_step(agent, history: list[tuple[str, str, float]], ts, valid: list[str], gamma: float) -> OneStep:
    """The model's root for the real state `ts` after `history`, and each valid move's one-step lookahead."""
    model = agent.model
    with torch.inference_mode():
        ctx = agent._root_context([[(o, a) for o, a, _ in history]], [ts.observation], [valid])
        state, logits, value = model.root_inference(ctx)
        k = len(valid)
        wide = tuple(s.repeat_interleave(k, 0) for s in state)
        children, reward, child_logits, next_value = model.recurrent_inference(
            wide, torch.arange(k), ctx.valid_emb.repeat_interleave(k, 0), ctx.valid_mask.repeat_interleave(k, 0))
    return OneStep(ctx, logits, value, children, reward, child_logits, next_value, reward + gamma * next_value)


def below(model, ctx, after, logits, reward: float, value: float, valid: list[str], move: int, gamma: float,
          top: int) -> None:
    """The root's moves imagined in the state `after` [1 row] that `move` leads to (its policy `logits`, the
    model's reward and value for getting there), as the search's second level sees them."""
    k = len(valid)
    with torch.inference_mode():
        wide = tuple(s.repeat_interleave(k, 0) for s in after)
        _, r2, _, v2 = model.recurrent_inference(wide, torch.arange(k), ctx.valid_emb.repeat_interleave(k, 0),
                                                 ctx.valid_mask.repeat_interleave(k, 0))
    prior = logits.softmax(-1)
    print(f"     below {valid[move]!r}: reward {reward:+.2f}, value {value:+.2f}")
    for i in sorted(range(k), key=lambda i: -float(prior[i]))[:top]:
        dropped = "  (dropped by the validity head)" if float(logits[i]) < -1e8 else ""
        print(f"       {valid[i]:<26} prior {float(prior[i]):.2f}  reward {float(r2[i]):+6.2f}  "
              f"value {float(v2[i]):+6.2f}  Q {float(r2[i] + gamma * v2[i]):+6.2f}{dropped}")


if __name__ == "__main__":
    main()
