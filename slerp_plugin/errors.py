"""Typed errors of slerp_plugin.

Every error a user can cause derives from :class:`SlerpPluginError`; its message is one line that
says what is wrong and, where there is one, what to do. The CLI prints it and exits with
:attr:`SlerpPluginError.exit_code`.
"""

from __future__ import annotations


class SlerpPluginError(Exception):
    """Base class of the errors a user can cause. ``exit_code`` is the CLI's exit status."""

    exit_code: int = 1


class ConfigError(SlerpPluginError, ValueError):
    """The merge configuration is invalid (bad value, unknown key, disallowed ``_target_``)."""

    exit_code = 2


class ModelNotFoundError(SlerpPluginError, FileNotFoundError):
    """A model or tokenizer reference names no local folder (and is not a usable Hub id)."""

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
    """The destination already holds something that the merge would replace."""

    exit_code = 4


class OutputWriteError(SlerpPluginError, OSError):
    """Writing the merged model failed (disk full, permission denied, ...)."""

    exit_code = 5


class HubError(SlerpPluginError):
    """A Hugging Face Hub operation failed. ``transient`` says whether retrying can help."""

    exit_code = 7
    transient: bool = False


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


TRANSIENT_ERRORS = (HubUnavailableError, HubIntegrityError)
