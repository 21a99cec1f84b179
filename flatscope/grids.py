"""The one grammar for grids of positive scales on the command line (``--sigma``, ``--gamma``).

A spec is a comma list of items; an item is a number or a range:

- ``a..b``: 10 log-spaced points from a to b inclusive;
- ``a..b:N``: N log-spaced points (``N = 1`` gives ``a``);
- ``a..b:N:lin|log``: N linearly or log-spaced points.

The union is sorted and duplicates are dropped. A range needs ``b > a``; a log range needs
``a > 0``. Where the caller allows it, a trailing ``x`` on every number makes the grid relative to a
reference scale (``--gamma 0.1x..100x:7`` is 0.1 λ_max ... 100 λ_max); absolute and relative
numbers cannot be mixed. A grid holds at most 10,000 values.
"""

from __future__ import annotations

import math
import re

import numpy as np

from .errors import FlatscopeError


MAX_POINTS = 10_000  # per grid: each point is a whole analysis (a sampler run, a threshold search)


class _Parser:
    def __init__(self, spec: str, option: str, symbol: str, positive: bool, relative: bool):
        self.spec, self.option, self.symbol = spec, option, symbol
        self.positive, self.relative = positive, relative
        self.flags: list[bool] = []

    def fail(self, msg: str):
        raise FlatscopeError(f"{self.option} {self.spec!r}: {msg}")

    def number(self, text: str, what: str) -> float:
        t = text.strip()
        rel = self.relative and t.endswith("x")
        body = t[:-1] if rel else t
        if not body.isascii():
            self.fail(f"{what} {t!r} is not a number (only the ASCII digits 0-9 are read)")
        try:
            x = float(body)
        except ValueError:
            self.fail(f"{what} {t!r} is not a number")
        if not math.isfinite(x):
            self.fail(f"{what} must be finite, got {t!r}")
        if x < 0 or (self.positive and x == 0):
            self.fail(
                f"{self.symbol} must be {'positive' if self.positive else 'non-negative'}, got {x:g}"
                + ("" if self.positive else f" ({self.symbol} cannot be negative)")
            )
        self.flags.append(rel)
        return x

    def range(self, item: str) -> np.ndarray:
        head, _, rest = item.partition("..")
        parts = rest.split(":")
        if len(parts) > 3:
            self.fail(f"a range is a..b, a..b:N or a..b:N:lin|log, got {item.strip()!r}")
        a, b = self.number(head, "start"), self.number(parts[0], "end")
        n = 10
        if len(parts) >= 2:
            txt = parts[1].strip()
            if not re.fullmatch(r"[+-]?\d+", txt, re.ASCII):
                self.fail(f"the number of points N must be a whole number, got {txt!r}")
            n = int(txt)
            if n < 1:
                self.fail(f"the number of points N must be at least 1, got {n}")
            if n > MAX_POINTS:
                self.fail(f"the number of points N must be at most {MAX_POINTS}, got {n}")
        scale = parts[2].strip().lower() if len(parts) == 3 else "log"
        if scale not in ("lin", "log"):
            self.fail(f"the spacing must be lin or log, got {parts[2].strip()!r}")
        if b <= a:
            self.fail(f"the end of a range must be above its start, got {a:g}..{b:g}")
        if scale == "log":
            if a <= 0:
                self.fail(f"a log-spaced range needs a positive start, got {a:g} (use :lin to start at 0)")
            return np.geomspace(a, b, n)
        return np.linspace(a, b, n)


def parse_grid(
    spec: str, *, option: str, symbol: str, positive: bool = False, relative: bool = False
) -> tuple[np.ndarray, bool]:
    """(sorted distinct values, whether they are relative) for a grid spec (module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise FlatscopeError(f"{option} is empty; give e.g. 0.01..0.5, 0.01..0.5:20:lin or 0.05,0.1,0.2")
    p = _Parser(spec, option, symbol, positive, relative)
    values: list[np.ndarray] = []
    for item in spec.split(","):
        if not item.strip():
            p.fail("empty item in the comma list")
        if ".." in item:
            values.append(p.range(item))
        else:
            if ":" in item:
                p.fail(f"{item.strip()!r} has ':N' but no range a..b")
            values.append(np.array([p.number(item, symbol)]))
    if len(set(p.flags)) > 1:
        p.fail("mixes absolute and relative (x) values; use one kind")
    if sum(v.size for v in values) > MAX_POINTS:
        p.fail(f"gives {sum(v.size for v in values)} values; a grid holds at most {MAX_POINTS}")
    return np.unique(np.concatenate(values).astype(np.float64)), bool(p.flags and p.flags[0])
