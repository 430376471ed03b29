"""Atomic, verifiable checkpoints: a directory per iteration, written aside, hashed, then renamed into place."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import faults
from .errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def gzip_text(path: Path, level: int = 1) -> Iterator[io.TextIOWrapper]:
    """Write gzipped text that depends on the text alone: no file name or time in the gzip header, so one run
    and its deterministic twin write byte-identical files."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=level, mtime=0) as gz:
        with io.TextIOWrapper(gz, encoding="utf-8") as text:
            yield text


def checkpoint_name(iteration: int) -> str:
    return f"iter-{iteration:06d}"


def checkpoint_iteration(path: Path) -> int:
    """The iteration of the checkpoint at `path` (its name, `checkpoint_name`)."""
    return int(Path(path).name[5:])


def json_path(path: Path, name: str) -> Path:
    """Where the JSON entry `name` of the checkpoint (or exported agent) at `path` lies, gzipped."""
    return Path(path) / f"{name}.json.gz"


class CheckpointWriter:
    """Collects the parts of one checkpoint in a temporary directory; `commit` makes it visible at once."""

    def __init__(self, root: Path, iteration: int):
        self.root = Path(root)
        self.iteration = iteration
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / f".tmp-{checkpoint_name(iteration)}-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()

    def tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(self.tmp / f"{name}.safetensors"))

    def torch_state(self, name: str, state: Any) -> None:
        """Optimizer/scheduler states and RNG tensors: plain containers of tensors, loaded with weights_only."""
        torch.save(state, self.tmp / f"{name}.pt")

    def json(self, name: str, data: Any) -> None:
        """A JSON-safe structure, gzipped."""
        with gzip_text(json_path(self.tmp, name)) as fh:
            json.dump(data, fh, separators=(",", ":"))

    def directory(self, name: str, write: Callable[[Path], None]) -> None:
        target = self.tmp / name
        target.mkdir()
        write(target)

    def commit(self, meta: dict[str, Any]) -> Path:
        faults.inject("checkpoint-write", self.iteration)  # test hook: die with the parts written, no manifest
        files = sorted(p for p in self.tmp.rglob("*") if p.is_file())
        for p in files:
            fsync_path(p)
        manifest = {
            "format": FORMAT_VERSION,
            "iteration": self.iteration,
            "created": time.time(),
            "meta": meta,
            "files": {str(p.relative_to(self.tmp)): _sha256(p) for p in files},
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        fsync_path(self.tmp / MANIFEST)
        final = self.root / checkpoint_name(self.iteration)
        if final.exists():
            _set_aside(final, "replaced")
        os.replace(self.tmp, final)
        fsync_path(self.root)
        return final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _set_aside(path: Path, why: str) -> Path:
    """Move a checkpoint out of the way without deleting it; saved data is never overwritten."""
    aside = path.with_name(f"{path.name}.{why}-{int(time.time())}")
    os.replace(path, aside)
    log.warning("moved checkpoint %s aside to %s (%s)", path, aside.name, why)
    return aside


def verify(path: Path) -> dict[str, Any]:
    """The manifest of a complete, uncorrupted checkpoint; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MANIFEST}); it was interrupted while being written") from None
    except (ValueError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt ({MANIFEST} unreadable: {err})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')}, this version reads {FORMAT_VERSION}")
    for rel, digest in manifest.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} does not match its hash")
    return manifest


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter-") and p.name[5:].isdigit())


def latest_valid(root: Path) -> Optional[tuple[Path, dict[str, Any]]]:
    """Newest checkpoint that verifies; broken newer ones are reported and left in place."""
    for path in reversed(list_checkpoints(root)):
        try:
            return path, verify(path)
        except CheckpointError as err:
            log.warning("skipping %s", err)
    return None


def set_aside_newer(root: Path, iteration: int) -> None:
    """Before resuming from `iteration`, move broken checkpoints beyond it aside so new ones never clash."""
    for path in list_checkpoints(root):
        if checkpoint_iteration(path) > iteration:
            _set_aside(path, "unverified")


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` valid checkpoints; interrupted temp dirs of dead processes go too."""
    valid = [p for p in list_checkpoints(root) if (p / MANIFEST).is_file()]
    for old in valid[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in Path(root).glob(".tmp-iter-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(Path(path) / f"{name}.safetensors"))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {path}: {name}.safetensors unreadable ({err})") from None


def load_torch_state(path: Path, name: str) -> Any:
    try:
        return torch.load(Path(path) / f"{name}.pt", weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises many types for bad files
        raise CheckpointError(f"checkpoint {path}: {name}.pt unreadable ({type(err).__name__})") from None


def load_json(path: Path, name: str) -> Any:
    file = json_path(path, name)
    try:
        with gzip.open(file, "rt") as fh:
            return json.load(fh)
    except (OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: {file.name} unreadable ({type(err).__name__})") from None
