"""Durations as the YAML writes them: ``500ms``, ``3s``, ``2m``, ``1h`` or a number of seconds.

Every duration is greater than 0; a key that can be switched off takes ``null`` for that."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: object) -> float:
    """Return seconds for a duration value; raise ValueError with a readable reason."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 500ms, 3s, 2m or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a duration (use e.g. 500ms, 3s, 2m, 1h or a number of seconds)"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        raise ValueError("must be a duration such as 500ms, 3s, 2m or a number of seconds")
    if not math.isfinite(seconds):
        raise ValueError("must be a finite duration")
    if seconds < 0:
        raise ValueError("must not be negative")
    if seconds == 0:
        # A zero deadline fires at once (every request would time out); "off" is spelled null,
        # and only where the key says so.
        raise ValueError("must be greater than 0")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]
