"""``--parallel data|points``: how ``landscape`` and ``local-energy`` split their work under torchrun.

- ``data`` (the default): every rank holds a shard of the split (:meth:`Objective.shard`) and every
  point is evaluated by all ranks together, its sums all-reduced. Use it when the data set is large
  or the points are few.
- ``points``: every rank holds the whole split and takes a share of the grid points (landscape) or
  of the noise draws (local-energy); the values are gathered to rank 0. No communication per
  point, so it scales better when there are many points and each forward pass is cheap.

Both give the single-process values: the points are evaluated in the same chunks either way. In
one process the flag changes nothing.
"""

from __future__ import annotations

from .options import PARALLEL

__all__ = ["PARALLEL", "objectives"]


def objectives(run, parallel: str) -> dict:
    """One objective per split of ``run``: sharded under torchrun with ``data``, whole with ``points``."""
    if parallel == "data":
        return {s: run.objective(s) for s in run.splits()}
    # Run.objective without the shard() it applies under torchrun
    return {s: run.objective(s, shard=False) for s in run.splits()}
