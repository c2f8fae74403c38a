"""The one set of argument checks: every error names the key (or argument) and the value.

Used by the operators (:mod:`expedit_d2.ops`, the pooling operators), the methods' settings
and the config (:mod:`expedit_d2.reduction.config`, which re-exports them).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["shape_of", "check_pair", "check_int_at_least", "check_positive_int", "check_positive_float", "check_rate",
           "check_odd", "check_bool", "check_choice"]


def check_pair(value, key: str) -> tuple[int, int]:
    """An int n (-> (n, n)) or a pair of positive ints."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    ok = isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)
    if not ok:
        raise ValueError(f"{key} must be a positive int or a pair [h, w] of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def check_int_at_least(value, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be an int >= {low}, got {value!r}")
    return int(value)


def check_positive_int(value, key: str) -> int:
    return check_int_at_least(value, key, 1)


def check_positive_float(value, key: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a positive number, got {value!r}") from None
    if isinstance(value, bool) or not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{key} must be a positive finite number, got {value!r}")
    return v


def check_rate(value, key: str) -> float:
    """A number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{key} must be a number in (0, 1], got {value!r}")
    return float(value)


def check_odd(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{key} must be an odd int >= 1, got {value!r}")
    return value


def check_bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be True or False, got {value!r}")
    return value


def check_choice(value, key: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")
    return value


def shape_of(value) -> object:
    """What an error message says a bad tensor argument was: its shape, or its type."""
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None and not isinstance(value, type) else type(value).__name__
