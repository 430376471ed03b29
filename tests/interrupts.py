"""How tests send Ctrl-C to a child process as a terminal would."""

import signal


def ctrl_c_as_in_a_terminal() -> None:
    """preexec_fn: a shell that runs the suite in the background starts it with SIGINT ignored, its children inherit
    that and Python then never raises KeyboardInterrupt; Ctrl-C in a terminal reaches a job whose SIGINT is default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
