"""A product rule for ``nn.Linear`` that keeps one weight-sized temporary out of every exact
Hessian-vector product.

In a reverse-over-reverse product (:class:`flatscope.objective.Linearization`) a linear layer's weight
receives two terms: one through the forward ``x @ W.T`` and one through the gradient's ``gy @ W``.
PyTorch's ``F.linear`` transposes ``W`` inside, so both terms reach that transpose as transposed
(non-contiguous) tensors, and autograd adds non-contiguous terms out of place: a third weight-sized
tensor, live beside the other two (seen with the profiler on torch 2.13; on the 10^7-parameter MLP of
benchmarks/bench_hvp_memory.py, 4.09 parameter vectors per product where the result and the two terms
are 3).

:func:`linear_rule` is a ``TorchFunctionMode`` under which ``F.linear`` with a 2-D weight runs as
:class:`_Linear`, whose backward is written with differentiable ops on ``W`` itself (no transpose node),
so both terms arrive contiguous at ``W`` and autograd adds one into the other. The products are the
same: the backward is ``F.linear``'s own formulas (tests/test_linear_rule.py checks its first and
second derivatives, and the products against the dense Hessian; they were bitwise equal on four models
in benchmarks/bench_linear_rule.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _Linear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` for a 2-D weight, with its gradients as plain differentiable ops."""

    @staticmethod
    def forward(x, weight, bias):  # type: ignore[override]
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = gy @ weight if ctx.needs_input_grad[0] else None
        gw = gy2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = gy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


class linear_rule(TorchFunctionMode):
    """Within it, ``F.linear`` (``nn.Linear``) with a 2-D weight records :class:`_Linear`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            named = dict(zip(("input", "weight", "bias"), args), **kwargs)
            x, weight, bias = named.get("input"), named.get("weight"), named.get("bias")
            if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.requires_grad:
                return _Linear.apply(x, weight, bias)
        return func(*args, **kwargs)
