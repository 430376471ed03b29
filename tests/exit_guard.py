"""The test process ends with os._exit once Python's own exit work is done, so native teardown cannot fail the run.

CI's test process has twice died of SIGSEGV (exit 139) after every test had passed and the summary was printed,
with a fault handler enabled through interpreter exit (conftest) that printed nothing: the crash came after
Python's finalization, in native teardown (libc exit handlers, C++ static destructors) racing native threads that
the session's libraries leave behind. Ray, which the tests start and shut down many times in this one process, is
known to leave such threads (ray-project/ray#31145). None of that teardown is this project's code, and none of it
writes anything a test checks.

`_end` is registered when conftest imports this module, before any library the tests import registers its own
exit handler; exit handlers run last-registered first, so Ray's, Prefect's, MLflow's, multiprocessing's and the
tests' own handlers have all run by the time it runs (and non-daemon threads have been joined before any of them).
It then shuts logging down (logging registered its handler before this module's), flushes stdout and stderr, and
ends the process with pytest's exit status, skipping only the native teardown after Python's.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Any, Optional

_session: Optional[Any] = None


def pytest_sessionstart(session: Any) -> None:
    global _session
    _session = session


def _end() -> None:
    if _session is None:  # pytest never started a session (a usage error): exit as Python normally does
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(int(_session.exitstatus))


atexit.register(_end)
