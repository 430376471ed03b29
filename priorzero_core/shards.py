"""Collection on K Ray actors (`collect.shards` > 1): each shard plays its share of the envs with its own copy of
the world model (and LLM prior), fed the learner's weights at every collect stage through Ray's object store,
then its share of search-free exploration (`explore.random_steps`, `explore.random_envs`).

The learner keeps the one Go-Explore archive. Each shard holds a mirror of it, brought in step before every
collect (`ArchiveSync.delta`: the cells added, shortened or recounted since the last one, and the trace steps
the shard has not seen); the shard's episodes choose and visit cells in the mirror as in-process collection
does, and the shard records what they did (`ShardArchive.events`). The learner replays those events into its
archive shard by shard, in index order, so a run's replay and archive depend on `run.seed` and K alone. A
visit the mirror refused is refused by the learner too (its cell can only be shorter there), so a shard ships
an env snapshot only with the visits its mirror kept.

Failures: a shard that dies or raises is started again (new envs, its episodes in progress lost); the stage
keeps the other shards' segments when at least half of them returned, and logs the steps lost, else it fails
and is retried as an in-process collect is.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from typing import Any, Optional

import numpy as np
import torch

from . import faults
from .archive import Archive, Cell, Trace
from .collector import CollectStats, Collector, SearchFreeExplorer
from .config import ExploreConfig, PriorZeroConfig
from .errors import first_line
from .ppo.env_state import state_bytes, state_from_bytes
from .replay import GameSegment, StepRecord

log = logging.getLogger("priorzero")

Ref = Optional[tuple[str, int]]  # a trace: None (the start), ("m", learner node id) or ("l", shard-local id)


def _pack(state: Any) -> bytes:
    return zlib.compress(state_bytes(state), 1)


def _unpack(packed: bytes) -> Any:
    return state_from_bytes(zlib.decompress(packed))


def shard_envs(num_envs: int, shards: int) -> list[tuple[int, int]]:
    """(first env index, env count) per shard: the envs split as evenly as they go, the first shards one more.
    Env i keeps the game seed `run.seed + i` it has in one process."""
    out, first = [], 0
    for k in range(shards):
        n = num_envs // shards + (k < num_envs % shards)
        out.append((first, n))
        first += n
    return out


class ShardArchive(Archive):
    """A shard's mirror of the learner's archive, recording what the shard's episodes do to it."""

    def __init__(self, cfg: ExploreConfig, rng: np.random.Generator):
        super().__init__(cfg, rng)
        self.mirror_nodes: list[Trace] = []  # learner node id -> trace (kept alive, so the ids of id() hold)
        self.mirror_ids: dict[int, int] = {}
        self.local_nodes: dict[int, Trace] = {}  # traces this shard's episodes made, by local id
        self.local_ids: dict[int, int] = {}
        self.next_local = 0
        self.events: list[tuple] = []
        self.new_nodes: list[tuple[int, Ref, StepRecord]] = []

    def apply(self, delta: dict) -> None:
        """Take the learner's archive as `ArchiveSync.delta` describes it; the record starts again."""
        for nid, parent, step in delta["nodes"]:
            if nid != len(self.mirror_nodes):
                raise RuntimeError(f"archive sync out of order: node {nid} after {len(self.mirror_nodes)}")
            node = Trace.extend(self.mirror_nodes[parent] if parent is not None else None, step)
            self.mirror_nodes.append(node)
            self.mirror_ids[id(node)] = nid
        if delta["full"]:
            self.cells = {}
        for key, score, nid, packed, chosen, seen in delta["cells"]:
            trace = self.mirror_nodes[nid] if nid is not None else None
            self.cells[key] = Cell(key, score, trace, _unpack(packed), chosen, seen)
        for key, chosen, seen in delta["counts"]:
            cell = self.cells[key]
            cell.times_chosen, cell.times_seen = chosen, seen
        self.updates = delta["updates"]
        self.events, self.new_nodes = [], []
        self.replaced, self.changed, self.counted = False, set(), set()  # the learner tracks changes, not a mirror

    def _known(self, node: Optional[Trace]) -> Ref:
        if node is None:
            return None
        nid = self.mirror_ids.get(id(node))
        return ("m", nid) if nid is not None else ("l", self.local_ids[id(node)])

    def ref(self, trace: Optional[Trace]) -> Ref:
        """`trace` as the learner can rebuild it: its steps past the last node the learner knows are recorded
        (`new_nodes`, parents first) under local ids."""
        chain, node = [], trace
        while node is not None and id(node) not in self.mirror_ids and id(node) not in self.local_ids:
            chain.append(node)
            node = node.parent
        for new in reversed(chain):
            lid = self.next_local
            self.next_local += 1
            self.local_ids[id(new)], self.local_nodes[lid] = lid, new
            self.new_nodes.append((lid, self._known(new.parent), new.step))
        return self._known(trace)

    def visit(self, key, score, trace, snapshot) -> bool:
        ref = self.ref(trace)
        kept = super().visit(key, score, trace, snapshot)
        self.events.append(("visit", key, score, ref, _pack(self.cells[key].state) if kept else None))
        return kept

    def choose(self) -> Cell:
        cell = super().choose()
        self.events.append(("choose", cell.key))
        return cell

    def keep_local(self, tips: list[Optional[Trace]]) -> list[int]:
        """Forget the local traces but `tips` (the episodes in progress go on from them); their local ids."""
        refs = [self.ref(t) for t in tips]
        keep = {r[1] for r in refs if r is not None and r[0] == "l"}
        self.local_nodes = {lid: self.local_nodes[lid] for lid in keep}
        self.local_ids = {id(node): lid for lid, node in self.local_nodes.items()}
        return sorted(keep)

    def forget_local(self) -> None:
        self.local_nodes, self.local_ids = {}, {}


