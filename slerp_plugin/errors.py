"""Typed errors of slerp_plugin, and the exit codes of ``slerp-merge``.

Every error a user can cause derives from :class:`SlerpPluginError`. Its message is one line that
says what is wrong and, where there is one, what to do; its attributes say where (``path``,
``repo_id``, ``revision``, ``tensor``; None where they do not apply). The error that caused it is
kept as ``__cause__``. The CLI prints the message and exits with :attr:`~SlerpPluginError.exit_code`;
:data:`EXIT_CODES` is the table its help and the README show.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

#: exit status of ``slerp-merge`` → what it means
EXIT_CODES: dict[int, str] = {
    0: "success (validate: the gate passed)",
    1: "an unexpected error (run with SLERP_DEBUG=1 for a traceback)",
    2: "invalid configuration, option or argument; a model reference that names nothing",
    3: "an input checkpoint is missing, corrupt, truncated, or does not match the other model",
    4: "the output exists, overlaps an input, or another merge holds its lock",
    5: "writing the output failed (disk full, read-only, permission denied)",
    6: "validate or a streaming merge: the merged model failed the validation gate (nothing published)",
    7: "a Hugging Face Hub error (network, unknown repo or revision, authorisation)",
    8: "validate: the merged model or a parent cannot be read",
    130: "interrupted (re-run the same command to resume)",
}


_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")


def redact_secrets(text: str) -> str:
    """``text`` with anything shaped like a Hugging Face token replaced by ``hf_***``."""
    return _HF_TOKEN.sub("hf_***", text)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(e)
    return text.splitlines()[0] if text.strip() else type(e).__name__


def exit_code_table() -> str:
    """:data:`EXIT_CODES` as aligned text lines (for ``--help``)."""
    return "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items())


class SlerpPluginError(Exception):
    """Base class of the errors a user can cause.

    Args:
        message: one line for the user.
        path: the file or folder concerned.
        repo_id: the Hub repo concerned.
        revision: the Hub revision concerned.
        tensor: the tensor concerned.
    """

    exit_code: ClassVar[int] = 1

    def __init__(
        self,
        message: str,
        *,
        path: Path | str | None = None,
        repo_id: str | None = None,
        revision: str | None = None,
        tensor: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = Path(path) if path is not None else None
        self.repo_id = repo_id
        self.revision = revision
        self.tensor = tensor

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # keeps the attributes across pickling (Airflow hands errors between processes)
        return _rebuild, (type(self), self.message, self.__dict__)

    def with_context(self, prefix: str) -> SlerpPluginError:
        """A copy of this error whose message starts with ``prefix: ``, attributes kept (raise it
        ``from`` this one to keep the chain)."""
        message = f"{prefix}: {self.message}"
        return _rebuild(type(self), message, {**self.__dict__, "message": message})


def _rebuild(cls: type[SlerpPluginError], message: str, state: dict[str, Any]) -> SlerpPluginError:
    error = cls(message)
    error.__dict__.update(state)
    return error


class ClusterError(SlerpPluginError):
    """The local Airflow cluster (``make cluster``) could not start or stop; ``path`` is its home."""


class ConfigError(SlerpPluginError, ValueError):
    """The merge configuration or a command's arguments are invalid."""

    exit_code = 2


class ModelNotFoundError(SlerpPluginError, FileNotFoundError):
    """A model or tokenizer reference names no local folder and is not a usable Hub id."""

    exit_code = 2


class CheckpointError(SlerpPluginError):
    """A checkpoint is missing, corrupt, truncated or inconsistent with its index."""

    exit_code = 3


class KeyMismatchError(SlerpPluginError):
    """The two models' state dicts do not hold the same tensor names."""

    exit_code = 3


class ShapeMismatchError(SlerpPluginError):
    """Two tensors of the same name have different shapes (and the spec says this is an error)."""

    exit_code = 3


class OutputExistsError(SlerpPluginError, FileExistsError):
    """The destination holds something the merge did not make, or overlaps an input."""

    exit_code = 4


class OutputLockedError(OutputExistsError):
    """Another process is merging into the same output (it holds the output's lock)."""


class OutputWriteError(SlerpPluginError, OSError):
    """Writing the merged model failed (disk full, read-only, permission denied, ...)."""

    exit_code = 5


class ValidationGateError(SlerpPluginError):
    """The merged model failed validation (permanent: retrying does not change the verdict)."""

    exit_code = 6


class ValidationInputError(SlerpPluginError):
    """Validation cannot run: the merged model or a parent is missing or unreadable."""

    exit_code = 8


class HubError(SlerpPluginError):
    """A Hugging Face Hub operation failed. ``transient`` says whether retrying can help."""

    exit_code = 7
    transient: ClassVar[bool] = False


class HubUnavailableError(HubError):
    """Network down, timeout, or a Hub 5xx/429: worth retrying."""

    transient = True


class HubIntegrityError(HubError):
    """A downloaded file does not match the size/hash the Hub reports (it was removed): retry."""

    transient = True


class RepoNotFoundError(HubError):
    """The repo does not exist (or is private and no valid token was given)."""


class RevisionNotFoundError(HubError):
    """The branch, tag or commit does not exist in the repo."""


class HubAuthError(HubError):
    """Not authorised: missing/invalid token, no write access, or a gated repo not accepted."""


class DiskFullError(HubError):
    """No space left on the device holding the Hub cache or the output."""


#: errors worth retrying: the same call can succeed later
TRANSIENT_ERRORS: tuple[type[SlerpPluginError], ...] = (HubUnavailableError, HubIntegrityError)
