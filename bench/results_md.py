"""bench/RESULTS.md, written section by section: each benchmark replaces its own heading's part."""

from __future__ import annotations

from pathlib import Path


def replace_section(results_md: Path, section: str, lines: list[str]) -> None:
    """Put ``lines`` under the heading ``section`` (``## ...``) of ``results_md``, replacing an
    earlier one and keeping every other section as it is."""
    text = results_md.read_text() if results_md.is_file() else ""
    head, _, rest = text.partition(section)
    tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
    results_md.write_text(head.rstrip("\n") + "\n\n" + "\n".join([section, "", *lines]) + "\n" + tail)
