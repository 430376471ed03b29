"""Jericho valid actions, the cost of a step: a per-game LRU cache and a pool of worker processes.

A request is `(world_state_hash, frotz_state)`. Hits come from a cache shared by every `ValidActions`
of the same ROM in this process. Misses go to worker processes, each holding its own `FrotzEnv`: a job is
`(state, part, parts)`; the worker lists Jericho's candidate commands for the state (cheap) and tests its
part of them (the expensive part). When fewer states are new than there are workers, each state is split
across all workers, so even a single new state keeps every worker busy; otherwise each worker takes whole
states. Only the 14 kB interpreter state crosses the pipe. A worker that overruns the timeout (Jericho hangs
on some Zork 1 states) is killed and replaced, and its request answers `None`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import weakref
from collections import OrderedDict, defaultdict, deque
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jericho
from jericho.util import verb_usage_count

from ..errors import GameError
from .tagger import install_tagger

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 120.0
Request = tuple[str, Any]  # (world-state hash, FrotzEnv.get_state())
Diffs = dict[tuple, list[str]]  # world change -> the candidate commands that cause it
Ranked = dict[tuple, list[tuple[int, str]]]  # the same, each command with its position among the candidates


def candidate_actions(env: jericho.FrotzEnv, state: Any) -> list[str]:
    """Jericho's candidate commands for `state` (grammar templates x interactive objects), in a fixed order."""
    env.set_state(state)
    if env.act_gen is None:
        return []
    groups = env._identify_interactive_objects(use_object_tree=True)
    # Jericho iterates sets here; sorting makes the chosen names, so the candidates and the tie-breaks in
    # `pick_actions`, the same in every process whatever its string-hash seed.
    names = env._score_object_names({desc: sorted(objs) for desc, objs in sorted(groups.items())})
    return env.act_gen.generate_actions(names)


def filter_candidates(env: jericho.FrotzEnv, state: Any, candidates: list[str]) -> Diffs:
    """Play each candidate from `state` and group those that change the world by their change."""
    env.set_state(state)
    return dict(env._filter_candidate_actions(candidates, use_ctypes=True, use_parallel=False))


def indexed(diffs: Diffs, candidates: Sequence[str]) -> Ranked:
    """`diffs` with each command paired with its position among all of a state's candidates."""
    position: dict[str, int] = {}
    for i, action in enumerate(candidates):
        position.setdefault(action, i)
    return {diff: [(position[a], a) for a in actions] for diff, actions in diffs.items()}


def pick_actions(parts: Sequence[Ranked]) -> list[str]:
    """One command per world change, as `FrotzEnv.get_valid_actions` does, ties broken by candidate order.

    The parts may hold interleaved slices of the candidates; the positions restore Jericho's sequential order.
    """
    merged: dict[tuple, list[tuple[int, str]]] = defaultdict(list)
    for part in parts:
        for diff, actions in part.items():
            merged[diff].extend(actions)
    groups = sorted(merged.values(), key=min)  # world changes in the order a sequential pass first meets them
    return [max((a for _, a in sorted(group)), key=verb_usage_count) for group in groups]


def compute_valid_actions(env: jericho.FrotzEnv, state: Any) -> list[str]:
    """Valid actions for `state` in this process: `get_valid_actions`, with the order made deterministic."""
    candidates = candidate_actions(env, state)
    return pick_actions([indexed(filter_candidates(env, state, candidates), candidates)])


