"""The loss of a model over a data split as a function of its flat parameter vector.

:class:`Objective` is the one abstraction every analysis shares. For a flat vector ``w`` it gives

- ``loss(w)`` and ``evaluate(w) -> (loss, accuracy)``: exact over the whole split, the mean over
  samples (batches of unequal size are weighted by their sample count);
- ``loss_and_grad(w)``: value and gradient (torch.func.grad);
- ``hvp(v, w)``: Hessian-vector products, reverse-over-reverse (``vjp`` of ``grad``); ``v`` may hold
  several vectors as rows, which are pushed through one ``vmap``-ed call per batch;
  ``hvp_operator(w)`` reuses the linearization across many products at one point;
- ``evaluate_many(W)``: loss and accuracy at several points (rows of ``W``) in one vmapped call;
- ``minibatch_loss_and_grad(w, idx)``: for samplers and trainers.

It is deterministic: the model runs in eval mode (BatchNorm uses its running statistics,
dropout is off) unless ``train_mode=True`` is asked for. It owns device and dtype: the model's
parameters and buffers and the data live on ``device`` in ``dtype``.

Data-parallel use only adds a reduction: every per-split sum goes through ``self._reduce`` and the
normalizer is the global sample count (see ``shard``).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vjp, vmap

from .errors import FlatscopeError
from .params import ParamLayout

LOSSES = ("ce", "mse")


def loss_value(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """torch's mean-reduction loss of outputs ``out`` against targets ``y``."""
    if loss == "ce":
        if torch.is_floating_point(y):
            raise FlatscopeError("loss 'ce' needs integer class labels; use --loss mse for float targets")
        return F.cross_entropy(out, y)
    if loss == "mse":
        if torch.is_floating_point(y):
            return F.mse_loss(out, y.reshape(out.shape).to(out.dtype))
        return F.mse_loss(out, F.one_hot(y, out.shape[-1]).to(out.dtype))
    raise FlatscopeError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")


