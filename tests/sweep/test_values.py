"""The t values of a sweep: lists and ranges, and every bad list refused in one line."""

from __future__ import annotations

import pytest

from slerp_plugin.errors import ConfigError
from slerp_plugin.sweep.values import MAX_T_VALUES, check_t_values, parse_t_values


def test_lists_and_ranges():
    assert parse_t_values("0.5,0.1, 0.9") == (0.1, 0.5, 0.9)
    assert parse_t_values("0.1:0.9:0.2") == (0.1, 0.3, 0.5, 0.7, 0.9)
    assert parse_t_values("0:1:0.25") == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert parse_t_values("0.3") == (0.3,)


@pytest.mark.parametrize("text, message", [
    ("0.1,0.5,0.1", "0.1 is given twice"),
    ("0.1:0.5:0.2,0.3", "is not START:STOP:STEP"),
    ("0.5,1.5", "1.5 is outside [0, 1]"),
    ("-0.1,0.5", "-0.1 is outside [0, 1]"),
    ("nan", "outside [0, 1]"),
    ("a,b", "is not numbers separated by commas"),
    ("0.1:0.9:0", "must be positive"),
    ("", "no t values"),
    ("0:1:0.001", f"more than {MAX_T_VALUES}"),
])
def test_bad_lists_are_refused_in_one_line(text, message):
    with pytest.raises(ConfigError) as e:
        parse_t_values(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_too_many_values_given_one_by_one():
    with pytest.raises(ConfigError, match="at most"):
        check_t_values([i / 100 for i in range(MAX_T_VALUES + 1)])
