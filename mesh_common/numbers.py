"""Finite numbers from command lines and environment variables.

``float()`` takes ``nan``, ``inf`` and ``-inf``, and click's ``FloatRange`` lets ``nan``
through (every comparison with it is false) and ``inf`` where the range has no upper bound.
A number of seconds, a rate or a share that is not finite is never meant, so every float flag
and numeric setting goes through ``finite_float``: ``FiniteFloatRange`` for click options,
``finite_arg`` for argparse ones.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import click


def finite_float(value: str | float) -> float:
    """``value`` as a finite float. Raises ValueError, one line: ``not a number: 'x'`` or
    ``not a finite number: 'nan'``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"not a number: {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number


class FiniteFloatRange(click.FloatRange):
    """click's ``FloatRange`` (same arguments, same help) that refuses nan and ±inf: a bad
    value is a usage error naming the option (one line, exit 2)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        try:
            finite_float(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return super().convert(value, param, ctx)


def finite_arg(text: str) -> float:
    """argparse ``type=``: ``finite_float``; argparse reports a bad value as
    ``argument --flag: not a finite number: 'nan'`` and exits 2."""
    try:
        return finite_float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
