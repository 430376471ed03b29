"""Local Prefect and MLflow servers on 127.0.0.1, started and stopped by tests, benchmarks and the screenshot script."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from priorzero_core.errors import PriorZeroError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _venv_bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def check_port_free(port: int) -> None:
    with socket.socket() as sock:
        # As the servers themselves bind: connections of a server that just stopped (TIME_WAIT) do not
        # count, a listening socket does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise PriorZeroError(f"port {port} on 127.0.0.1 is in use; stop what listens there or pick another port") from None


@contextmanager
def _server(cmd: list[str], health_url: str, log: Path, env: dict[str, str], timeout: float) -> Iterator[None]:
    check_port_free(urllib.parse.urlsplit(health_url).port)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(health_url, timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{health_url} not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def prefect_server(home: Path, port: Optional[int] = None, timeout: float = 90) -> Iterator[str]:
    """`prefect server start` with its own PREFECT_HOME (≈8 s to healthy); yields the API URL."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/api"
    # The UI asks the server where its API is, and would say :4200 whatever port this one listens on.
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": url}
    env.pop("PREFECT_API_URL", None)
    cmd = [_venv_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with _server(cmd, f"{url}/health", Path(home) / "server.log", env, timeout):
        yield url


@contextmanager
def mlflow_ui(tracking_uri: str, log: Path, port: Optional[int] = None, timeout: float = 90,
              host_alias: Optional[str] = None) -> Iterator[str]:
    """`mlflow ui` on one worker without the job runner (≈0.5 GB instead of ≈3 GB); yields its URL.

    host_alias: another name for 127.0.0.1 that the server accepts in Host headers.
    """
    port = port or free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [_venv_bin("mlflow"), "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    if host_alias:
        cmd += ["--allowed-hosts", f"127.0.0.1:{port},{host_alias}:{port}",
                "--cors-allowed-origins", f"http://{host_alias}:{port}"]
    url = f"http://127.0.0.1:{port}"
    with _server(cmd, f"{url}/health", log, env, timeout):
        yield url
