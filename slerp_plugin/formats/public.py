"""What a merge publishes about the machine that made it: nothing.

The records a merge keeps locally (``merge_manifest.json``, ``validation.json``/``.txt``, the model
card) name local folders by their paths, which carry user names, mount points and run ids. Before
any of them goes to the Hub, :func:`public_files` rewrites it:

- a Hub parent is named by its repo id and commit (``hf://org/name@sha``);
- a local parent (or tokenizer) by its folder name, and the manifest gains its ``content_sha256``
  (:func:`content_sha256`), so the exact inputs remain identifiable;
- the output by the repo it is published to (``hf://org/name``);
- the home folder becomes ``~`` wherever it still appears, and the host name ``<host>`` in the
  records this tool writes.
"""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path

from .manifest import MANIFEST_NAME, InputRecord, Manifest

#: the files rewritten before they are published; the weights and anything larger are sent as they are
MAX_REWRITTEN_BYTES = 64 * 1024 * 1024
#: the records this tool writes into a merge (the other files are the parents' configs and tokenizer)
OUR_FILES = (MANIFEST_NAME, "validation.json", "validation.txt", "README.md")
_TEXT_SUFFIXES = (".json", ".txt", ".md", ".yaml", ".yml", ".jinja")


def content_sha256(record: InputRecord) -> str:
    """SHA-256 of an input's files: one ``name size sha256`` line per file, in name order."""
    files = sorted(record.files, key=lambda f: f.name)
    lines = "".join(f"{f.name} {f.size} {f.sha256 or '-'}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def private_strings(manifest: Manifest, repo_id: str) -> dict[str, str]:
    """Local strings of ``manifest`` → what is published instead (see the module docstring)."""
    names: dict[str, str] = {}
    for record in manifest.inputs.values():
        if record.commit:  # from the Hub: the path is a cache folder, the ref the repo id
            names[record.path] = f"hf://{record.ref}@{record.commit}"
            continue
        public = Path(record.path).name
        for local in (record.path, record.ref):
            if _looks_like_path(local) and local != public:
                names[local] = public
    output = str(manifest.spec.get("output") or "")
    for local in (output, str(Path(output).expanduser().resolve()) if output else ""):
        if _looks_like_path(local):
            names[local] = f"hf://{repo_id}"
    return names


def _looks_like_path(text: str) -> bool:
    return len(text) > 1 and ("/" in text or "\\" in text)


def scrub(text: str, names: dict[str, str], *, ours: bool = True) -> str:
    """``text`` with every private string of ``names`` and the home folder replaced (longest
    first, each only where it ends a path component, so ``/data/a`` is not replaced inside
    ``/data/ab``). In the files this tool writes (``ours``), the host name too (as a whole word);
    never in others' files (a tokenizer's vocabulary may hold any word)."""
    home = str(Path.home())
    replacements = {**names, **({home: "~"} if len(home) > 1 else {})}
    for local in sorted(replacements, key=len, reverse=True):
        text = re.sub(re.escape(local) + r"(?![\w.\-])", lambda _m, new=replacements[local]: new, text)
    host = socket.gethostname()
    if ours and len(host) >= 4:
        text = re.sub(r"(?<![\w.\-])" + re.escape(host) + r"(?![\w\-])", "<host>", text)
    return text


def public_manifest(manifest: Manifest) -> Manifest:
    """``manifest`` with each local input's ``content_sha256`` (paths are scrubbed as text)."""
    public = manifest.model_copy(deep=True)
    for record in public.inputs.values():
        if not record.commit:
            record.content_sha256 = content_sha256(record)
    return public


def public_files(folder: Path, repo_id: str, files: list[Path]) -> dict[str, bytes]:
    """The files among ``files`` (inside ``folder``) that must be published rewritten, by their
    path in the repo: text files up to :data:`MAX_REWRITTEN_BYTES` that name a local path, the
    home folder or the host, and the manifest (always, for its content hashes). Empty when
    ``folder`` holds no manifest (not a merge).

    Raises:
        OSError: a file cannot be read.
    """
    try:
        manifest = Manifest.read(folder)
    except (OSError, ValueError):
        return {}
    names = private_strings(manifest, repo_id)
    out = {}
    for f in files:
        rel = f.relative_to(folder).as_posix()
        if not f.name.endswith(_TEXT_SUFFIXES) or f.stat().st_size > MAX_REWRITTEN_BYTES:
            continue
        if rel == MANIFEST_NAME:
            text = public_manifest(manifest).model_dump_json(indent=2) + "\n"
        else:
            try:
                text = f.read_text()
            except UnicodeDecodeError:
                continue
        public = scrub(text, names, ours=rel in OUR_FILES)
        if rel == MANIFEST_NAME or public != text:
            out[rel] = public.encode()
    return out