def correct_count(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Number of correct argmax predictions (NaN for regression targets)."""
    if torch.is_floating_point(y):
        return torch.full((), float("nan"), dtype=torch.float64, device=out.device)
    return (out.argmax(-1) == y).sum(-1).to(torch.float64)


class Objective:
    def __init__(self, model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, *, loss: str = "ce",
                 batch_size: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, train_mode: bool = False, n_total: int | None = None):
        if loss not in LOSSES:
            raise FlatscopeError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
        if X.shape[0] == 0:
            raise FlatscopeError("the data split is empty")
        if batch_size is not None and batch_size < 1:
            raise FlatscopeError(f"--batch-size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.loss_name = loss
        # A private copy: the user's model is never touched.
        self.model = copy.deepcopy(model).to(device=self.device, dtype=dtype)
        self.model.train(train_mode)
        self.layout = ParamLayout.of(self.model)
        self.buffers = {n: b for n, b in self.model.named_buffers()}
        self.w0 = self.layout.flatten({n: p.detach() for n, p in self.model.named_parameters()
                                       if p.requires_grad}).clone()
        self.X = X.to(device=self.device, dtype=dtype)
        self.y = y.to(self.device) if not torch.is_floating_point(y) else y.to(self.device, dtype)
        self.n = int(self.X.shape[0])
        self.n_total = int(n_total) if n_total is not None else self.n
        self.batch_size = int(batch_size) if batch_size else max(self.n, 1)
        self.classification = not torch.is_floating_point(self.y)
        if self.classification and self.loss_name == "ce":
            with torch.no_grad():
                out = self._forward(self.layout.unflatten(self.w0), self.X[:1], self.buffers)
            if int(self.y.max()) >= out.shape[-1]:
                raise FlatscopeError(f"labels go up to {int(self.y.max())} but the model has {out.shape[-1]} outputs")
        self._reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        return self.layout.size

    def batches(self):
        """(X_b, y_b, weight_b) over the split, weight_b = n_b / N_total."""
        for start in range(0, self.n, self.batch_size):
            xb = self.X[start:start + self.batch_size]
            yb = self.y[start:start + self.batch_size]
            yield xb, yb, xb.shape[0] / self.n_total

    def _forward(self, params: dict, x: torch.Tensor, buffers: dict | None = None) -> torch.Tensor:
        return functional_call(self.model, (params, self.buffers if buffers is None else buffers), (x,))

    def _batch_loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, buffers=None) -> torch.Tensor:
        return loss_value(self._forward(self.layout.unflatten(w), x, buffers), y, self.loss_name)

    def batch_loss(self, w: torch.Tensor, inputs, targets) -> torch.Tensor:
        """Mean loss of one batch at flat ``w`` (functional: works under ``grad``/``vmap``)."""
        return self._batch_loss(w, inputs, targets)

    def module_loss(self, module: torch.nn.Module, inputs, targets) -> torch.Tensor:
        """Mean loss of one batch through ``module`` called directly (a copy of ``self.model``)."""
        return loss_value(module(inputs), targets, self.loss_name)

    def minibatch(self, idx: torch.Tensor):
        """``(inputs, targets)`` of the samples ``idx`` of this split (any leading index shape)."""
        return self.X[idx], self.y[idx]

    def subset(self, idx) -> "Objective":
        """An objective over the samples ``idx`` of this split only (same model, loss and batching)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.X.device)
        return Objective(self.model, self.X[idx], self.y[idx], loss=self.loss_name, batch_size=self.batch_size,
                         device=self.device, dtype=self.dtype, train_mode=self.model.training)

    def _check_w(self, w: torch.Tensor) -> torch.Tensor:
        if w.shape[-1] != self.dim:
            raise FlatscopeError(f"parameter vector has {w.shape[-1]} entries, the model {self.dim}")
        return w.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ values
    @torch.no_grad()
    def evaluate(self, w: torch.Tensor | None = None, buffers: dict | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) over the whole split; accuracy is NaN for regression targets."""
        w = self.w0 if w is None else self._check_w(w)
        params = self.layout.unflatten(w)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        for xb, yb, wt in self.batches():
            out = self._forward(params, xb, buffers)
            loss += wt * loss_value(out, yb, self.loss_name).to(torch.float64)
            correct += correct_count(out, yb)
        loss, correct = self._reduce(loss), self._reduce(correct)
        return float(loss), float(correct) / self.n_total

    def loss(self, w: torch.Tensor | None = None) -> float:
        return self.evaluate(w)[0]

    @torch.no_grad()
    def evaluate_many(self, W: torch.Tensor, buffers: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and accuracy at each row of ``W`` (shape ``(m, dim)``), one vmapped call per batch."""
        W = self._check_w(W)
        bufs = self.buffers if buffers is None else buffers

        def one(w, xb, yb):
            out = functional_call(self.model, (self.layout.unflatten(w), bufs), (xb,))
            return loss_value(out, yb, self.loss_name).to(torch.float64), correct_count(out, yb)

        losses = torch.zeros(W.shape[0], dtype=torch.float64, device=self.device)
        correct = torch.zeros(W.shape[0], dtype=torch.float64, device=self.device)
        for xb, yb, wt in self.batches():
            lb, cb = vmap(one, in_dims=(0, None, None))(W, xb, yb)
            losses += wt * lb
            correct += cb
        return self._reduce(losses), self._reduce(correct) / self.n_total

    # ------------------------------------------------------------------ derivatives
    def loss_and_grad(self, w: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        w = self.w0 if w is None else self._check_w(w)
        g = torch.zeros_like(w)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        gv = grad_and_value(self._batch_loss)
        for xb, yb, wt in self.batches():
            gb, lb = gv(w, xb, yb)
            g += wt * gb
            loss += wt * lb.detach().to(torch.float64)
        return float(self._reduce(loss)), self._reduce(g)

    def grad(self, w: torch.Tensor | None = None) -> torch.Tensor:
        return self.loss_and_grad(w)[1]

    def hvp(self, v: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """H(w) v for ``v`` of shape ``(dim,)`` or ``(k, dim)`` (k products in one vmapped call).

        Reverse-over-reverse (``vjp`` of ``grad``; H is symmetric). It was measured faster than
        forward-over-reverse on CPU (benchmarks/RESULTS.md) and, unlike it, works on every layer
        (forward-mode through ``nn.Linear`` under MSE hits a torch ZeroTensor error).
        """
        w = self.w0 if w is None else self._check_w(w)
        v = self._check_w(v)
        g = grad(self._batch_loss)
        out = torch.zeros_like(v)
        for xb, yb, wt in self.batches():
            _, pullback = vjp(lambda p: g(p, xb, yb), w)
            out += wt * (pullback(v)[0] if v.dim() == 1 else vmap(pullback)(v)[0])
        return self._reduce(out)

    def hvp_operator(self, w: torch.Tensor | None = None, max_cached_batches: int = 8) -> Callable:
        """``matvec(v) = H(w) v`` for repeated use at one point (Lanczos, Hutchinson).

        For up to ``max_cached_batches`` batches the per-batch linearizations are built once and
        reused, so each product costs one backward pass instead of a gradient plus a backward
        pass; beyond that (large data) it falls back to :meth:`hvp`, which holds one batch's graph
        at a time.
        """
        w = self.w0 if w is None else self._check_w(w)
        n_batches = -(-self.n // self.batch_size)
        if n_batches > max_cached_batches:
            return lambda v: self.hvp(v, w)
        g = grad(self._batch_loss)
        pullbacks = []
        for xb, yb, wt in self.batches():
            pullbacks.append((wt, vjp(lambda p, xb=xb, yb=yb: g(p, xb, yb), w)[1]))

        def matvec(v: torch.Tensor) -> torch.Tensor:
            v = self._check_w(v)
            out = torch.zeros_like(v)
            for wt, pb in pullbacks:
                out += wt * (pb(v)[0] if v.dim() == 1 else vmap(pb)(v)[0])
            return self._reduce(out)

        return matvec

    def minibatch_loss_and_grad(self, w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and gradient on the samples ``idx`` of this split (no reduction across ranks)."""
        w = self._check_w(w)
        g, loss = grad_and_value(self._batch_loss)(w, self.X[idx], self.y[idx])
        return loss.detach(), g

    # ------------------------------------------------------------------ data parallel
    def shard(self, rank: int | None = None, world: int | None = None) -> "Objective":
        """Keep only this rank's contiguous shard of the split; all-reduce every sum.

        Losses, accuracy counts, gradients and HVPs are summed over ranks with weights
        ``n_batch / N_total`` (the global sample count), so the result equals the single-process
        value up to floating-point summation order. Under torchrun, ``Run.objective`` calls this.
        """
        from . import distributed

        rank = distributed.rank() if rank is None else rank
        world = distributed.world_size() if world is None else world
        start, stop = distributed.shard_range(self.n, rank, world)
        self.X, self.y = self.X[start:stop], self.y[start:stop]
        self.n = stop - start
        if world > 1:
            self._reduce = distributed.all_reduce_sum
        return self

    # ------------------------------------------------------------------ BatchNorm
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())

    @torch.no_grad()
    def recompute_bn(self, w: torch.Tensor, X: torch.Tensor) -> dict:
        """Buffers with BatchNorm statistics recomputed at ``w`` over the inputs ``X``.

        Running mean and variance are reset and re-estimated with ``momentum=None`` (torch's
        cumulative average over batches) in train mode; other buffers are kept.
        """
        m = copy.deepcopy(self.model)
        torch.nn.utils.vector_to_parameters(self._check_w(w), [p for p in m.parameters() if p.requires_grad])
        bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        m.train()
        X = X.to(device=self.device, dtype=self.dtype)
        for start in range(0, X.shape[0], self.batch_size):
            m(X[start:start + self.batch_size])
        return {n: b.detach().clone() for n, b in m.named_buffers()}


class PointEvaluator:
    """:meth:`Objective.evaluate` at one point after another, with less fixed cost per point.

    The weights of each point are put into a private copy of the objective's module as views
    (``param.data = w[slice].view(shape)``, no copy) and the module is called directly, instead of
    unflattening ``w`` and going through ``functional_call`` at every point. Batches, weights,
    float64 accumulation and (under torchrun) the reduction are those of :meth:`Objective.evaluate`,
    and the values agree with it bit for bit (tested); in one process the sums are kept in Python
    floats (the same IEEE float64 operations, fewer tiny tensor ops). Neither the objective nor the
    user's model is touched. Landscape grids and local-energy draws evaluate points through it.
    """

    def __init__(self, obj: "Objective"):
        self.obj = obj
        self.model = copy.deepcopy(obj.model)
        named = dict(self.model.named_parameters())
        self.params = [(named[n], o, k, shape) for n, o, k, shape in
                       zip(obj.layout.names, obj.layout.offsets, obj.layout.numels, obj.layout.shapes)]
        for p, *_ in self.params:
            p.requires_grad_(False)
        self.buffers = dict(self.model.named_buffers())
        self._own_buffers = True

    def _set_buffers(self, buffers: dict | None) -> None:
        if buffers is None and self._own_buffers:
            return
        src = self.obj.buffers if buffers is None else buffers
        for name, b in self.buffers.items():
            b.copy_(src[name])
        self._own_buffers = buffers is None

    @torch.no_grad()
    def __call__(self, w: torch.Tensor, buffers: dict | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) at ``w`` (flat, on the objective's device and dtype)."""
        obj = self.obj
        for p, o, k, shape in self.params:
            p.data = w[o:o + k].view(shape)
        self._set_buffers(buffers)
        if obj.n_total != obj.n:  # a data-parallel shard: tensor sums, reduced across ranks
            loss = torch.zeros((), dtype=torch.float64, device=obj.device)
            correct = torch.zeros((), dtype=torch.float64, device=obj.device)
            for xb, yb, wt in obj.batches():
                out = self.model(xb)
                loss += wt * loss_value(out, yb, obj.loss_name).to(torch.float64)
                correct += correct_count(out, yb)
            return float(obj._reduce(loss)), float(obj._reduce(correct)) / obj.n_total
        loss, correct = 0.0, 0
        for xb, yb, wt in obj.batches():
            out = self.model(xb)
            loss += wt * float(loss_value(out, yb, obj.loss_name))
            if obj.classification:
                correct += int((out.argmax(-1) == yb).sum())
        return loss, (correct / obj.n_total if obj.classification else float("nan"))


def exact_hessian(obj: Objective, w: torch.Tensor | None = None) -> torch.Tensor:
    """Dense Hessian of the split loss by torch.func.hessian (small models only; for tests)."""
    from torch.func import hessian

    w = obj.w0 if w is None else obj._check_w(w)
    H = torch.zeros(obj.dim, obj.dim, dtype=w.dtype, device=w.device)
    for xb, yb, wt in obj.batches():
        H += wt * hessian(obj._batch_loss)(w, xb, yb)
    return H
