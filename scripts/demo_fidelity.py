"""How closely a checkpoint follows the trajectory it imitates: replays the checkpoint's imitated trajectory
(`demo/demo.jsonl.gz`) in evaluation env 0 from the game's start and prints, at each of its moves, the rank and
probability the learned policy gives the imitated move; the trajectory's discounted return still to come (what the
learners are taught there) against the model's value of the state, the search's root value and the imitated move's
one-step Q (the model's reward plus the discounted value of the state it leads to); and the move the greedy agent would take there, with both moves'
visits, searched Q (0 where unvisited), one-step Q and improved-policy share. Ends with
the fraction of moves where the learned policy's top move and the greedy agent's move are the imitated one, and
how far, on average, the model's value, the search's root value and the improved policy's expected one-step Q
(`mcts.root_value: lookahead`) lie from the return still to come.
Reads a run's latest checkpoint; changes nothing in the run.

  python scripts/demo_fidelity.py runs/zork-demo-better --set game.rom_dir=../shared/jericho-game-suite
"""

from __future__ import annotations

import argparse
from pathlib import Path

from explain_episode import one_step  # scripts/, beside this one

from priorzero_core import agent as agent_module
from priorzero_core.agent import EnvView, kept_actions
from priorzero_core.config import load_config
from priorzero_core.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, as for priorzero eval")
    args = parser.parse_args()

    cfg = load_config(args.run_dir / "config.yaml", [*args.set, "tracking.enabled=false"])
    trainer = Trainer(cfg, args.run_dir, resume=True, readonly=True, progress=False)
    try:
        if not trainer.replay.demos:
            raise SystemExit(f"{args.run_dir}: its latest checkpoint holds no imitated trajectory")
        steps = [step for seg in trainer.replay.demos for step in seg.steps]
        moves = [step.action for step in steps]
        pool, agent = trainer.eval_pool, trainer.agent
        (ts,) = pool.reset([0])
        history: list[tuple[str, str, float]] = []
        searched = []  # the search's own output for each decision (its Q values of the visited moves)
        search = agent_module.search
        agent_module.search = lambda *a, **k: searched.append(search(*a, **k)) or searched[-1]
        policy_hits = greedy_hits = n = 0
        errors = {"the model's value": 0.0, "the search's root value": 0.0, "the improved policy's one-step Q": 0.0}
        for t, move in enumerate(moves):
            valid = kept_actions(ts, agent.spec.action_space_size)
            if move not in valid:
                print(f"[{t}] {move!r} is not a valid action here: the trajectory does not replay on this seed")
                break
            look = one_step(agent, history, ts, valid, cfg.world_model.discount)
            logits, value, one_step_q = look.logits, look.value, look.q
            probs = logits[0, :len(valid)].softmax(-1)
            order = sorted(range(len(valid)), key=lambda i: -float(probs[i]))
            i = valid.index(move)
            (decision,) = agent.act([EnvView(history=list(history), timestep=ts)], mode="wm")
            n += 1
            policy_hits += order[0] == i
            greedy_hits += decision.action == move
            q = searched[-1].q_values[0]
            ahead = float((decision.policy_target * one_step_q.numpy()).sum())  # mcts.root_value lookahead
            for key, estimate in zip(errors, (float(value[0]), decision.root_value, ahead)):
                errors[key] += abs(steps[t].root_value - estimate)
            g = valid.index(decision.action)
            print(f"[{t}] {move:<22} rank {order.index(i) + 1:>2}/{len(valid):<3} p {float(probs[i]):.2f}  to go "
                  f"{steps[t].root_value:+6.2f}: value {float(value[0]):+6.2f}, search {decision.root_value:+6.2f}, "
                  f"one-step Q {float(one_step_q[i]):+6.2f}  policy's top {valid[order[0]]!r} ({float(probs[order[0]]):.2f})"
                  + ("" if decision.action == move else
                     f"\n     greedy: {decision.action!r} against it: visits {decision.visit_dist[g]:.2f} / "
                     f"{decision.visit_dist[i]:.2f}, searched Q {float(q[g]):+.2f} / {float(q[i]):+.2f}, one-step Q "
                     f"{float(one_step_q[g]):+.2f} / {float(one_step_q[i]):+.2f}, improved policy "
                     f"{decision.policy_target[g]:.2f} / {decision.policy_target[i]:.2f}"))
            (after,) = pool.step([move], [0])
            history.append((ts.observation, move, after.reward))
            ts = after
            if ts.done:
                break
        n = max(n, 1)
        print(f"policy top-1 on the imitated moves {policy_hits}/{n} = {policy_hits / n:.2f}; "
              f"greedy agent {greedy_hits}/{n} = {greedy_hits / n:.2f}")
        print("mean distance from the return still to come: "
              + ", ".join(f"{key} {total / n:.1f}" for key, total in errors.items()))
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