class ArchiveSync:
    """The learner's side: node ids for the traces it sends, the deltas, and the replay of shards' events."""

    def __init__(self, archive: Archive, shards: int):
        self.archive = archive
        self.nodes: list[Trace] = []
        self.node_ids: dict[int, int] = {}
        self.sent_nodes = [0] * shards  # nodes each shard has
        self.fresh = [True] * shards  # shards whose mirror holds nothing yet
        self.local: list[dict[int, Trace]] = [{} for _ in range(shards)]

    def node_id(self, trace: Optional[Trace]) -> Optional[int]:
        chain, node = [], trace
        while node is not None and id(node) not in self.node_ids:
            chain.append(node)
            node = node.parent
        for new in reversed(chain):
            self.node_ids[id(new)] = len(self.nodes)
            self.nodes.append(new)
        return self.node_ids[id(trace)] if trace is not None else None

    def deltas(self) -> list[dict]:
        """Per shard, what brings its mirror to the archive as it is now."""
        replaced, changed, counted = self.archive.take_changes()

        def cell_rows(keys) -> list[tuple]:
            cells = self.archive.cells
            return [(k, cells[k].score, self.node_id(cells[k].trace), _pack(cells[k].state), cells[k].times_chosen,
                     cells[k].times_seen) for k in sorted(keys)]

        everything = changes = counts = None
        out = []
        for k in range(len(self.fresh)):
            full = replaced or self.fresh[k]
            if full:
                everything = everything if everything is not None else cell_rows(self.archive.cells)
            elif changes is None:
                changes = cell_rows(changed)
                counts = [(key, self.archive.cells[key].times_chosen, self.archive.cells[key].times_seen)
                          for key in sorted(counted)]
            out.append({"full": full, "cells": everything if full else changes, "counts": [] if full else counts,
                        "updates": self.archive.updates})
        for k, delta in enumerate(out):  # after every cell row has given its trace a node id
            delta["nodes"] = [(nid, self.node_id(self.nodes[nid].parent), self.nodes[nid].step)
                              for nid in range(self.sent_nodes[k], len(self.nodes))]
            self.sent_nodes[k] = len(self.nodes)
            self.fresh[k] = False
        return out

    def restart(self, k: int) -> None:
        """Shard k starts again with an empty mirror and no traces."""
        self.sent_nodes[k], self.fresh[k], self.local[k] = 0, True, {}

    def _resolve(self, k: int, ref: Ref) -> Optional[Trace]:
        if ref is None:
            return None
        return self.nodes[ref[1]] if ref[0] == "m" else self.local[k][ref[1]]

    def merge(self, k: int, nodes: list, events: list, tips: list[int]) -> None:
        """Replay shard k's collect into the archive: its new traces, then its choices and visits in order."""
        local = self.local[k]
        for lid, parent, step in nodes:
            local[lid] = Trace.extend(self._resolve(k, parent), step)
        cells = self.archive.cells
        for event in events:
            if event[0] == "choose":
                cells[event[1]].times_chosen += 1
                self.archive.counted.add(event[1])
                continue
            _, key, score, ref, packed = event

            def snapshot(packed=packed, key=key):
                if packed is None:
                    raise RuntimeError(f"archive sync: shard {k} sent no snapshot for cell {key} the learner keeps")
                return _unpack(packed)

            self.archive.visit(key, score, self._resolve(k, ref), snapshot)
        self.local[k] = {lid: local[lid] for lid in tips}


