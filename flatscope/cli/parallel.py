"""``--parallel data|points`` on the command line (the option is declared in :mod:`flatscope.options`,
the split of the work in :mod:`flatscope.parallel`)."""

from __future__ import annotations

from ..options import parallel
from ..parallel import PARALLEL, objectives
from .schema import click_option

__all__ = ["PARALLEL", "objectives", "parallel_option"]


def parallel_option(what: str):
    return click_option(parallel(what))
