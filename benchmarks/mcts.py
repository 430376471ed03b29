"""Search throughput: B envs in one batched search vs B one-env searches, on a random zork-sized world model."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from priorzero_core.config import load_config
from priorzero_core.mcts import RootOutput, search
from priorzero_core.world_model import RootContext, WorldModel

EMBED = 384  # all-MiniLM-L6-v2


def random_contexts(envs: int, actions: int, context_length: int, seed: int, device: torch.device) -> RootContext:
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, EMBED, generator=g), dim=-1)  # noqa: E731
    valid_count = torch.randint(actions // 4, actions + 1, (envs, 1), generator=g)
    ctx = RootContext(
        past_obs=unit(envs, context_length - 1),
        past_act=unit(envs, context_length - 1),
        past_len=torch.randint(0, context_length, (envs,), generator=g),
        obs=unit(envs),
        valid_emb=unit(envs, actions),
        valid_mask=torch.arange(actions) < valid_count,
    )
    return RootContext(*(getattr(ctx, f).to(device) for f in ctx.__dataclass_fields__))


def env(ctx: RootContext, b: int) -> RootContext:
    return RootContext(*(getattr(ctx, f)[b : b + 1] for f in ctx.__dataclass_fields__))


def timed_round(model: WorldModel, contexts: list[RootContext], roots: list[RootOutput], cfg, discount: float) -> float:
    """Wall time of one search per context (root inference excluded)."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for ctx, root in zip(contexts, roots):
        out = search(model.search_fn(ctx), root, ctx.valid_mask, cfg, rng, add_noise=True, discount=discount)
    out.selected_action.cpu()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="zork", help="config whose world model and action space are used")
    parser.add_argument("--envs", type=int, default=8)
    parser.add_argument("--simulations", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, one per core, as training's run.torch_threads)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config, overrides={"mcts.num_simulations": args.simulations}, debug=False)
    wm_cfg, actions = cfg.world_model, cfg.game.action_space_size or 55
    device = torch.device(args.device)
    model = WorldModel(wm_cfg, EMBED).to(device).eval()
    ctx = random_contexts(args.envs, actions, wm_cfg.context_length, seed=0, device=device)

    modes = {"batched": [ctx], "sequential": [env(ctx, b) for b in range(args.envs)]}
    roots = {mode: [RootOutput(*model.root_inference(c)) for c in cs] for mode, cs in modes.items()}
    best = dict.fromkeys(modes, float("inf"))
    for _ in range(args.repeats + 1):  # alternate the modes so both see the same machine load; round 0 warms up
        for mode, contexts in modes.items():
            best[mode] = min(best[mode], timed_round(model, contexts, roots[mode], cfg.mcts, wm_cfg.discount))
    batched, sequential = best["batched"], best["sequential"]
    sims = args.envs * args.simulations
    print(f"world model D={wm_cfg.embed_dim} layers={wm_cfg.num_layers} context={wm_cfg.context_length}, "
          f"A={actions}, {args.simulations} simulations, {args.envs} envs, device {device}, {torch.get_num_threads()} thread(s)")
    print(f"{'mode':<28}{'seconds':>10}{'sims/s':>12}")
    print(f"{'batched (1 search)':<28}{batched:>10.4f}{sims / batched:>12.0f}")
    print(f"{f'sequential ({args.envs} searches)':<28}{sequential:>10.4f}{sims / sequential:>12.0f}")
    print(f"ratio mcts_batched {sequential / batched:.2f}")


if __name__ == "__main__":
    main()
