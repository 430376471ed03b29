"""Jericho valid actions, the cost of a step: a per-game LRU cache and a pool of worker processes.

A request is `(world_state_hash, frotz_state)`. Hits come from a cache shared by every `ValidActions`
of the same ROM in this process. Each new state is split across all workers, so they stay equally busy
whether one state is new or many: each tests an interleaved share of Jericho's candidate commands (the
expensive part). Listing the candidates is cheap; with fewer new states than workers every worker lists them
itself (it would wait idle for the list otherwise), and with more the worker that gets a state first lists
it, sends the list back and tests its share while the other shares go to the other workers as explicit
command lists. `batch` draws its requests lazily, so the workers start on a new state while the caller (an
`EnvPool` stepping its envs) makes the next request. Only the 14 kB interpreter state and the commands cross
the pipe. A worker that overruns the timeout (Jericho hangs on some Zork 1 states) is killed and replaced,
and its request answers `None`.
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
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jericho
import numpy as np
from jericho.util import verb_usage_count

from ..errors import GameError
from .tagger import install_tagger
from .tagger import jericho_util as jutil

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 120.0
Request = tuple[str, Any]  # (world-state hash, FrotzEnv.get_state())
Diffs = dict[tuple, list[str]]  # world change -> the candidate commands that cause it
Ranked = dict[bytes, list[tuple[int, str]]]  # the same (change as bytes), each command with its candidate position


class CandidateLister:
    """Jericho's candidate commands for a state (grammar templates x interactive objects), in a fixed order.

    The same list `get_valid_actions` tests, made 2-3x faster: the game's dictionary is read once (Jericho
    reads and decodes it on every call) and the template expansion is kept per set of object names (states in
    one place share it). Jericho iterates sets where this sorts, which makes the chosen names, so
    the candidates and the tie-breaks in `pick_actions`, the same in every process whatever its hash seed.
    """

    def __init__(self, env: jericho.FrotzEnv, cache_size: int = 64):
        self.env = env
        words = [w.word for w in env.get_dictionary()] if env.act_gen is not None else []
        self.dictionary = frozenset(words)
        self.max_word_length = max((len(w) for w in words), default=0)
        self._expanded = LRUCache(cache_size)

    def __call__(self, state: Any) -> list[str]:
        env = self.env
        if env.act_gen is None:
            return []
        groups = self.interactive_objects(state)
        names = env._score_object_names({desc: sorted(objs) for desc, objs in sorted(groups.items())})
        key = "\n".join(names)
        actions = self._expanded.get(key)
        if actions is None:
            actions = env.act_gen.generate_actions(names)
            self._expanded.put(key, actions)
        return list(actions)

    def interactive_objects(self, state: Any) -> dict[str, list[tuple[str, str, str]]]:
        """`FrotzEnv._identify_interactive_objects(use_object_tree=True)` for `state`, step for step."""
        env = self.env
        env.set_state(state)
        look = jutil.clean(env.step("look")[0])
        objs = {o + ("LOC",) for o in jutil.extract_objs(look)}
        env.set_state(state)
        inventory = jutil.clean(env.step("inventory")[0])
        objs |= {o + ("INV",) for o in jutil.extract_objs(inventory)}
        env.set_state(state)
        player_loc = env.get_player_location()
        if player_loc is not None:
            surrounding = jutil.get_subtree(player_loc.child, env.get_world_objects())
            player_obj = env.get_player_object()
            if player_obj in surrounding:
                surrounding.remove(player_obj)
            for o in surrounding:
                name = o.name.split()
                objs.add((o.name, "PROPN", "OBJTREE"))
                if len(name) > 1:  # multi-word names: the first words are taken as adjectives
                    objs.update((w, "ADJ", "OBJTREE") for w in name[:-1])
                    objs.add((name[-1], "NOUN", "OBJTREE"))
        # Single words the parser does not know are dropped; then the objects that cannot be examined.
        objs = {o for o in objs if len(o[0].split()) > 1 or o[0][: self.max_word_length] in self.dictionary}
        desc2obj: dict[str, list[tuple[str, str, str]]] = {}
        examined: dict[str, str] = {}
        for obj in sorted(objs):
            if obj[0] not in examined:
                env.set_state(state)
                examined[obj[0]] = jutil.clean(env.step("examine " + obj[0])[0])
            description = examined[obj[0]]
            if jutil.recognized(description):
                desc2obj.setdefault(description, []).append(obj)
        desc2obj["all"] = [("all", "NOUN", "LOC")]
        env.set_state(state)
        return desc2obj


_LISTERS: "weakref.WeakKeyDictionary[jericho.FrotzEnv, CandidateLister]" = weakref.WeakKeyDictionary()


def candidate_actions(env: jericho.FrotzEnv, state: Any) -> list[str]:
    """Jericho's candidate commands for `state`, from this env's `CandidateLister`."""
    lister = _LISTERS.get(env)
    if lister is None:
        lister = _LISTERS[env] = CandidateLister(env)
    return lister(state)


def filter_candidates(env: jericho.FrotzEnv, state: Any, candidates: list[str]) -> Diffs:
    """Play each candidate from `state` and group those that change the world by their change."""
    env.set_state(state)
    return dict(env._filter_candidate_actions(candidates, use_ctypes=True, use_parallel=False))


def ranked(diffs: Diffs, share: Sequence[str], part: int, parts: int) -> Ranked:
    """`diffs` of the commands `share` = candidates[part::parts], each paired with its candidate position.

    The world changes become bytes: Jericho's keys are tuples of 128 numpy scalars, slow to send between
    processes.
    """
    position: dict[str, int] = {}
    for i, action in enumerate(share):
        position.setdefault(action, part + i * parts)
    return {np.asarray(diff, dtype=np.uint16).tobytes(): [(position[a], a) for a in actions]
            for diff, actions in diffs.items()}


def pick_actions(parts: Sequence[Ranked]) -> list[str]:
    """One command per world change, as `FrotzEnv.get_valid_actions` does, ties broken by candidate order.

    The parts may hold interleaved slices of the candidates; the positions restore Jericho's sequential order.
    """
    merged: dict[bytes, list[tuple[int, str]]] = defaultdict(list)
    for part in parts:
        for diff, actions in part.items():
            merged[diff].extend(actions)
    groups = sorted(merged.values(), key=min)  # world changes in the order a sequential pass first meets them
    return [max((a for _, a in sorted(group)), key=verb_usage_count) for group in groups]


def compute_valid_actions(env: jericho.FrotzEnv, state: Any) -> list[str]:
    """Valid actions for `state` in this process: `get_valid_actions`, with the order made deterministic."""
    candidates = candidate_actions(env, state)
    return pick_actions([ranked(filter_candidates(env, state, candidates), candidates, 0, 1)])


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
    """Worker loop: answer (state, share, part, parts, share_list) until the parent sends None or goes away.

    With `share` None the worker lists the state's candidates itself and, with `share_list`, first sends
    ("candidates", list) so the parent can hand the other shares out. Either way it then sends ("ok", ranked)
    for `filter_fn` over its share, every `parts`-th candidate from `part` on: Jericho groups candidates by
    template, whose costs differ a lot, so interleaved shares take about equally long where chunks do not.
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
            state, share, part, parts, share_list = job
            if share is None:
                candidates = candidate_actions(env, state)
                if share_list:
                    conn.send(("candidates", candidates))
                share = candidates[part::parts]
            conn.send(("ok", ranked(filter_fn(env, state, share), share, part, parts)))
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
        self.hits = self.misses = 0
        self.compute_s = 0.0

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def wait_ready(self) -> None:
        """Block until every worker has loaded the game (otherwise the first batch waits for them)."""
        for worker in self._workers:
            worker.wait_ready()

    def stats(self, reset: bool = True) -> tuple[int, int, float]:
        """(cache hits, states computed, seconds `batch` spent on them) since the last reset.

        The seconds leave out the caller's own work inside a request generator (an `EnvPool` stepping its envs).
        """
        out = (self.hits, self.misses, self.compute_s)
        if reset:
            self.hits = self.misses = 0
            self.compute_s = 0.0
        return out

    def get(self, state_hash: str, state: Any) -> Optional[list[str]]:
        return self.batch([(state_hash, state)])[0]

    def batch(self, requests: Iterable[Request]) -> list[Optional[list[str]]]:
        """Valid actions per request, in order; None where the computation timed out or failed.

        `requests` may be a generator: it is drawn one request at a time, and each new state goes to the
        workers as soon as it is drawn, so they start on it while the caller makes the next request
        (`EnvPool` steps its envs inside the generator).
        """
        keys: list[str] = []
        todo: dict[str, Any] = {}
        drawing_s = 0.0  # time spent in the caller's generator, not computing

        def new_states() -> Iterator[tuple[str, Any]]:
            nonlocal drawing_s
            source = iter(requests)
            while True:
                t0 = time.perf_counter()
                request = next(source, None)
                drawing_s += time.perf_counter() - t0
                if request is None:
                    return
                state_hash, state = request
                keys.append(state_hash)
                if state_hash not in todo and self.cache.get(state_hash) is None:
                    todo[state_hash] = state
                    yield state_hash, state

        t0 = time.perf_counter()
        computed = self._compute(new_states())
        self.compute_s += time.perf_counter() - t0 - drawing_s
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        results: list[Optional[list[str]]] = []
        for state_hash in keys:
            actions = self.cache.get(state_hash)
            if actions is None and computed.get(state_hash) is not None:
                actions = computed[state_hash]
                self.cache.put(state_hash, actions)
            results.append(list(actions) if actions is not None else None)
        return results

    def _compute(self, new_states: Iterator[tuple[str, Any]]) -> dict[str, Optional[list[str]]]:
        if self._local is not None:
            return {key: compute_valid_actions(self._local, state) for key, state in new_states}
        parts = len(self._workers)
        answers = self._run(new_states)
        results: dict[str, Optional[list[str]]] = {}
        for key in {key for key, _ in answers}:  # every drawn state has an answer, None where it failed
            shares = [answers.get((key, i)) for i in range(parts)]
            results[key] = None if None in shares else pick_actions(shares)  # type: ignore[arg-type]
        return results

    def _run(self, new_states: Iterator[tuple[str, Any]]) -> dict[tuple[str, int], Optional[Ranked]]:
        """Compute the drawn states on the workers: {(key, part): ranked share}, None where a share failed.

        Jobs are (key, state, share, part, share_list). A state drawn while every worker is free goes
        to all of them, each listing its candidates itself (the others would wait idle for one worker's list).
        Otherwise one worker lists it and shares the list; the state's other shares then go to the front of
        the queue, so the next idle worker takes one and a state is finished before the next is started.
        """
        parts = len(self._workers)
        jobs: deque = deque()
        idle = deque(self._workers)
        busy: dict[Connection, tuple[_Worker, tuple, float]] = {}
        out: dict[tuple[str, int], Optional[Ranked]] = {}
        drawing = True
        try:
            while drawing or jobs or busy:
                while jobs and idle:
                    worker = idle.popleft()
                    worker.wait_ready()
                    job = jobs.popleft()
                    key, state, share, part, share_list = job
                    worker.conn.send((state, share, part, parts, share_list))
                    busy[worker.conn] = (worker, job, time.monotonic() + self.timeout_s)
                if drawing:
                    drawn = next(new_states, None)
                    if drawn is None:
                        drawing = False
                    else:
                        key, state = drawn
                        if len(idle) == parts and not jobs:
                            jobs.extend((key, state, None, p, False) for p in range(parts))
                        else:
                            jobs.append((key, state, None, 0, parts > 1))
                    timeout = 0.0  # keep drawing; only take the answers already there
                elif busy:
                    timeout = max(0.0, min(deadline for _, _, deadline in busy.values()) - time.monotonic())
                else:
                    continue
                for conn in wait(list(busy), timeout=timeout) if busy else []:
                    worker, job, deadline = busy.pop(conn)  # type: ignore[index]
                    key, state, _, part, _ = job
                    try:
                        status, value = conn.recv()  # type: ignore[union-attr]
                    except (EOFError, OSError):
                        status, value = "error", "worker exited"
                    if status == "candidates":
                        others = reversed(range(1, parts))
                        jobs.extendleft((key, state, value[p::parts], p, False) for p in others)
                        busy[conn] = (worker, job, deadline)  # still testing its own share
                    elif status == "ok":
                        out[(key, part)] = value
                        idle.append(worker)
                    else:
                        log.warning("valid actions failed for state %s: %s; restarting the worker", key, value)
                        out[(key, part)] = None
                        idle.append(self._replace(worker))
                now = time.monotonic()
                for conn, (worker, job, deadline) in list(busy.items()):
                    if now >= deadline:
                        log.warning("valid actions for state %s took over %.1f s; killing worker %s",
                                    job[0], self.timeout_s, worker.process.pid)
                        del busy[conn]
                        out[(job[0], job[3])] = None
                        idle.append(self._replace(worker))
        except BaseException:
            # The caller's generator raised, or the stage was interrupted: a busy worker's answer would be read
            # as the answer to a later job, so those workers are replaced before the error goes on.
            for worker, _, _ in list(busy.values()):
                self._replace(worker)
            raise
        return out

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop(kill=True)
        fresh = _Worker(self._ctx, self.rom)
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        """Stop the workers (also done at interpreter exit)."""
        self._finalizer()
