"""``--fail-if`` thresholds for audits: a tiny grammar, parsed, never evaluated as Python.

::

    threshold := METRIC OP NUMBER
    METRIC    := NAME ("." NAME)+          e.g. hessian.lambda_max, local_energy.sigma_at_target
    NAME      := [A-Za-z_][A-Za-z0-9_-]*
    OP        := "<" | "<=" | ">" | ">=" | "==" | "!="
    NUMBER    := a decimal or scientific float literal (1, -0.5, 3e-2), or inf / -inf

Only ASCII is accepted: full-width or Arabic-Indic digits are refused, not read as numbers.

A threshold *fails* (the audit exits 1) when its condition holds for the metric's value. A metric
that is missing or not a finite number fails too, with a message saying so.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from .errors import FlatscopeError

_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt, ">": operator.gt}
_PATTERN = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z_][A-Za-z0-9_-]*)+)\s*"
    r"(?P<op><=|>=|==|!=|<|>)\s*"
    r"(?P<number>[-+]?(?:inf|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))\s*$",
    re.ASCII,
)


@dataclass(frozen=True)
class Threshold:
    metric: str
    op: str
    value: float
    text: str

    def check(self, metrics: dict) -> tuple[bool, str]:
        """(failed, message) for this threshold against a flat ``{metric: value}`` dict."""
        if self.metric not in metrics:
            return True, f"{self.metric}: not computed (known metrics: {', '.join(sorted(metrics)) or 'none'})"
        v = metrics[self.metric]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return True, f"{self.metric} = {v} is not a finite number (threshold {self.text})"
        if _OPS[self.op](v, self.value):
            return True, f"{self.metric} = {v:.6g} {self.op} {self.value:g}"
        return False, f"{self.metric} = {v:.6g} (fail if {self.op} {self.value:g})"


def parse_threshold(text: str) -> Threshold:
    if not isinstance(text, str) or len(text) > 200:
        raise FlatscopeError("a threshold must be a short string like 'hessian.lambda_max > 50'")
    if not text.isascii():
        bad = next(c for c in text if not c.isascii())
        raise FlatscopeError(
            f"threshold {text!r}: only ASCII is allowed (found {bad!r}, U+{ord(bad):04X}); "
            "write numbers with the digits 0-9"
        )
    m = _PATTERN.match(text)
    if not m:
        raise FlatscopeError(
            f"cannot parse threshold {text!r}: expected METRIC OP NUMBER, "
            "e.g. 'hessian.lambda_max > 50' (OP one of < <= > >= == !=)"
        )
    return Threshold(m["metric"], m["op"], float(m["number"]), text.strip())
