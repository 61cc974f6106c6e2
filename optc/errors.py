"""The errors optc raises on purpose, each with the exit code the CLI maps it to.

Exit codes (the CLI contract): 0 ok, 1 the work failed (compile, verification,
benchmark), 2 bad usage or bad input, 3 no configuration meets the constraints.
"""


class OptcError(Exception):
    """Base class: a message meant for the user, and the CLI exit code."""

    exit_code = 1


class UsageError(OptcError):
    """Bad usage or bad input: an unknown model, pass or key, a value out of range,
    a file that is not a valid artifact. Exit code 2."""

    exit_code = 2


class ArtifactError(UsageError):
    """An .optc file that is truncated, tampered with or built by other versions."""


class CaptureError(UsageError):
    """torch.export could not capture the model; the message summarises why."""


class CompileError(OptcError):
    """A pass, lowering or verification failed. Exit code 1."""

    exit_code = 1


class InternalError(CompileError):
    """A pass raised an exception it did not mean to: a bug in optc, not a property of
    the model or the settings. Exit code 1; the message names the pass and the error."""


class NoConfigError(OptcError):
    """No configuration meets the user's constraints. Exit code 3."""

    exit_code = 3
