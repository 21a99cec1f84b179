"""The linear product rule (flatscope.linear_rule): F.linear's values, gradients and second
derivatives, and one weight-sized temporary less in a Hessian-vector product."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from flatscope.linear_rule import _Linear, linear_rule
from flatscope import objective
from flatscope.objective import Linearization, Objective, exact_hessian


@pytest.mark.parametrize("shape,bias", [((5, 4), True), ((2, 3, 4), False), ((4,), True)])
def test_linear_function_has_f_linear_first_and_second_derivatives(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, w, b)

    def f(x, w, b):
        return torch.tanh(_Linear.apply(x, w, b))

    assert torch.equal(_Linear.apply(x, w, b), F.linear(x, w, b))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_mode_routes_nn_linear_and_keyword_calls_and_leaves_the_rest():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with linear_rule():
        y = lin(x)
        z = F.linear(input=x, weight=lin.weight, bias=lin.bias)
        frozen = F.linear(x, lin.weight.detach())  # no gradient to route: F.linear itself
    assert type(y.grad_fn).__name__ == "_LinearBackward" and type(z.grad_fn).__name__ == "_LinearBackward"
    assert frozen.grad_fn is None
    assert torch.equal(y, lin(x)) and torch.equal(z, y)


def _product(obj, v):
    """One product through a fresh linearization, and the bytes of each out-of-place ``add`` in it of
    at least one weight of the 300x300 layer."""
    xb, yb, _ = next(iter(obj.batches()))
    lin = Linearization(obj, obj.w0, xb, yb)
    out = torch.zeros(obj.dim)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        lin.pull(v, 1.0, out)
    weight = 300 * 300 * 4
    return out, [e.cpu_memory_usage for e in p.events() if e.name == "aten::add" and e.cpu_memory_usage >= weight]


def test_a_product_adds_the_two_weight_terms_in_place_and_equals_the_dense_hessian(monkeypatch):
    """Without the rule autograd sums a 300x300 weight's two terms out of place (a third weight-sized
    tensor, on torch 2.13); with it no weight-sized add is allocated, and the product is the same."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 300), torch.nn.Tanh(), torch.nn.Linear(300, 300),
                                torch.nn.Tanh(), torch.nn.Linear(300, 3))
    obj = Objective(model, torch.randn(16, 8), torch.randint(0, 3, (16,)))
    v = torch.randn(obj.dim)
    hv, adds = _product(obj, v)
    assert adds == [], adds
    with monkeypatch.context() as m:
        m.setattr(objective, "linear_rule", contextlib.nullcontext)
        hv_plain, adds_plain = _product(obj, v)
    assert torch.allclose(hv, hv_plain, rtol=1e-5, atol=1e-6)
    print("without the rule:", adds_plain)
    small = Objective(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double(),
                      torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,)), dtype=torch.float64)
    u = torch.randn(small.dim, dtype=torch.float64)
    assert torch.allclose(small.hvp(u), exact_hessian(small) @ u, rtol=1e-12, atol=1e-12)
