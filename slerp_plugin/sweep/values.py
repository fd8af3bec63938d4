"""The t values of a sweep, as given on a command line: ``0.1,0.3,0.5`` or a range ``0.1:0.9:0.2``."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..errors import ConfigError

#: how many t values one sweep may hold (each is one set of hidden states in memory)
MAX_T_VALUES = 64


def parse_t_values(text: str) -> tuple[float, ...]:
    """The t values of ``text``: numbers separated by commas, or ``START:STOP:STEP`` (both ends
    included when the step reaches them, to within 1e-9).

    Raises:
        ConfigError: not numbers, a value outside [0, 1], a duplicate, a step that is not
            positive, or more than :data:`MAX_T_VALUES` values (one line naming the value).
    """
    text = text.strip()
    if ":" in text:
        return check_t_values(_range(text))
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--t: {text!r} is not numbers separated by commas, nor START:STOP:STEP") from None
    return check_t_values(values)


def _range(text: str) -> list[float]:
    parts = text.split(":")
    try:
        start, stop, step = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--t: {text!r} is not START:STOP:STEP (three numbers)") from None
    if not step > 0:
        raise ConfigError(f"--t: the step of {text!r} must be positive")
    if (stop - start) / step + 1 > MAX_T_VALUES:
        raise ConfigError(f"--t: {text!r} gives more than {MAX_T_VALUES} values")
    count = math.floor((stop - start) / step + 1e-9) + 1
    return [round(start + i * step, 12) for i in range(max(count, 0))]


def check_t_values(values: Iterable[float]) -> tuple[float, ...]:
    """``values`` in ascending order, checked.

    Raises:
        ConfigError: none given, one outside [0, 1] or not finite, a duplicate, or too many.
    """
    values = list(values)
    if not values:
        raise ConfigError("--t: no t values given")
    for v in values:
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ConfigError(f"--t: {v:g} is outside [0, 1]")
    seen: set[float] = set()
    for v in values:
        if v in seen:
            raise ConfigError(f"--t: {v:g} is given twice")
        seen.add(v)
    if len(values) > MAX_T_VALUES:
        raise ConfigError(f"--t: {len(values)} values; at most {MAX_T_VALUES}")
    return tuple(sorted(values))
