"""``--shard-params``: the parameter-space vectors of an analysis sharded across torchrun ranks.

Under torchrun with ``W`` ranks, rank ``r`` owns the contiguous slice ``[start_r, stop_r)`` of the
flat parameter vector (:func:`flatscope.distributed.shard_range`: sizes differ by at most one).
Every vector the numerical linear algebra keeps (Lanczos bases and Ritz vectors, SLQ probes and
their bases, Hutch++ sketches and probes) holds only that slice, in a
:class:`flatscope.linalg.ShardedSpace`: inner products are local sums all-reduced, random vectors
are drawn per block of coordinates so that they do not depend on ``W``.

A Hessian-vector product on a block of ``b`` slices (:meth:`ParamShard.operator`) all-gathers the
full ``b x n`` block, multiplies it with the objective over this rank's shard of the split, and
reduce-scatters the products: each rank receives the sum over ranks of its own columns (with
``--hvp fd``, whose gradients the objective all-reduces itself, the all-reduced product is sliced
instead). What stays whole on every rank
is therefore the model itself (its parameters and ``Objective.w0``, the linearization cache of the
HVPs) and, transiently during one product, the gathered block and its product (``2 b n`` numbers).
The memory it saves is the analysis' own: ``k`` Lanczos vectors cost ``k n / W`` numbers per rank.
``flatscope hessian --shard-params --hvp fd`` shards the model too, with FSDP2, and does not use this
class (:mod:`flatscope.fsdp`).
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

    def reduce_scatter(self, X: torch.Tensor) -> torch.Tensor:
        """This rank's columns of the sum over ranks of whole vectors ``X`` (``(b, dim)``)."""
        if self.world == 1:
            return X
        width = max(b - a for a, b in self.ranges)
        parts = []
        for a, b in self.ranges:
            part = torch.zeros(X.shape[0], width, dtype=X.dtype, device=X.device)
            part[:, : b - a] = X[:, a:b]
            parts.append(part)
        out = torch.empty(X.shape[0], width, dtype=X.dtype, device=X.device)
        dist.reduce_scatter(out, parts)
        return out[:, : self.local_dim]

    def operator(
        self, matvec: Callable[[torch.Tensor], torch.Tensor], obj=None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """A matvec on slices from one on whole vectors.

        Without ``obj``: ``V -> (A gather(V))[:, start:stop]``, for a ``matvec`` that returns the same
        product on every rank (a data-parallel objective's HVP, an explicit matrix). With ``obj`` (the
        :class:`flatscope.objective.Objective` that ``matvec`` multiplies with, data-parallel over the
        ranks): its all-reduce is suspended during the product and the per-rank partial products are
        reduce-scattered instead, which sends each rank only its columns. ``--hvp fd`` keeps the
        all-reduce (the finite difference goes through the objective's gradients).
        """
        partial = obj is not None and self.world > 1 and obj.resolve_hvp_mode() != "fd"
        if partial:
            _ = obj.count_total  # the global normalizer, all-reduced once and cached before any product

        def mv(V: torch.Tensor) -> torch.Tensor:
            whole = self.gather(V.reshape(-1, V.shape[-1]))
            if not partial:
                return self.local(matvec(whole)).reshape(V.shape)
            reduce, obj._reduce = obj._reduce, _identity
            try:
                out = matvec(whole)
            finally:
                obj._reduce = reduce
            return self.reduce_scatter(out.reshape(whole.shape)).reshape(V.shape)

        return mv


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t