class LRUCache:
    """A bounded mapping that forgets the least recently used key first."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._data: OrderedDict[str, list[str]] = OrderedDict()

    def get(self, key: str) -> Optional[list[str]]:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: str, value: list[str]) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


_SHARED_CACHES: dict[str, LRUCache] = {}


def shared_cache(rom: Path, maxsize: int) -> LRUCache:
    """The process-wide cache for one ROM; the largest requested size wins."""
    cache = _SHARED_CACHES.setdefault(str(Path(rom).resolve()), LRUCache(maxsize))
    cache.maxsize = max(cache.maxsize, maxsize)
    return cache


def _serve(conn: Connection, rom: str, filter_fn: Callable[[jericho.FrotzEnv, Any, list[str]], Diffs]) -> None:
    """Worker loop: answer (state, part, parts) until the parent sends None or goes away.

    The answer is `filter_fn` over every `parts`-th candidate command from `part` on, with their positions.
    """
    try:
        install_tagger()
        env = jericho.FrotzEnv(rom)
        conn.send(("ready", None))
    except Exception as err:  # reported to the parent, which raises it as a GameError
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        try:
            state, part, parts = job
            candidates = candidate_actions(env, state)
            # Every parts-th command: Jericho groups candidates by template, whose costs differ a lot, so
            # interleaved slices take about equally long where contiguous chunks do not.
            conn.send(("ok", indexed(filter_fn(env, state, candidates[part::parts]), candidates)))
        except Exception as err:
            conn.send(("error", f"{type(err).__name__}: {err}"))


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: mp.context.BaseContext, rom: str):
        self.conn, child = ctx.Pipe()
        # Read at start time so a test can swap in a hanging filter; spawn pickles it by name.
        self.process = ctx.Process(target=_serve, args=(child, rom, filter_candidates), daemon=True)
        self.process.start()
        child.close()
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        if not self.conn.poll(WORKER_START_TIMEOUT_S):
            raise GameError(f"valid-action worker did not start within {WORKER_START_TIMEOUT_S:.0f} s")
        try:
            status, message = self.conn.recv()
        except EOFError:
            # Typically a script without `if __name__ == "__main__":`, which spawn re-runs in the child.
            status, message = "error", "it exited (scripts that start workers need an `if __name__ == '__main__':` guard)"
        if status != "ready":
            raise GameError(f"valid-action worker failed to start: {message}")
        self.ready = True

    def stop(self, kill: bool = False) -> None:
        if not kill and self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    while workers:
        workers.pop().stop()


class ValidActions:
    """Cached, parallel valid actions for one ROM; `workers=0` computes in-process (no timeout there)."""

    def __init__(self, rom: Path, workers: int = 2, timeout_s: float = 40.0, cache_size: int = 100_000):
        self.rom = str(Path(rom).resolve())
        self.timeout_s = timeout_s
        self.cache = shared_cache(Path(self.rom), cache_size)
        install_tagger()
        self._workers: list[_Worker] = []
        if workers and mp.current_process().daemon:
            # Daemonic processes may not have children (why Jericho's own use_parallel fails there).
            log.warning("valid actions: running in a daemonic process, computing in-process instead of %d workers",
                        workers)
            workers = 0
        self._local = None if workers else jericho.FrotzEnv(self.rom)
        if workers:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # workers must not inherit tokenizer threads
            self._ctx = mp.get_context("spawn")
            self._workers = [_Worker(self._ctx, self.rom) for _ in range(workers)]
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)  # also runs at interpreter exit

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def wait_ready(self) -> None:
        """Block until every worker has loaded the game (otherwise the first batch waits for them)."""
        for worker in self._workers:
            worker.wait_ready()

    def get(self, state_hash: str, state: Any) -> Optional[list[str]]:
        return self.batch([(state_hash, state)])[0]

    def batch(self, requests: Sequence[Request]) -> list[Optional[list[str]]]:
        """Valid actions per request, in order; None where the computation timed out or failed."""
        todo: dict[str, Any] = {}
        for state_hash, state in requests:
            if self.cache.get(state_hash) is None:
                todo.setdefault(state_hash, state)
        computed = self._compute(todo) if todo else {}
        results: list[Optional[list[str]]] = []
        for state_hash, _ in requests:
            actions = self.cache.get(state_hash)
            if actions is None and computed.get(state_hash) is not None:
                actions = computed[state_hash]
                self.cache.put(state_hash, actions)
            results.append(list(actions) if actions is not None else None)
        return results

    def _compute(self, todo: dict[str, Any]) -> dict[str, Optional[list[str]]]:
        if self._local is not None:
            return {key: compute_valid_actions(self._local, state) for key, state in todo.items()}
        # Whole states while every worker gets one (which spares the workers listing the same candidates
        # twice); the states left over, fewer than the workers, are each split across all workers, so no
        # worker idles while another finishes a last whole state.
        workers, items = len(self._workers), list(todo.items())
        whole = len(items) - len(items) % workers
        parts = {key: 1 if i < whole else workers for i, (key, _) in enumerate(items)}
        jobs = deque((key, part, parts[key], state) for key, state in items for part in range(parts[key]))
        answers = self._run(jobs)
        results: dict[str, Optional[list[str]]] = {}
        for key in todo:
            chunks = [answers.get((key, i)) for i in range(parts[key])]
            results[key] = None if None in chunks else pick_actions(chunks)  # type: ignore[arg-type]
        return results

    def _run(self, jobs: deque) -> dict[tuple[str, int], Optional[Ranked]]:
        """Run (key, part, parts, state) jobs on the workers; a job that fails or overruns gives None."""
        idle = deque(self._workers)
        busy: dict[Connection, tuple[_Worker, tuple[str, int], float]] = {}
        out: dict[tuple[str, int], Optional[Ranked]] = {}
        while jobs or busy:
            while jobs and idle:
                worker = idle.popleft()
                worker.wait_ready()
                key, part, parts, state = jobs.popleft()
                worker.conn.send((state, part, parts))
                busy[worker.conn] = (worker, (key, part), time.monotonic() + self.timeout_s)
            next_deadline = min(deadline for _, _, deadline in busy.values())
            for conn in wait(list(busy), timeout=max(0.0, next_deadline - time.monotonic())):
                worker, job, _ = busy.pop(conn)  # type: ignore[index]
                try:
                    status, value = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    status, value = "error", "worker exited"
                if status == "ok":
                    out[job] = value
                    idle.append(worker)
                else:
                    log.warning("valid actions failed for state %s: %s; restarting the worker", job[0], value)
                    out[job] = None
                    idle.append(self._replace(worker))
            now = time.monotonic()
            for conn, (worker, job, deadline) in list(busy.items()):
                if now >= deadline:
                    log.warning("valid actions for state %s took over %.1f s; killing worker %s",
                                job[0], self.timeout_s, worker.process.pid)
                    del busy[conn]
                    out[job] = None
                    idle.append(self._replace(worker))
        return out

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop(kill=True)
        fresh = _Worker(self._ctx, self.rom)
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        """Stop the workers (also done at interpreter exit)."""
        self._finalizer()
