"""User-facing error types.

Every error a user can cause (bad config, bad files, bad output directory)
is a :class:`SuperswallowError`. The CLI prints ``str(err)`` on one line and
exits non-zero; anything else is a bug and keeps its traceback.
"""


class SuperswallowError(Exception):
    """Base class for errors caused by user input. ``str()`` is one line."""

    exit_code = 2


class ConfigError(SuperswallowError):
    """The merge config is invalid. The message names the file and key."""


class SafetensorsError(SuperswallowError):
    """A safetensors file (or index) is malformed. The message names the file."""


class ModelError(SuperswallowError):
    """A model folder is missing, incomplete or inconsistent with the config."""


class PlanError(SuperswallowError):
    """The config cannot be applied to these models (shapes, missing tensors)."""


class TokenizerError(SuperswallowError):
    """Tokenizer files are missing or unsupported."""


class OutputError(SuperswallowError):
    """The output directory cannot be written safely."""


class VerifyError(SuperswallowError):
    """A verification found a mismatch."""

    exit_code = 1


def short(value: object, n: int = 80) -> str:
    """``repr(value)`` cut to about ``n`` characters, for error messages that name a user's value
    (a 100 MB value must not become a 100 MB line)."""
    if isinstance(value, str) and len(value) > 4 * n:
        value = value[: 4 * n]  # repr of a huge string would itself be huge
    r = repr(value)
    return r if len(r) <= n else f"{r[: n - 3]}..."
