"""Model references → local folders: a local folder as is, a Hub id downloaded (pinned, verified)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import HubError, ModelNotFoundError
from .spec import ModelRef


@dataclass
class ResolvedModel:
    """A model ready to read: its folder, the Hub commit it came from (None for local folders),
    and SHA-256 of files the Hub already vouched for."""

    path: Path
    commit: str | None = None
    hashes: dict[Path, str] = field(default_factory=dict)


def looks_like_hub_id(ref: str) -> bool:
    """True for ``org/name`` strings that are not an existing or explicitly local path."""
    from .hub import is_hub_id

    return is_hub_id(ref) and not ref.startswith((".", "/", "~"))


def resolve_model(
    model: ModelRef, role: str, *, allow_bin: bool = False, weights: bool = True, tokenizer: bool = True
) -> ResolvedModel:
    """The local folder of ``model``, downloading Hub ids; ``role`` (e.g. ``"model_1"``) names it in errors.

    Raises:
        ModelNotFoundError: neither a local folder nor a Hub id.
        HubError: the download failed (see :mod:`slerp_plugin.hub`).
    """
    path = Path(model.ref).expanduser()
    if path.is_dir() and model.revision is None:
        return ResolvedModel(path.resolve())
    if path.exists() and not path.is_dir():
        raise ModelNotFoundError(f"{role}: {model.ref} is a file, expected a model folder")
    if looks_like_hub_id(model.ref):
        from .hub import download_model

        try:
            d = download_model(model.ref, model.revision, allow_bin=allow_bin, weights=weights, tokenizer=tokenizer)
        except HubError as e:
            raise type(e)(f"{role}: {e}") from None
        return ResolvedModel(d.path, d.commit, d.hashes())
    raise ModelNotFoundError(f"{role}: model folder not found: {model.ref}")
