"""The objective against exact answers: the quadratic of linear regression and dense Hessians."""

import numpy as np
import pytest
import torch

from flatscope.models import MLP
from flatscope.objective import Objective, exact_hessian


def _linreg(n=37, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(d, 1).double()
    return model, X, y


def test_linear_regression_exact_loss_grad_hessian():
    model, X, y = _linreg()
    obj = Objective(model, X, y, loss="mse", batch_size=10, dtype=torch.float64)  # 4 unequal batches
    A = torch.cat([X, torch.ones(len(X), 1, dtype=torch.float64)], 1)
    w = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    r = A @ w - y
    N = len(X)
    assert obj.loss() == pytest.approx(float((r ** 2).mean()), rel=1e-12)
    torch.testing.assert_close(obj.grad(), 2 * A.T @ r / N, rtol=1e-12, atol=1e-14)
    H = 2 * A.T @ A / N
    V = torch.randn(3, obj.dim, dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(V), V @ H, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(exact_hessian(obj), H, rtol=1e-12, atol=1e-13)


def test_unequal_batches_are_weighted_by_size():
    torch.manual_seed(0)
    model = MLP(in_features=5, out_features=3, widths=(6,)).double()
    X = torch.randn(23, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (23,))
    full = Objective(model, X, y, dtype=torch.float64)
    for bs in (1, 4, 7, 22):
        part = Objective(model, X, y, batch_size=bs, dtype=torch.float64)
        assert part.evaluate() == pytest.approx(full.evaluate(), rel=1e-12)
        torch.testing.assert_close(part.grad(), full.grad(), rtol=1e-10, atol=1e-13)
        v = torch.randn(full.dim, dtype=torch.float64)
        torch.testing.assert_close(part.hvp(v), full.hvp(v), rtol=1e-10, atol=1e-13)


def test_hvp_matches_dense_hessian_and_gradient_matches_finite_differences():
    torch.manual_seed(1)
    model = MLP(in_features=5, out_features=3, widths=(6,), activation="tanh").double()
    X = torch.randn(30, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    obj = Objective(model, X, y, batch_size=8, dtype=torch.float64)
    H = exact_hessian(obj)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
    E = torch.eye(obj.dim, dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(E), H, rtol=1e-10, atol=1e-12)
    g = obj.grad()
    eps = 1e-6
    for i in (0, 7, obj.dim - 1):
        e = E[i]
        fd = (obj.loss(obj.w0 + eps * e) - obj.loss(obj.w0 - eps * e)) / (2 * eps)
        assert float(g[i]) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_evaluate_many_equals_pointwise_evaluation():
    torch.manual_seed(2)
    model = MLP(in_features=4, out_features=3, widths=(5,)).double()
    X = torch.randn(19, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (19,))
    obj = Objective(model, X, y, batch_size=6, dtype=torch.float64)
    W = obj.w0 + 0.3 * torch.randn(4, obj.dim, dtype=torch.float64)
    losses, accs = obj.evaluate_many(W)
    for i, w in enumerate(W):
        l, a = obj.evaluate(w)
        assert float(losses[i]) == pytest.approx(l, rel=1e-12)
        assert float(accs[i]) == pytest.approx(a)


def test_objective_is_deterministic_and_never_touches_the_model():
    from flatscope.models import ResNet

    torch.manual_seed(3)
    model = ResNet(in_features=64, out_features=10, width=4)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X = torch.randn(12, 64)
    y = torch.randint(0, 10, (12,))
    obj = Objective(model, X, y, batch_size=5)
    assert obj.evaluate() == obj.evaluate()  # eval mode: BN running statistics
    obj.hvp(torch.randn(obj.dim))
    obj.recompute_bn(obj.w0 + 0.1, X)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_recompute_bn_matches_batch_statistics():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    X = torch.randn(50, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (50,))
    obj = Objective(model, X, y, dtype=torch.float64)
    bufs = obj.recompute_bn(obj.w0, X)
    h = X @ model[0].weight.detach().double().T + model[0].bias.detach().double()
    torch.testing.assert_close(bufs["1.running_mean"], h.mean(0))
    torch.testing.assert_close(bufs["1.running_var"], h.var(0, unbiased=True))


def test_mse_with_labels_uses_one_hot_and_accuracy_nan_for_regression():
    model, X, y = _linreg()
    obj = Objective(model, X, y, loss="mse", dtype=torch.float64)
    assert np.isnan(obj.evaluate()[1])
    torch.manual_seed(0)
    clf = torch.nn.Linear(4, 3).double()
    labels = torch.randint(0, 3, (len(X),))
    o2 = Objective(clf, X, labels, loss="mse", dtype=torch.float64)
    out = clf(X)
    expected = torch.nn.functional.mse_loss(out, torch.nn.functional.one_hot(labels, 3).double()).detach()
    assert o2.loss() == pytest.approx(float(expected), rel=1e-12)


def test_cached_hvp_operator_equals_hvp_and_rebuilt():
    torch.manual_seed(5)
    model = MLP(in_features=4, out_features=3, widths=(5,), activation="tanh").double()
    X = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    obj = Objective(model, X, y, batch_size=9, dtype=torch.float64)
    V = torch.randn(3, obj.dim, dtype=torch.float64)
    w = obj.w0 + 0.1
    for op in (obj.hvp_operator(w), obj.hvp_operator(w, cache=False)):
        torch.testing.assert_close(op(V), obj.hvp(V, w), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(op(V[1]), obj.hvp(V[1], w), rtol=1e-12, atol=1e-14)


def test_block_products_vmapped_or_row_by_row_are_equal_and_the_choice_is_recorded():
    """A block of vectors goes through the linearization as vmapped groups or row by row, whichever the
    first block measured faster; both are the same products (float64: to rounding)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    X, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    obj = Objective(model, X, y, dtype=torch.float64, batch_size=16)  # 3 batches
    V = torch.randn(5, obj.dim, dtype=torch.float64)
    H = exact_hessian(obj)
    op = obj.hvp_operator()
    torch.testing.assert_close(op(V), V @ H, rtol=1e-10, atol=1e-12)
    assert obj.hvp_info["rows"] in ("vmap", "loop")
    for mode in ("vmap", "loop"):
        obj.hvp_info["rows"] = mode
        torch.testing.assert_close(op(V), V @ H, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(obj.hvp(V), V @ H, rtol=1e-10, atol=1e-12)
