"""Argument types shared by the commands."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_kernel_table(p: argparse.ArgumentParser, what: str) -> None:
    """`--kernel-table FILE...`: tables from `exq bench kernels --table`, for `exq compile` and `exq serve`."""
    p.add_argument(
        "--kernel-table",
        nargs="+",
        default=[],
        metavar="FILE",
        help=f"kernel tables measured with `exq bench kernels --table` (a GPU exq ships no table for, or your model's "
        f"shapes): {what}",
    )
