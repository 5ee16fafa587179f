"""User-facing errors.

Every problem caused by the user's input (a bad value, a missing model, malformed data) raises
`DsparkError` with a one-line message that names the bad value and what is allowed. The CLI prints
the message and exits non-zero, never a traceback.
"""


class DsparkError(Exception):
    """A one-line, user-facing error: the CLI prints `error: <message>` and exits with code 2."""

    exit_code = 2


class ModelNotAvailableError(DsparkError):
    """A model is neither a local folder, a built-in model, nor in the local Hugging Face cache."""


class DataError(DsparkError):
    """Task data is empty, malformed, or missing."""


class IncompatibleTokenizersError(DsparkError):
    """Target and draft do not share a tokenizer where the operation needs one."""