class CollectShard:
    """One shard: its envs, a world-model copy, the LLM prior when the run has one, a Collector, a mirror of the
    archive and its share of search-free exploration's envs. Runs as a Ray actor (`ShardedCollector` wraps it
    with `ray.remote`)."""

    def __init__(self, cfg_json: dict, index: int, first_env: int, num_envs: int):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        cfg = PriorZeroConfig.model_validate(cfg_json)
        torch.set_num_threads(max(1, math.ceil(cfg.collect.shard_cpus)))
        from .agent import Agent
        from .games import EnvPool, game_spec
        from .text_encoder import TextEncoder
        from .trainer import pick_device
        from .world_model import WorldModel

        torch.manual_seed(cfg.run.seed * 1000 + index + 1)
        self.index = index
        self.rng = np.random.default_rng([cfg.run.seed, index + 1])  # apart from the learner's run.seed stream
        self.device = pick_device(cfg.run.device)
        spec = game_spec(cfg.game)
        encoder = TextEncoder.from_config(cfg.world_model, device=self.device)
        self.model = WorldModel(cfg.world_model, encoder.dim).to(self.device).eval()
        self.llm = None
        if cfg.llm.enabled:
            from .llm_prior import make_llm_prior

            self.llm = make_llm_prior(cfg.llm, device=self.device)
        self.versions = {"llm": 0}  # the pretrained LLM is version 0
        self.pool = EnvPool(cfg.game, num_envs, seed=cfg.run.seed + first_env)
        self.archive = ShardArchive(cfg.explore, self.rng) if cfg.explore.enabled else None
        agent = Agent(cfg, spec, encoder, self.model, self.llm, self.rng, self.device)
        self.collector = Collector(self.pool, agent, cfg.collect.segment_length, cfg.collect.epsilon, self.rng,
                                   self.archive, cfg.explore, context=cfg.world_model.context_length - 1,
                                   loss_penalty=cfg.collect.loss_penalty)
        self.cfg = cfg
        self.explorer: Optional[SearchFreeExplorer] = None
        first, n = shard_envs(cfg.explore.random_envs, cfg.collect.shards)[index]
        if self.archive is not None and cfg.explore.random_steps and n:
            # its share of explore.random_envs (game seeds run.seed + 30_000 + i and steps an env as in one process)
            pool = EnvPool(cfg.game, n, seed=cfg.run.seed + 30_000 + first, valid_actions=self.pool.valid_actions)
            self.explorer = SearchFreeExplorer(pool, cfg, self.archive, self.rng, spec.action_space_size)

    def ready(self) -> str:
        """The Ray node this shard runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def collect(self, wm: dict, llm_version: int, llm: Optional[dict], delta: Optional[dict], num_steps: int,
                iteration: int, record_env_state: bool) -> dict:
        """One collect stage: the learner's world-model weights `wm`, its LLM weights `llm` when they moved
        (`llm_version`), the archive `delta`; returns segments, stats and what the episodes did to the archive."""
        self.model.load_state_dict(wm)
        if llm is not None and self.llm is not None and llm_version != self.versions["llm"]:
            from .llm_prior import load_plain_state_dict

            module = self.llm.trainable_model()
            load_plain_state_dict(module, llm)
            self.llm.sync_weights(module)
            self.versions["llm"] = llm_version
        if self.archive is not None and delta is not None:
            import ray

            # the cell rows every shard gets alike travel once, as object refs inside the delta
            self.archive.apply({key: ray.get(v) if isinstance(v, ray.ObjectRef) else v for key, v in delta.items()})
        faults.inject(f"shard{self.index}-collect", iteration)  # test hook: this shard fails (or dies) mid-stage
        self.collector.record_env_state = record_env_state
        with torch.inference_mode():
            segments, stats = self.collector.collect(num_steps, iteration)
        out: dict[str, Any] = {"segments": segments, "stats": stats, "explored": None, "hazards": []}
        if self.explorer is not None:  # search-free exploration, into the same mirror after the collect
            out["explored"], out["hazards"] = self.explorer.explore(iteration)
        if self.archive is not None:
            tips = self.archive.keep_local(self.collector.running_traces())
            out.update(nodes=self.archive.new_nodes, events=self.archive.events, tips=tips)
        return out

    def state(self) -> dict:
        return self.collector.state()

    def load_state(self, state: dict) -> None:
        self.collector.load_state(state)
        if self.archive is not None:
            self.archive.forget_local()

    def close(self) -> None:
        if self.explorer is not None:
            self.explorer.close()
        self.pool.close()


class ShardedCollector:
    """The in-process Collector's interface (collect, snapshot/restore, state/load_state) over K shard actors."""

    def __init__(self, cfg: PriorZeroConfig, archive: Optional[Archive], model: torch.nn.Module, llm=None):
        import ray

        from .ray_cluster import connect_ray
        from .ppo.trainer import orz_enabled

        self.cfg = cfg
        self.archive = archive
        self.model = model
        self.llm = llm
        self.record_env_state = False
        self.explored: Optional[CollectStats] = None  # the last collect's search-free exploration (explore.random_steps)
        self.hazards: list[GameSegment] = []  # and what it lost points with (explore.hazard_fraction)
        self.k = cfg.collect.shards
        self.sync = ArchiveSync(archive, self.k) if archive is not None else None
        self._llm_sent = [0] * self.k  # the LLM weights version each shard has (0: the pretrained model)
        self._owns_ray = connect_ray(cfg, cfg.ray.address, ppo=llm is not None and orz_enabled(cfg), who="collection")
        # SPREAD: on a cluster of several nodes the shards go to different ones
        self._remote = ray.remote(num_cpus=cfg.collect.shard_cpus, scheduling_strategy="SPREAD")(CollectShard)
        self._cfg_json = cfg.model_dump(mode="json")
        self._split = shard_envs(cfg.collect.num_envs, self.k)
        self.shards: list[Any] = [None] * self.k
        self.nodes: list[str] = [""] * self.k  # the Ray node id each shard runs on
        try:
            for k in range(self.k):
                self._start(k)
        except BaseException:
            self.close()
            raise

    def _start(self, k: int) -> None:
        import ray

        first, n = self._split[k]
        self.shards[k] = self._remote.remote(self._cfg_json, k, first, n)
        try:
            self.nodes[k] = ray.get(self.shards[k].ready.remote(), timeout=self.cfg.collect.shard_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"collection shard {k} did not start within {self.cfg.collect.shard_timeout_s:.0f} s "
                               f"(it asks for {self.cfg.collect.shard_cpus} CPUs; the cluster has "
                               f"{ray.cluster_resources().get('CPU', 0):.0f})") from None
        if self.sync is not None:
            self.sync.restart(k)
        self._llm_sent[k] = 0
        log.info("collection shard %d: envs %d-%d on Ray node %s", k, first, first + n - 1, self.nodes[k])

    def _restart(self, k: int) -> None:
        import ray

        try:
            ray.kill(self.shards[k])
        except Exception:  # already gone
            pass
        self._start(k)

    def collect(self, num_steps: int, iteration: int = 0, progress: bool = False
                ) -> tuple[list[GameSegment], CollectStats]:
        import ray

        t0 = time.perf_counter()
        wm = ray.put({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        version = self.llm.weights_version if self.llm is not None else 0
        llm = None
        if version and any(sent != version for sent in self._llm_sent):  # trained since a shard last took it
            from .llm_prior import plain_state_dict

            llm = ray.put(plain_state_dict(self.llm.trainable_model()))
        deltas = self.sync.deltas() if self.sync is not None else [None] * self.k
        put: dict[int, Any] = {}  # id of a row list -> its object ref: shards not started afresh share their rows
        for delta in deltas:
            for key in ("cells", "counts") if delta is not None else ():
                rows = delta[key]
                if rows:
                    if id(rows) not in put:
                        put[id(rows)] = ray.put(rows)
                    delta[key] = put[id(rows)]
        refs = [shard.collect.remote(wm, version, llm if self._llm_sent[k] != version else None,
                                     ray.put(delta) if delta is not None else None, num_steps, iteration,
                                     self.record_env_state) for k, (shard, delta) in enumerate(zip(self.shards, deltas))]
        ray.wait(refs, num_returns=len(refs), timeout=self.cfg.collect.shard_timeout_s)
        results: dict[int, dict] = {}
        lost: dict[int, str] = {}
        for k, ref in enumerate(refs):
            try:
                results[k] = ray.get(ref, timeout=0)
            except Exception as err:  # died, raised or silent past shard_timeout_s
                lost[k] = f"{type(err).__name__}: {first_line(err)}"
        for k in results:
            self._llm_sent[k] = version
        for k in lost:
            log.warning("collection shard %d failed in iteration %d (%s); starting it again", k, iteration, lost[k])
            self._restart(k)
        if 2 * len(results) < self.k:
            raise RuntimeError(f"{len(lost)} of {self.k} collection shards failed: "
                               + "; ".join(f"shard {k}: {why}" for k, why in lost.items()))
        segments: list[GameSegment] = []
        stats = CollectStats()
        explored = [out["explored"] for out in results.values() if out["explored"] is not None]
        self.explored = CollectStats() if explored else None
        self.hazards = []
        for k in sorted(results):
            out = results[k]
            if self.sync is not None:
                self.sync.merge(k, out["nodes"], out["events"], out["tips"])
            segments += out["segments"]
            self.hazards += out["hazards"]
            stats.add(out["stats"])
            if out["explored"] is not None:
                self.explored.add(out["explored"])
        if lost:
            missing = sum(self._split[k][1] for k in lost) * num_steps
            log.warning("iteration %d: %d of %d shards returned; %d env steps lost", iteration, len(results), self.k,
                        missing)
        stats.seconds = time.perf_counter() - t0
        if self.explored is not None:  # the shards explored side by side: the slowest one's time
            self.explored.seconds = max(out["explored"].seconds for out in results.values() if out["explored"])
        return segments, stats

    def snapshot(self) -> list[dict]:
        """Every shard's episodes in progress (`Collector.state`), for `restore` if the stage fails part-way; a
        shard found dead is started again (new episodes)."""
        import ray

        refs = [shard.state.remote() for shard in self.shards]
        states = []
        for k, ref in enumerate(refs):
            try:
                states.append(ray.get(ref, timeout=self.cfg.collect.shard_timeout_s))
            except Exception as err:
                log.warning("collection shard %d is gone (%s); starting it again", k, type(err).__name__)
                self._restart(k)
                states.append(ray.get(self.shards[k].state.remote()))
        return states

    def restore(self, snapshot: list[dict]) -> None:
        import ray

        ray.get([shard.load_state.remote(state) for shard, state in zip(self.shards, snapshot)])
        if self.sync is not None:
            self.sync.local = [{} for _ in range(self.k)]

    def state(self) -> dict[str, Any]:
        return {"shards": self.snapshot()}

    def load_state(self, state: dict[str, Any]) -> None:
        shards = state.get("shards")
        if shards is None or len(shards) != self.k:
            log.warning("the checkpoint's collection state is for %s; this run's %d shards start new episodes",
                        f"{len(shards)} shards" if shards is not None else "one process", self.k)
            return
        self.restore(shards)

    def close(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for shard in self.shards:
            if shard is None:
                continue
            try:
                ray.get(shard.close.remote(), timeout=30)
            except Exception:
                pass
            ray.kill(shard)
        self.shards = [None] * self.k
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
