"""``--shard-params --hvp fd``: the model itself sharded across torchrun ranks by FSDP2, Hessian-vector
products by central differences of gradients.

The model is wrapped with ``torch.distributed.fsdp.fully_shard`` (every module that owns parameters
not shared with another module, then the root) on a one-dimensional device mesh over the ranks
(gloo on the CPU, NCCL on CUDA). FSDP2 splits every parameter along its dim 0 into ``W`` chunks as
``torch.chunk`` does (``ceil(d0 / W)`` rows each, the last ranks fewer or none), so this rank's part
of a parameter is one contiguous range of the flat parameter vector (``named_parameters`` order,
trainable only, as :class:`flatscope.params.ParamLayout`). The rank's coordinates are the union of
those ranges, and every vector of the analysis holds exactly them
(:class:`flatscope.linalg.ShardedSpace` with ``ranges``): no rank holds a whole parameter vector,
the model's included, except one FSDP unit's parameters while it is all-gathered for its forward and
backward.

Definitions (:class:`FSDPObjective`), for the local coordinates ``w_r`` of ``w``:

- the gradient ``g_r(w)``: this rank's coordinates of the gradient of the split mean
  ``L(w) = sum_b (c_b / C) l_b(w)`` (``c_b`` the counted samples or tokens of batch ``b``, ``C`` their
  total over the whole split and all ranks); each rank differentiates ``sum_{b in its shard}
  (c_b / C) l_b`` and FSDP reduce-scatters the sum over ranks (its gradient divide factor set to 1);
- ``H v`` by the central difference ``(g(w + h v) - g(w - h v)) / 2h`` with the step of
  :func:`flatscope.objective.fd_step` from all-reduced norms, in the widened precision of
  ``Objective._fd_objective`` (float32 models difference float64 gradients, bfloat16/float16 models
  float32 ones): the model's shards are held in that precision, so a run on ``W`` ranks equals one
  process with ``--hvp fd`` up to rounding.

Every rank runs the same number of forward and backward passes (each is a collective): a rank with
one batch fewer runs its first batch again with weight 0. The parameters are restored to ``w`` after
every product. No exact Hessian-vector product exists here (a second backward through FSDP2 fails on
torch 2.13), so the accuracy of the differences cannot be measured against one.
"""

from __future__ import annotations

import copy
import math

import torch

from . import distributed
from .errors import FlatscopeError
from .linalg import ShardedSpace
from .losses import make_loss
from .memory import MemoryBudget
from .objective import LOW_PRECISION, Objective, fd_step, run_module
from .params import ParamLayout
from .sources import Source, TensorSource, to_device

WIDE = {torch.float32: torch.float64, torch.bfloat16: torch.float32, torch.float16: torch.float32}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of an FSDP2 parameter or gradient (a ``DTensor``): a view, writes go through."""
    return t.to_local()  # type: ignore[attr-defined]


def chunk_rows(d0: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a dim-0 size ``d0`` that ``torch.chunk(t, world)`` gives ``rank`` (as FSDP2)."""
    size = -(-d0 // world) if d0 else 0
    start = min(rank * size, d0)
    return start, min(start + size, d0)


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped in place by FSDP2 on all ranks: each module owning unshared parameters, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh("cuda" if device.type == "cuda" else "cpu", (distributed.world_size(),))
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    units = [
        m
        for m in model.modules()
        if m is not model
        and any(True for _ in m.parameters(recurse=False))
        and all(owners[id(p)] == 1 for p in m.parameters(recurse=False))  # tied ones stay with the root
    ]
    for m in units:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # sum the ranks' gradients: each rank weights its own batches
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has neither AVG nor PREMUL_SUM)
    return model


class FSDPShard:
    """What :func:`flatscope.analyses.hessian.hessian_analysis` takes as ``shard`` when the model is
    sharded: the :class:`ShardedSpace` of this rank's coordinates, and an objective whose products
    already map local coordinates to local coordinates (nothing is gathered)."""

    def __init__(self, space: ShardedSpace):
        self.space = space

    @property
    def local_dim(self) -> int:
        return self.space.local_dim

    def operator(self, matvec, obj=None):
        return matvec


