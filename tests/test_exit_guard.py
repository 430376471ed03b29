"""The test process's exit: native teardown after Python's cannot turn a passing run into a crash (exit_guard)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# A test that leaves what CI's exit-time SIGSEGV looked like: a native exit handler that crashes once Python has
# finished (it calls address 8), plus a Python exit handler whose file must still be written.
CRASH_AT_EXIT = textwrap.dedent("""
    import atexit
    import ctypes
    from pathlib import Path

    def test_leaves_a_native_crash_for_process_exit(tmp_path_factory):
        ctypes.CDLL(None).on_exit(ctypes.c_void_p(8), None)
        atexit.register(Path(__file__).with_name("python-exit-handler-ran").touch)

    def test_outcome():
        assert OUTCOME
""")


def run_pytest(where: Path, guarded: bool, outcome: bool) -> subprocess.CompletedProcess:
    (where / "conftest.py").write_text("from exit_guard import pytest_sessionstart\n" if guarded else "")
    (where / "test_crash_at_exit.py").write_text(CRASH_AT_EXIT.replace("OUTCOME", str(outcome)))
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(where)], cwd=where,
                          env=env, capture_output=True, text=True, timeout=120)


def test_without_the_guard_the_native_crash_fails_a_passing_run(tmp_path):
    """The crash this guards against is real: a run whose tests all pass exits with SIGSEGV."""
    done = run_pytest(tmp_path, guarded=False, outcome=True)
    assert "2 passed" in done.stdout and done.returncode == -11, (done.returncode, done.stdout[-500:])


@pytest.mark.parametrize("outcome, status", [(True, 0), (False, 1)])
def test_the_guard_exits_with_pytests_status_after_pythons_exit_handlers(tmp_path, outcome, status):
    done = run_pytest(tmp_path, guarded=True, outcome=outcome)
    assert done.returncode == status, (done.returncode, done.stdout[-500:], done.stderr[-500:])
    assert ("2 passed" if outcome else "1 failed, 1 passed") in done.stdout
    assert (tmp_path / "python-exit-handler-ran").exists()
