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


class HubNotSupportedError(SlerpPluginError):
    """A Hub id was given where only local folders are supported."""

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
