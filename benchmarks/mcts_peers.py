"""Search throughput against peers: our batched MCTS vs LightZero's compiled ctree and mctx, same model.

The model is a fixed-seed MLP (latent + one-hot action -> next latent -> logits, value, reward) saved to an
.npz that every search loads, so all three do the same model work per simulation. LightZero and mctx run in
venvs of their own (scripts/setup_bench_peers.sh) as worker processes of this same file, which is why it
imports only numpy at the top. Rounds of ours and theirs alternate so machine noise hits all of them; the
figures are medians. Ends with `ratio mcts_vs_lightzero` and `ratio mcts_vs_mctx` (simulations/s, ours ÷ theirs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

PEERS_DIR = Path(os.environ.get("PRIORZERO_BENCH_PEERS", Path.home() / ".cache" / "priorzero"))
PEER_VENVS = {"lightzero": "bench-lightzero", "mctx": "bench-mctx"}
DISCOUNT = 0.997
PB_C_BASE, PB_C_INIT = 19652.0, 1.25
DIRICHLET_ALPHA, NOISE_WEIGHT = 0.3, 0.25
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}

Timer = Callable[[], float]  # seconds for one round of searches (or of their model steps alone)


def make_model(path: Path, envs: int, actions: int, latent: int, seed: int) -> None:
    """Write the MLP's weights and the B root latents to `path`."""
    rng = np.random.default_rng(seed)

    def dense(fan_in: int, fan_out: int) -> np.ndarray:
        return (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)

    np.savez(path, w1=dense(latent + actions, latent), b1=np.zeros(latent, np.float32),
             w2=dense(latent, latent), b2=np.zeros(latent, np.float32),
             heads=dense(latent, actions + 2), heads_b=np.zeros(actions + 2, np.float32),
             roots=np.tanh(rng.standard_normal((envs, latent))).astype(np.float32))


