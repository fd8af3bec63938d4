"""Model references → local folders.

Only local folders are supported for now; a Hub id is recognised and refused with a clear error.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import HubNotSupportedError, ModelNotFoundError
from .spec import ModelRef

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


def looks_like_hub_id(ref: str) -> bool:
    """True for ``org/name`` strings that are not an existing or explicitly local path."""
    return bool(_HUB_ID.fullmatch(ref)) and not ref.startswith((".", "/", "~"))


def resolve_local(model: ModelRef, role: str) -> Path:
    """The local folder of ``model``; ``role`` (e.g. ``"model_1"``) names it in errors.

    Raises:
        ModelNotFoundError: no such folder.
        HubNotSupportedError: the reference is a Hub id.
    """
    path = Path(model.ref).expanduser()
    if path.is_dir() and model.revision is None:
        return path.resolve()
    if path.exists() and not path.is_dir():
        raise ModelNotFoundError(f"{role}: {model.ref} is a file, expected a model folder")
    if looks_like_hub_id(model.ref):
        raise HubNotSupportedError(
            f"{role}: {model} looks like a Hugging Face Hub id; Hub downloads are not supported "
            "yet: download it (e.g. `hf download`) and pass the local folder"
        )
    raise ModelNotFoundError(f"{role}: model folder not found: {model.ref}")
