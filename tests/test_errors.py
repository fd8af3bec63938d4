"""Errors: one-line messages with attributes, causes kept, exit codes from one table."""

from __future__ import annotations

import pickle
import re

import pytest
from model_helpers import ROOT

from slerp_plugin import errors
from slerp_plugin.errors import (
    EXIT_CODES,
    CheckpointError,
    ConfigError,
    HubUnavailableError,
    OutputExistsError,
    OutputWriteError,
    RepoNotFoundError,
    SlerpPluginError,
    exit_code_table,
)


def error_classes() -> list[type[SlerpPluginError]]:
    return [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, SlerpPluginError)]


def test_every_error_has_an_exit_code_from_the_table():
    for cls in error_classes():
        assert cls.exit_code in EXIT_CODES, cls


def test_attributes_message_and_cause():
    cause = OSError(28, "No space left on device")
    try:
        try:
            raise cause
        except OSError as e:
            raise OutputWriteError("/out/x.tmp: write failed", path="/out/x.tmp", tensor="w") from e
    except OutputWriteError as err:
        assert str(err) == "/out/x.tmp: write failed" and err.message == str(err)
        assert err.path.name == "x.tmp" and err.tensor == "w" and err.repo_id is None
        assert err.__cause__ is cause
        assert isinstance(err, OSError) and err.exit_code == 5


def test_with_context_prefixes_and_keeps_attributes():
    err = RepoNotFoundError("org/x@main: repository not found", repo_id="org/x", revision="main")
    wrapped = err.with_context("model_1")
    assert type(wrapped) is RepoNotFoundError and str(wrapped) == "model_1: org/x@main: repository not found"
    assert (wrapped.repo_id, wrapped.revision) == ("org/x", "main")
    assert not wrapped.transient and HubUnavailableError("x").transient


@pytest.mark.parametrize("cls", [ConfigError, CheckpointError, OutputExistsError, OutputWriteError,
                                 HubUnavailableError])
def test_errors_survive_pickling_with_their_attributes(cls):
    err = cls("something is wrong", path="/a/b", repo_id="org/x", tensor="t")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == "something is wrong"
    assert (back.path, back.repo_id, back.tensor) == (err.path, "org/x", "t")


def test_the_readme_the_guide_and_the_help_show_the_same_exit_codes():
    for page in (ROOT / "README.md", ROOT / "docs" / "troubleshooting.md"):
        table = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", page.read_text(), re.M))
        assert {int(k): v for k, v in table.items()} == EXIT_CODES, page
    assert all(f"{code:>3}  {meaning}" in exit_code_table() for code, meaning in EXIT_CODES.items())
