"""Checks shared by the run settings. Settings a run would not read are refused rather than ignored, because
a user who sets an option believes the run honours it. A setting left at its default is never in the way, so
scripts that spell out every default keep working."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from onnxfair.errors import UsageError

MAX_SEED = 2**63 - 1  # within what torch.manual_seed and numpy's generators take (2**64 - 1), with room to spare


def check_seed(value: int, option: str) -> None:
    """A seed both torch and numpy accept; anything else would fail mid-run with their traceback."""
    if not 0 <= value <= MAX_SEED:
        raise UsageError(f"{option} {value} is outside 0..2**63-1; give a non-negative integer seed, e.g. 0")


def check_pw(beta: float, gamma: float) -> None:
    """The pw loss's settings: NaN or infinite ones would turn every loss figure into NaN, silently."""
    if not 0.0 <= beta <= 1.0:  # also refuses NaN
        raise UsageError(f"--beta {beta} is outside [0, 1]; it is the pw loss's weight floor, e.g. 0.75")
    if not (gamma >= 0.0 and math.isfinite(gamma)):
        raise UsageError(f"--gamma {gamma} must be a finite number >= 0, e.g. 5")


def defaults(config_type: type) -> dict[str, Any]:
    """Each field's default value (fields without one are left out)."""
    return {f.name: f.default for f in dataclasses.fields(config_type) if f.default is not dataclasses.MISSING}


def moved_and_unread(config: Any, reads: dict[str, bool]) -> list[str]:
    """The fields of `reads` that this run does not read (False) and that differ from their default."""
    default = defaults(type(config))
    return [name for name, read in reads.items() if not read and getattr(config, name) != default[name]]


def unused_message(config: Any, unused: list[str], read_by: dict[str, tuple[str, str]], where: str) -> str:
    """One line for the first unused setting: its option and value, what reads it, the fix; then the others."""
    name = unused[0]
    option, reader = read_by[name]
    value = getattr(config, name)
    shown = option if isinstance(value, bool) else f"{option} {value:g}" if isinstance(value, float) else f"{option} {value}"
    more = f" (and {len(unused) - 1} more: {', '.join(read_by[n][0] for n in unused[1:])})" if len(unused) > 1 else ""
    return f"{shown} has no effect on {where}: only {reader} reads it; drop {option}{more}"
