"""Engine version checks shared by the plugins: each supports a tested [low, high) range of its engine."""

from __future__ import annotations

import re

from exq.errors import ExqError


def parse_version(text: str) -> tuple[int, ...]:
    """The leading number of each dotted part: '0.5.23rc1' -> (0, 5, 23), '0.33.0+cu130' -> (0, 33, 0); stops at
    the first part that does not start with a digit."""
    parts = []
    for p in text.split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def require_version(engine: str, version: str, supported: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    low, high = supported
    if not low <= parse_version(version) < high:
        raise ExqError(
            f"{engine} {version} is not supported by exq's plugin",
            f"use {engine} >= {'.'.join(map(str, low))}, < {'.'.join(map(str, high))}",
        )
