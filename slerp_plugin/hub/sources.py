"""Model references → local folders: a local folder as it is, a Hub id downloaded (pinned, verified)."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import HubError, ModelNotFoundError
from ..io.model_files import ResolvedModel, local_model
from ..spec import MergeSpec, ModelRef
from .client import download_model, is_hub_id


def looks_like_hub_id(ref: str) -> bool:
    """True for ``org/name`` strings that are not an existing or explicitly local path."""
    return is_hub_id(ref) and not ref.startswith((".", "/", "~"))


def resolve_model(
    model: ModelRef, role: str, *, allow_bin: bool = False, weights: bool = True, tokenizer: bool = True
) -> ResolvedModel:
    """The local folder of ``model``, downloading Hub ids; ``role`` (e.g. ``"model_1"``) names it
    in errors. ``weights``/``tokenizer`` say which files a download needs.

    Raises:
        ModelNotFoundError: neither a local folder nor a Hub id.
        HubError: the download failed (see :mod:`slerp_plugin.hub.client`).
    """
    try:
        return local_model(model, role)
    except ModelNotFoundError:
        if not looks_like_hub_id(model.ref):
            raise
    try:
        d = download_model(model.ref, model.revision, allow_bin=allow_bin, weights=weights,
                           tokenizer=tokenizer)
    except HubError as e:
        raise e.with_context(role) from e
    return ResolvedModel(d.path, d.commit, d.hashes())


def resolve_inputs(
    spec: MergeSpec, given: Mapping[str, ResolvedModel] | None = None
) -> dict[str, ResolvedModel]:
    """Every input of ``spec`` by role (``model_1``, ``model_2``, ``tokenizer``): those in
    ``given`` as they are, the others resolved (Hub ids downloaded).

    Raises:
        ModelNotFoundError, HubError: as :func:`resolve_model`.
    """
    inputs = dict(given or {})
    for role, ref, name in (("model_1", spec.model_1, spec.model_names[0]),
                            ("model_2", spec.model_2, spec.model_names[1])):
        if role not in inputs:
            inputs[role] = resolve_model(ref, name, allow_bin=spec.allow_bin)
    if "tokenizer" not in inputs:
        inputs["tokenizer"] = (
            inputs["model_1"] if spec.tokenizer_ref == spec.model_1
            else resolve_model(spec.tokenizer_ref, "tokenizer", weights=False)
        )
    return inputs
