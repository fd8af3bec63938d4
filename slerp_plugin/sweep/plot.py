"""The plot of a sweep: perplexity of the merge against t, the parents as reference lines, the t
that failed the gate crossed, the chosen t starred. Drawn with matplotlib (Agg: no display)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Literal

#: (t, perplexity, passed the gate)
Point = tuple[float, float, bool]


def plot_sweep(points: Sequence[Point], parents: Mapping[str, float], chosen_t: float | None,
               fmt: Literal["svg", "png"] = "svg") -> bytes:
    """The plot as an SVG or PNG file's bytes.

    Args:
        points: the merges, one per t.
        parents: ``model_1`` / ``model_2`` → perplexity (drawn where given, at t = 0 and t = 1).
        chosen_t: the t marked as chosen (None: none).
        fmt: ``svg`` (default) or ``png`` (100 dpi).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    ordered = sorted(points)
    ax.plot([p[0] for p in ordered], [p[1] for p in ordered], marker="o", color="#1f6feb", label="merge")
    for role, color, t in (("model_1", "#8250df", 0), ("model_2", "#bf3989", 1)):
        if role in parents:
            ax.axhline(parents[role], linestyle="--", color=color, label=f"{role} (t={t})")
    for t, ppl, passed in ordered:
        if not passed:
            ax.plot([t], [ppl], marker="x", color="#cf222e", markersize=10)
        if chosen_t is not None and t == chosen_t:
            ax.plot([t], [ppl], marker="*", color="#1a7f37", markersize=16, label=f"chosen (t={t:g})")
    ax.set_xlabel("t")
    ax.set_ylabel("perplexity")
    ax.set_xlim(-0.02, 1.02)
    if ordered and max(p[1] for p in ordered) > 100 * min(p[1] for p in ordered):
        ax.set_yscale("log")  # a broken merge beside good ones
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    plt.close(fig)
    return buf.getvalue()


def inline_svg(svg: bytes) -> str:
    """An SVG file as markup to embed in a page: without its XML declaration and doctype."""
    text = svg.decode()
    return text[text.index("<svg"):]
