"""``--shard-params``: the parameter-space vectors of an analysis sharded across torchrun ranks.

Under torchrun with ``W`` ranks, rank ``r`` owns the contiguous slice ``[start_r, stop_r)`` of the
flat parameter vector (:func:`flatscope.distributed.shard_range`: sizes differ by at most one).
Every vector the numerical linear algebra keeps (Lanczos bases and Ritz vectors, SLQ probes and
their bases, Hutch++ sketches and probes) holds only that slice, in a
:class:`flatscope.linalg.ShardedSpace`: inner products are local sums all-reduced, random vectors
are drawn per block of coordinates so that they do not depend on ``W``.

A Hessian-vector product on a block of ``b`` slices (:meth:`ParamShard.operator`) all-gathers the
full ``b x n`` block, multiplies it with the objective (itself data-parallel: each rank's shard of
the split, the product all-reduced), and keeps this rank's columns. What stays whole on every rank
is therefore the model itself (its parameters and ``Objective.w0``, the linearization cache of the
HVPs) and, transiently during one product, the gathered block and its product (``2 b n`` numbers).
The memory it saves is the analysis' own: ``k`` Lanczos vectors cost ``k n / W`` numbers per rank.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from . import distributed
from .linalg import ShardedSpace


class ParamShard:
    """This rank's slice of ``R^dim`` under ``world`` ranks, and the collectives between slices and wholes."""

    def __init__(self, dim: int, rank: int | None = None, world: int | None = None):
        self.dim = int(dim)
        self.rank = distributed.rank() if rank is None else int(rank)
        self.world = distributed.world_size() if world is None else int(world)
        self.ranges = [distributed.shard_range(self.dim, r, self.world) for r in range(self.world)]
        self.start, self.stop = self.ranges[self.rank]
        reduce = distributed.all_reduce_sum if self.world > 1 else None
        self.space = ShardedSpace(self.dim, self.start, self.stop, reduce)

    @property
    def local_dim(self) -> int:
        return self.stop - self.start

    def local(self, X: torch.Tensor) -> torch.Tensor:
        """This rank's columns of whole vectors ``X`` (``(..., dim)``), as a new tensor."""
        return X[..., self.start : self.stop].clone()

    def gather(self, X: torch.Tensor) -> torch.Tensor:
        """Whole vectors from every rank's slice ``X`` (``(b, local_dim)``): ``(b, dim)`` on every rank."""
        if self.world == 1:
            return X
        width = max(b - a for a, b in self.ranges)
        buf = torch.zeros(X.shape[0], width, dtype=X.dtype, device=X.device)
        buf[:, : X.shape[1]] = X
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        return torch.cat([p[:, : b - a] for p, (a, b) in zip(parts, self.ranges)], dim=1)

    def operator(self, matvec: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``V -> (A gather(V))[:, start:stop]``: a matvec on slices from one on whole vectors (which
        must return the same product on every rank, e.g. a data-parallel objective's HVP)."""

        def mv(V: torch.Tensor) -> torch.Tensor:
            whole = self.gather(V.reshape(-1, V.shape[-1]))
            return self.local(matvec(whole)).reshape(V.shape)

        return mv
