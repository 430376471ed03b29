"""User-facing errors: one line that says what is wrong and what to do about it."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): what a one-line report quotes."""
    text = str(err)
    return text.splitlines()[0] if text.strip() else ""


class PriorZeroError(Exception):
    """An error caused by user input (config, files, games); printed as one line, no traceback."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(PriorZeroError):
    """The configuration is invalid."""


class GameError(PriorZeroError):
    """A game or ROM cannot be used."""


class ModelError(PriorZeroError):
    """A model path or file cannot be used."""


class CheckpointError(PriorZeroError):
    """A checkpoint is missing, corrupt or belongs to another configuration."""


class BackendUnavailable(PriorZeroError):
    """A required optional backend (vLLM, DeepSpeed, CUDA) could not be started."""


class StageStopped(BaseException):
    """Raised inside a training stage that is running while its trainer closes (Ctrl-C, SIGTERM): the stage
    unwinds before the envs and workers it uses are shut down. A BaseException, as KeyboardInterrupt is, so no
    `except Exception` on the way swallows it."""
