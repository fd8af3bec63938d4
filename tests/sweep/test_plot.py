"""The sweep's plot: an SVG and a PNG with the merges, the parents and the choice."""

from __future__ import annotations

import re

from slerp_plugin.sweep.plot import inline_svg, plot_sweep

POINTS = [(0.7, 26.0, True), (0.1, 25.2, True), (0.5, 40.0, False)]
PARENTS = {"model_1": 25.0, "model_2": 25.5}


def test_svg_names_the_parents_and_the_choice():
    svg = plot_sweep(POINTS, PARENTS, 0.1, "svg").decode()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    for label in ("model_1 (t=0)", "model_2 (t=1)", "chosen (t=0.1)", "perplexity"):
        assert label in svg
    assert inline_svg(svg.encode()).startswith("<svg")


def test_png_and_no_choice():
    png = plot_sweep(POINTS, PARENTS, None, "png")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert "chosen" not in plot_sweep(POINTS, PARENTS, None, "svg").decode()


def labels(svg: str) -> set[str]:
    """The texts of an SVG matplotlib drew (each glyph run follows a comment with its text)."""
    return set(re.findall(r"<!-- (.*?) -->", svg))


def test_a_broken_merge_beside_good_ones_is_drawn_on_a_log_scale():
    broken = labels(plot_sweep([(0.1, 25.0, True), (0.5, 1e6, False)], PARENTS, 0.1, "svg").decode())
    assert {r"$\mathdefault{10^{2}}$", r"$\mathdefault{10^{6}}$"} <= broken  # decades on the axis
    fine = labels(plot_sweep(POINTS, PARENTS, 0.1, "svg").decode())
    assert not any("10^" in label for label in fine)