def torch_model(path: Path):
    """(weights, roots, heads(latent) -> (logits, value, reward), step(latent, action) -> (next, reward, logits, value))."""
    import torch
    import torch.nn.functional as F

    w = {k: torch.from_numpy(v) for k, v in np.load(path).items()}
    actions = w["heads"].shape[1] - 2

    def heads(latent):
        out = latent @ w["heads"] + w["heads_b"]
        return out[:, :-2], out[:, -2].tanh(), out[:, -1].tanh()

    def step(latent, action):
        x = torch.cat([latent, F.one_hot(action, actions).to(latent.dtype)], -1)
        nxt = torch.tanh(torch.relu(x @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"])
        logits, value, reward = heads(nxt)
        return nxt, reward, logits, value

    return w.pop("roots"), heads, step


def torch_model_timer(roots, step, steps: int) -> Timer:
    import torch

    actions = torch.randint(0, 55, (steps, roots.shape[0]), generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def timed() -> float:
        start = time.perf_counter()
        latent = roots
        for a in actions:
            latent = step(latent, a)[0]
        return time.perf_counter() - start

    return timed


def ours(path: Path, simulations: int, searches: int, compiled: bool = True) -> tuple[Timer, Timer]:
    """This project's priorzero_core.mcts.search, in this process (`compiled`: the numba tree, else numpy's)."""
    import torch

    from priorzero_core.config import MCTSConfig
    from priorzero_core.mcts import RootOutput, search

    torch.set_num_threads(1)
    roots, heads, step = torch_model(path)
    logits, value, _ = heads(roots)
    root = RootOutput((roots,), logits, value)
    mask = torch.ones_like(logits, dtype=torch.bool)
    cfg = MCTSConfig(num_simulations=simulations, pb_c_base=PB_C_BASE, pb_c_init=PB_C_INIT,
                     root_dirichlet_alpha=DIRICHLET_ALPHA, root_noise_weight=NOISE_WEIGHT, compiled=compiled)

    def recurrent_fn(state, action):
        nxt, reward, logits, value = step(state[0], action)
        return (nxt,), reward, logits, value

    rng = np.random.default_rng(0)

    def timed() -> float:
        start = time.perf_counter()
        for _ in range(searches):
            search(recurrent_fn, root, mask, cfg, rng, add_noise=True, discount=DISCOUNT).selected_action.tolist()
        return time.perf_counter() - start

    return timed, torch_model_timer(roots, step, simulations * searches)


def lightzero(path: Path, simulations: int, searches: int) -> tuple[Timer, Timer]:
    """LightZero 0.2.0's MuZeroMCTSCtree as its collector drives it: prepare roots with noise, search, sample."""
    import torch
    from easydict import EasyDict
    from lzero.mcts import MuZeroMCTSCtree
    from lzero.policy import select_action

    torch.set_num_threads(1)
    roots, heads, step = torch_model(path)
    B, A = roots.shape[0], heads(roots)[0].shape[1]

    class Model:  # the two methods MuZeroMCTSCtree.search calls
        def eval(self) -> None:
            pass

        def recurrent_inference(self, latent, action):
            nxt, reward, logits, value = step(latent, action)
            return EasyDict(latent_state=nxt, policy_logits=logits, value=value[:, None], reward=reward[:, None])

    mcts = MuZeroMCTSCtree(EasyDict(
        num_simulations=simulations, discount_factor=DISCOUNT, device="cpu", pb_c_base=PB_C_BASE,
        pb_c_init=PB_C_INIT, root_dirichlet_alpha=DIRICHLET_ALPHA, root_noise_weight=NOISE_WEIGHT,
        model=EasyDict(support_scale=300, categorical_distribution=False)))
    # The model gives plain scalars, as ours does: skip the inverse of MuZero's value rescaling.
    mcts.inverse_scalar_transform_handle = lambda x: x
    model, legal, to_play = Model(), [list(range(A))] * B, [-1] * B
    latent_roots = roots.numpy()
    rng = np.random.default_rng(0)

    def timed() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(searches):
                logits, _, _ = heads(roots)
                tree = MuZeroMCTSCtree.roots(B, legal)
                noises = [rng.dirichlet([DIRICHLET_ALPHA] * A).astype(np.float32).tolist() for _ in range(B)]
                tree.prepare(NOISE_WEIGHT, noises, [0.0] * B, logits.numpy().tolist(), to_play)
                mcts.search(tree, model, latent_roots, to_play)
                [select_action(d, temperature=1.0, deterministic=False) for d in tree.get_distributions()]
        return time.perf_counter() - start

    return timed, torch_model_timer(roots, step, simulations * searches)


def mctx_search(path: Path, simulations: int, searches: int) -> tuple[Timer, Timer]:
    """mctx.muzero_policy, the whole search (model included) under one jax.jit, on CPU."""
    import jax
    import jax.numpy as jnp
    import mctx

    params = {k: jnp.asarray(v) for k, v in np.load(path).items()}
    roots = params.pop("roots")
    A = params["heads"].shape[1] - 2

    def heads(params, latent):
        out = latent @ params["heads"] + params["heads_b"]
        return out[:, :-2], jnp.tanh(out[:, -2]), jnp.tanh(out[:, -1])

    def recurrent_fn(params, key, action, latent):
        x = jnp.concatenate([latent, jax.nn.one_hot(action, A, dtype=latent.dtype)], -1)
        nxt = jnp.tanh(jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"])
        logits, value, reward = heads(params, nxt)
        return mctx.RecurrentFnOutput(reward=reward, discount=jnp.full_like(reward, DISCOUNT),
                                      prior_logits=logits, value=value), nxt

    @jax.jit
    def policy(params, key, latent):
        logits, value, _ = heads(params, latent)
        return mctx.muzero_policy(params, key, mctx.RootFnOutput(prior_logits=logits, value=value, embedding=latent),
                                  recurrent_fn, simulations, dirichlet_fraction=NOISE_WEIGHT,
                                  dirichlet_alpha=DIRICHLET_ALPHA, pb_c_init=PB_C_INIT, pb_c_base=PB_C_BASE)

    @jax.jit
    def model_only(params, key, latent):
        actions = jax.random.randint(key, (simulations, latent.shape[0]), 0, A)
        return jax.lax.fori_loop(0, simulations, lambda i, s: recurrent_fn(params, key, actions[i], s)[1], latent)

    keys = list(jax.random.split(jax.random.PRNGKey(0), searches))

    def timed() -> float:
        start = time.perf_counter()
        for key in keys:
            np.asarray(policy(params, key, roots).action)
        return time.perf_counter() - start

    def timed_model() -> float:
        start = time.perf_counter()
        for key in keys:
            model_only(params, key, roots).block_until_ready()
        return time.perf_counter() - start

    return timed, timed_model


SEARCHES = {"ours": ours, "lightzero": lightzero, "mctx": mctx_search}


def worker(name: str, path: Path, simulations: int, searches: int) -> None:
    """Peer side: warm up, print the model-only round time, then time one round per 'go' line on stdin."""
    timed, timed_model = SEARCHES[name](path, simulations, searches)
    timed(), timed_model()
    print(f"ready {min(timed_model() for _ in range(3)):.6f}", flush=True)
    for _ in sys.stdin:
        print(f"{timed():.6f}", flush=True)


class Peer:
    """A worker process of this file in a peer's venv."""

    def __init__(self, name: str, python: Path, args: argparse.Namespace, model: Path, log: Path):
        self.name, self.log = name, log
        self.proc = subprocess.Popen(
            [str(python), __file__, "--worker", name, "--model", str(model), "--simulations", str(args.simulations),
             "--searches", str(args.searches)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
            env={**os.environ, **ONE_THREAD})

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died:\n{self.log.read_text()[-3000:]}")
        return line

    def ready(self) -> float:
        return float(self._line().split()[1])

    def round(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return float(self._line())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", type=int, default=8, help="roots searched together, B (default: 8)")
    parser.add_argument("--simulations", type=int, default=25, help="simulations per search (default: 25)")
    parser.add_argument("--actions", type=int, default=55, help="action space size (default: 55)")
    parser.add_argument("--latent", type=int, default=256, help="latent size of the MLP model (default: 256)")
    parser.add_argument("--searches", type=int, default=10, help="searches per timed round (default: 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each search (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MLP weights and root latents")
    parser.add_argument("--peers-dir", type=Path, default=PEERS_DIR,
                        help="where scripts/setup_bench_peers.sh made bench-lightzero/ and bench-mctx/ "
                             "(default: $PRIORZERO_BENCH_PEERS or ~/.cache/priorzero)")
    parser.add_argument("--worker", choices=sorted(SEARCHES), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.simulations, args.searches)

    tmp = Path(tempfile.mkdtemp(prefix="mcts_peers_"))
    model = tmp / "mlp.npz"
    make_model(model, args.envs, args.actions, args.latent, args.seed)
    peers = []
    for name, venv in PEER_VENVS.items():
        python = args.peers_dir / venv / "bin" / "python"
        if python.exists():
            peers.append(Peer(name, python, args, model, tmp / f"{name}.log"))
        else:
            print(f"skip {name}: no venv at {python.parent.parent}; make it with scripts/setup_bench_peers.sh")
    os.environ.update(ONE_THREAD)  # as the workers have it, before torch is imported
    timed, timed_model = ours(model, args.simulations, args.searches)
    timed_numpy, _ = ours(model, args.simulations, args.searches, compiled=False)
    timed(), timed_numpy(), timed_model()
    model_seconds = {"ours": min(timed_model() for _ in range(3))}
    model_seconds["ours-numpy"] = model_seconds["ours"]
    model_seconds |= {p.name: p.ready() for p in peers}
    rounds: dict[str, list[float]] = {name: [] for name in model_seconds}
    for _ in range(args.repeats):  # alternate, so every search sees the same machine load
        rounds["ours"].append(timed())
        rounds["ours-numpy"].append(timed_numpy())
        for p in peers:
            rounds[p.name].append(p.round())
    for p in peers:
        p.close()

    sims = args.envs * args.simulations * args.searches
    rate = {name: sims / statistics.median(times) for name, times in rounds.items()}
    print(f"MLP model: latent {args.latent} + one-hot {args.actions} actions -> latent, logits, value, reward; "
          f"B={args.envs} roots, {args.simulations} simulations, {args.searches} searches/round, "
          f"{args.repeats} rounds, 1 thread each")
    print(f"{'search':<12}{'s/round':>10}{'sims/s':>10}{'model share':>13}")
    for name, times in rounds.items():
        median = statistics.median(times)
        print(f"{name:<12}{median:>10.4f}{rate[name]:>10.0f}{model_seconds[name] / median:>12.0%}")
    print(f"compiled tree vs numpy tree (mcts.compiled): {rate['ours'] / rate['ours-numpy']:.2f}x")
    for name in rounds:
        if name not in ("ours", "ours-numpy"):
            print(f"ratio mcts_vs_{name} {rate['ours'] / rate[name]:.2f}")


if __name__ == "__main__":
    main()