class FSDPObjective:
    """The split mean loss of an FSDP2-sharded model as a function of this rank's coordinates.

    It has the parts of :class:`flatscope.objective.Objective` that ``hessian_analysis`` uses with
    ``--hvp fd`` (``w0``, ``dim``, ``hvp``, ``loss_and_grad``, the memory budget), on local vectors.
    ``dtype`` is the model's requested dtype (it sets the basis dtype, as in one process);
    ``fd_dtype`` the widened one the shards are held and differenced in.
    """

    fsdp = True
    hvp_mode = "fd"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        data: Source,
        loss="ce",
        output: str | None = None,
        batch_size: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        memory_budget=None,
        basis_device: str | torch.device | None = None,
    ):
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise FlatscopeError("the model is sharded across torchrun ranks: start with torchrun --nproc-per-node N")
        self.loss_fn = make_loss(loss)
        self.output = output
        self.device = torch.device(device)
        self.dtype = dtype
        self.fd_dtype = WIDE.get(dtype, dtype)
        self.acc_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
        self.hvp_info: dict = {"requested": "fd", "mode": "fd", "fsdp": True}
        self.notes: list[str] = []
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self._memory_budget = memory_budget
        self._memory: MemoryBudget | None = memory_budget if isinstance(memory_budget, MemoryBudget) else None
        self.basis_device = torch.device(basis_device) if basis_device is not None else self.device

        self.n_total = len(data)
        if self.n_total < self.world:
            raise FlatscopeError(f"the split has {self.n_total} samples, fewer than the {self.world} ranks")
        start, stop = distributed.shard_range(self.n_total, self.rank, self.world)
        source = data.shard(start, stop)
        if isinstance(source, TensorSource):  # inputs rounded to the model's dtype, as in one process
            source = source.to(self.device, dtype).to(self.device, self.fd_dtype)
        self.source, self.n = source, stop - start
        self.batch_size = int(batch_size) if batch_size else (self.n if source.in_memory else 256)
        self._counts = [self.loss_fn.count(None, y) for _, y in self.source.batches(self.batch_size)]
        local = torch.tensor([float(sum(self._counts))], dtype=torch.float64, device=self.device)
        self.count_total = float(distributed.all_reduce_sum(local)[0])
        if self.count_total == 0:
            raise FlatscopeError("the split has no counted targets (every target is ignore_index -100)")
        n_batches = torch.tensor([len(self._counts)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(n_batches, op=torch.distributed.ReduceOp.MAX)
        self.n_passes = int(n_batches[0])  # forward/backward passes per gradient, the same on every rank

        # whole only until it is sharded, on the CPU; rounded to the model's dtype first, as in one process
        m = copy.deepcopy(model).to(dtype=dtype).to(dtype=self.fd_dtype)
        m.eval()
        self.layout = ParamLayout.of(m)
        for name, shape in zip(self.layout.names, self.layout.shapes):
            if not shape:
                raise FlatscopeError(f"parameter {name} is a scalar, which FSDP2 cannot cut along dim 0")
        self.model = shard_model(m, self.device)
        named = dict(self.model.named_parameters())
        self._segments: list[tuple[torch.nn.Parameter, int, int, tuple[int, ...]]] = []
        ranges, lo = [], 0
        for name, offset, numel, shape in zip(
            self.layout.names, self.layout.offsets, self.layout.numels, self.layout.shapes
        ):
            p = named[name]
            loc = _local(p)
            r0, r1 = chunk_rows(shape[0], self.rank, self.world)
            row = numel // shape[0] if shape[0] else 0  # coordinates per dim-0 row
            if tuple(loc.shape) != (r1 - r0, *shape[1:]):
                raise FlatscopeError(f"FSDP2 holds a {tuple(loc.shape)} shard of {name} {shape}, not dim-0 chunks")
            if r1 > r0:
                ranges.append((offset + r0 * row, offset + r1 * row))
                self._segments.append((p, lo, lo + loc.numel(), tuple(loc.shape)))
                lo += loc.numel()
        self.space = ShardedSpace(self.layout.size, reduce=distributed.all_reduce_sum, ranges=ranges)
        self.shard = FSDPShard(self.space)
        self.w0 = torch.cat(
            [_local(p).detach().reshape(-1) for p, *_ in self._segments]
            or [torch.zeros(0, dtype=self.fd_dtype, device=self.device)]
        ).clone()
        self._batch_bytes = self._measure_batch()

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        return self.layout.size

    @property
    def local_dim(self) -> int:
        return self.space.local_dim

    memory = Objective.memory
    memory_on = Objective.memory_on

    def resolve_hvp_mode(self) -> str:
        return "fd"

    def _batch_counts(self) -> list[int]:
        return self._counts

    def batch_bytes(self, linearization: bool = False) -> int:
        """Bytes autograd kept for the first batch's gradient through the sharded model (measured at
        construction, the largest over the ranks), plus the local gradient."""
        return self._batch_bytes

    @torch.no_grad()
    def _write(self, w: torch.Tensor) -> None:
        """Put this rank's coordinates ``w`` into the FSDP2 shards (the DTensors' local tensors)."""
        w = w.to(self.device, self.fd_dtype)
        for p, a, b, shape in self._segments:
            _local(p).copy_(w[a:b].view(shape))

    def _passes(self):
        """``(inputs, targets, weight)`` for each of the :attr:`n_passes` passes; weight 0 pads a rank."""
        first = None
        done = 0
        for (x, y), c in zip(self.source.batches(self.batch_size), self._counts):
            x = to_device(x, self.device, self.fd_dtype)
            y = to_device(y, self.device, self.fd_dtype if torch.is_floating_point(y) else None)
            if first is None:
                first = (x, y)
            done += 1
            yield x, y, c / self.count_total
        for _ in range(self.n_passes - done):
            yield (*first, 0.0)

    def _pass_loss(self, x, y, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted loss of one pass (a zero-weight pass: ``0 * sum(outputs)``, no 0/0 of an empty count)."""
        out = run_module(self.model, x, self.output)
        if weight == 0:
            return out.sum() * 0.0, torch.zeros((), dtype=torch.float64)
        lb = self.loss_fn.mean(out, y) * weight
        return lb, lb.detach().to(torch.float64)

    def loss_and_grad(self, w: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """``(L(w), g_r(w))``: the split mean loss and this rank's coordinates of its gradient."""
        self._write(self.w0 if w is None else w)
        for p in self.model.parameters():
            p.grad = None
        loss = torch.zeros((), dtype=torch.float64)
        for i, (x, y, wt) in enumerate(self._passes()):
            try:
                lb, val = self._pass_loss(x, y, wt)
                lb.backward()
            except (RuntimeError, IndexError, ValueError, TypeError) as exc:
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise FlatscopeError(f"the sharded model failed on batch {i}: {msg}") from None
            loss += val.cpu()
        zeros = lambda k: torch.zeros(k, dtype=self.fd_dtype, device=self.device)  # noqa: E731 - an unused parameter
        parts = [_local(p.grad).reshape(-1) if p.grad is not None else zeros(b - a) for p, a, b, _ in self._segments]
        g = torch.cat(parts) if parts else zeros(0)
        return float(distributed.all_reduce_sum(loss.to(self.device))), g.to(self.device, self.fd_dtype)

    def grad(self, w: torch.Tensor | None = None) -> torch.Tensor:
        return self.loss_and_grad(w)[1]

    def hvp(self, v: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """``H(w) v`` on local coordinates (``(local_dim,)`` or ``(k, local_dim)``), one central
        difference per row; the parameters are ``w0`` again afterwards."""
        w = (self.w0 if w is None else w).to(self.device, self.fd_dtype)
        rows = v.reshape(-1, v.shape[-1]).to(self.device, self.fd_dtype)
        out = torch.zeros(rows.shape, dtype=self.acc_dtype, device=self.device)
        try:
            for r in range(rows.shape[0]):
                h = fd_step(w, rows[r], space=self.space)  # global norms: the same step on every rank
                if h == 0:
                    continue
                d = self.grad(w + h * rows[r]) - self.grad(w - h * rows[r])
                out[r] = (d / (2 * h)).to(self.acc_dtype)
        finally:
            self._write(self.w0)
        return out.reshape(v.shape)

    def fd_accuracy(self, w=None, samples: int = 64, seed: int = 0) -> None:
        """Not measurable: no exact Hessian-vector product exists through the sharded model."""
        self.hvp_info["fd_rel_error"] = None
        return None

    def _measure_batch(self) -> int:
        """Bytes autograd saves for the first pass through the sharded model (storages counted once,
        the inputs left out), plus one local gradient; the largest over the ranks."""
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if not hasattr(t, "to_local"):
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            return t

        x, y, wt = next(iter(self._passes()))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lb, _ = self._pass_loss(x, y, wt)
        lb.backward()
        for p in self.model.parameters():
            p.grad = None
        leaves = x.values() if isinstance(x, dict) else (x if isinstance(x, (tuple, list)) else [x])
        for t in leaves:
            if isinstance(t, torch.Tensor):
                seen.pop(t.untyped_storage().data_ptr(), None)
        nbytes = sum(seen.values()) + self.local_dim * torch.finfo(self.fd_dtype).bits // 8
        t = torch.tensor([float(nbytes)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t[0]) if math.isfinite(float(t[0])) else nbytes
