"""Prefect's temporary (ephemeral) API server dies with the process that started it.

Prefect starts it as a plain child process and stops it from an `atexit` hook, which never runs when that
process is killed with -9: the server (uvicorn, ≈ 250 MB, a port) was then re-parented to init and lived on, and
the resumed run started another. `watch_temporary_servers()` makes every temporary server Prefect starts from
now on get a watchdog: a small child of the same process that polls its parent and, once the parent is gone,
stops the server (SIGTERM, then SIGKILL after 5 s) and exits. A server that stops on its own ends its watchdog.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

# Run with `python -c WATCHDOG <parent pid> <server pid>`. The server is killed only if its command line is
# still the one Prefect gave it (a pid reused by an unrelated process is left alone).
WATCHDOG = """
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])

def ours():
    try:
        with open(f"/proc/{server}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{server}/stat", "rb") as f:
            zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return False
    return not zombie and b"prefect.server.api.server" in cmdline

while os.getppid() == parent and ours():
    time.sleep(0.5)
if os.getppid() != parent and ours():
    os.kill(server, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while ours() and time.monotonic() < deadline:
        time.sleep(0.1)
    if ours():
        os.kill(server, signal.SIGKILL)
"""


def watch(server_pid: int) -> subprocess.Popen[Any]:
    """Start the watchdog of one server process (a child of this process)."""
    import os

    return subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(server_pid)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def watch_temporary_servers() -> None:
    """From now on, each temporary server Prefect launches in this process gets a watchdog (Linux: reads /proc)."""
    if not sys.platform.startswith("linux"):
        return
    from prefect.server.api.server import SubprocessASGIServer

    launch = SubprocessASGIServer._run_uvicorn_command
    if getattr(launch, "watched", False):
        return

    def launch_watched(self: SubprocessASGIServer) -> subprocess.Popen[Any]:
        process = launch(self)
        watch(process.pid)
        return process

    launch_watched.watched = True  # type: ignore[attr-defined]
    SubprocessASGIServer._run_uvicorn_command = launch_watched  # type: ignore[method-assign]
