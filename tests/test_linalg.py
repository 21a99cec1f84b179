"""flatscope.linalg on explicit symmetric matrices with known spectra, against numpy.linalg.eigh.

Tolerances come from the estimators themselves: a Ritz value lies within its residual
``||A v - theta v||`` of an eigenvalue (Bauer-Fike for symmetric matrices), so Lanczos is held to
``residual + 1e-12 ||A||`` (float64 rounding); stochastic estimates are held to 3-4 of their own
standard errors (deterministic given the seed); Gauss quadrature is exact for polynomials of
degree < 2m, so SLQ moments are held to rounding.
"""

import math

import numpy as np
import pytest
import torch

from flatscope.errors import FlatscopeError
from flatscope.linalg import _rademacher, dense_matvec, lanczos, slq, trace

torch.set_num_threads(1)


def sym_with_spectrum(eigs, seed=0):
    rng = np.random.default_rng(seed)
    n = len(eigs)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * np.asarray(eigs)) @ Q.T
    return 0.5 * (A + A.T)


RNG = np.random.default_rng(1)
N = 240
SPECTRA = {
    # a few outliers over a bulk, like a trained network's Hessian
    "outliers": np.r_[np.linspace(2.0, 9.0, 8), 0.05 * RNG.standard_normal(N - 8)],
    # the top five within 1e-6 of each other
    "clustered": np.r_[10.0 + 1e-6 * np.arange(5), RNG.uniform(-1, 1, N - 5)],
    # exactly repeated eigenvalues at both ends
    "degenerate": np.r_[np.full(3, 5.0), np.full(2, 4.0), np.full(3, -3.0), RNG.uniform(-2, 2, N - 8)],
    # a negative end that dominates in magnitude
    "negative": np.r_[-np.linspace(3.0, 8.0, 4), RNG.uniform(-1, 1, N - 4)],
}


def check_against_eigh(A, res, which, k):
    ref = np.linalg.eigvalsh(A)
    ref = ref[::-1][:k] if which == "largest" else ref[:k]
    norm = np.abs(ref).max()
    assert res.eigenvalues.shape == (k,) and res.eigenvectors.shape == (k, A.shape[0])
    assert res.converged.all(), (res.status, res.residuals)
    # each Ritz value is within its residual of the matching eigenvalue
    err = np.abs(res.eigenvalues - ref)
    assert np.all(err <= res.residuals + 1e-12 * norm), (err, res.residuals)
    # residuals are what they claim to be
    V = res.eigenvectors.numpy()
    true_res = np.linalg.norm(V @ A - res.eigenvalues[:, None] * V, axis=1)
    np.testing.assert_allclose(res.residuals, true_res, rtol=1e-6, atol=1e-13 * norm)
    # orthonormal Ritz vectors
    np.testing.assert_allclose(V @ V.T, np.eye(k), atol=1e-10)


@pytest.mark.parametrize("name", sorted(SPECTRA))
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lanczos_matches_eigh(name, which):
    A = sym_with_spectrum(SPECTRA[name])
    # exactly repeated eigenvalues need a block at least as wide as the multiplicity (3 here)
    b = 3 if name == "degenerate" else 1
    res = lanczos(dense_matvec(A), N, k=5, which=which, tol=1e-10, block_size=b, max_iter=2000, seed=0)
    check_against_eigh(A, res, which, 5)


def test_degenerate_multiplicity_is_resolved_by_block():
    A = sym_with_spectrum(SPECTRA["degenerate"])
    res = lanczos(dense_matvec(A), N, k=3, which="largest", tol=1e-8, block_size=3, seed=0)
    np.testing.assert_allclose(res.eigenvalues, [5.0, 5.0, 5.0], atol=1e-7 * 5)
    # the three Ritz vectors span the eigenspace of 5
    w, U = np.linalg.eigh(A)
    E = U[:, w > 4.5]
    V = res.eigenvectors.numpy()
    np.testing.assert_allclose(np.linalg.svd(E.T @ V.T, compute_uv=False), 1.0, atol=1e-7)


@pytest.mark.parametrize("max_basis", [12, 30])
def test_thick_restart_converges_to_same_pairs(max_basis):
    # the bottom of a uniform bulk: slow enough that the basis fills up several times
    A = sym_with_spectrum(SPECTRA["clustered"])
    res = lanczos(dense_matvec(A), N, k=3, which="smallest", tol=1e-10, max_basis=max_basis, max_iter=5000)
    assert res.n_restarts > 0
    check_against_eigh(A, res, "smallest", 3)


def test_reproducible_with_seed_and_float32_operator():
    A = sym_with_spectrum(SPECTRA["outliers"])
    a = lanczos(dense_matvec(A), N, k=3, seed=7)
    b = lanczos(dense_matvec(A), N, k=3, seed=7)
    assert a.n_matvec == b.n_matvec
    np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
    # an operator computing in float32: eigenvalues within float32 rounding of ||A||
    A32 = torch.as_tensor(A, dtype=torch.float32)
    r = lanczos(lambda V: V.float() @ A32, N, k=3, tol=1e-5)
    ref = np.linalg.eigvalsh(A)[::-1][:3]
    assert r.converged.all()
    assert np.max(np.abs(r.eigenvalues - ref)) <= r.residuals.max() + 1e-5 * 9.0


def test_exhausted_small_operator_is_exact():
    eigs = np.array([3.0, -1.0, 0.5, 2.0, 2.0, 0.0])
    A = sym_with_spectrum(eigs)
    res = lanczos(dense_matvec(A), 6, k=6, which="largest", tol=1e-12, block_size=2)
    np.testing.assert_allclose(res.eigenvalues, np.sort(eigs)[::-1], atol=1e-12)
    assert res.converged.all()


def test_max_iter_reports_not_converged_and_keeps_ritz_pairs():
    A = sym_with_spectrum(SPECTRA["clustered"])
    res = lanczos(dense_matvec(A), N, k=5, tol=1e-12, max_iter=8)
    assert res.status == "max_iter"
    assert len(res.eigenvalues) == 5 and not res.converged.all()
    # still Ritz values of A: inside the spectrum, each within its residual of an eigenvalue
    ev = np.linalg.eigvalsh(A)
    assert np.all(res.eigenvalues <= ev[-1] + 1e-12)
    assert all(np.min(np.abs(ev - t)) <= r + 1e-12 for t, r in zip(res.eigenvalues, res.residuals))


def test_nonfinite_product_stops_and_keeps_earlier_steps():
    A = sym_with_spectrum(SPECTRA["outliers"])
    mv = dense_matvec(A)
    calls = {"n": 0}

    def flaky(V):
        calls["n"] += V.shape[0]
        out = mv(V)
        if calls["n"] >= 12:
            out[:] = float("nan")
        return out

    res = lanczos(flaky, N, k=2, tol=1e-14, seed=0)
    assert res.status == "nonfinite" and res.nonfinite_at == 12
    clean = lanczos(mv, N, k=2, tol=1e-14, seed=0, max_iter=11, true_residuals=False)
    np.testing.assert_allclose(res.eigenvalues, clean.eigenvalues, rtol=1e-12)
    assert not res.converged.any()
    # nothing at all when the first product fails
    res0 = lanczos(lambda V: V * float("inf"), N, k=2)
    assert res0.nonfinite_at == 1 and len(res0.eigenvalues) == 0


def test_bad_arguments():
    mv = dense_matvec(np.eye(4))
    with pytest.raises(FlatscopeError):
        lanczos(mv, 4, k=0)
    with pytest.raises(FlatscopeError):
        lanczos(mv, 4, k=5)
    with pytest.raises(FlatscopeError):
        lanczos(mv, 4, k=2, which="middle")
    with pytest.raises(FlatscopeError):
        slq(mv, 4, n_probes=0)
    with pytest.raises(FlatscopeError):
        trace(mv, 4, method="nope")


# ------------------------------------------------------------------ stochastic Lanczos quadrature

def test_slq_gauss_rule_is_exact_for_low_degree_moments():
    A = sym_with_spectrum(SPECTRA["outliers"])
    m, p, seed = 12, 4, 3
    r = slq(dense_matvec(A), N, n_probes=p, n_steps=m, seed=seed)
    assert r.nodes.shape == (p, m)
    np.testing.assert_allclose(r.weights.sum(axis=1), 1.0, atol=1e-12)
    ev = np.linalg.eigvalsh(A)
    assert np.all(r.nodes >= ev[0] - 1e-10) and np.all(r.nodes <= ev[-1] + 1e-10)
    # the same probes as slq draws them
    V = (_rademacher(p, N, torch.Generator().manual_seed(seed), "cpu") / math.sqrt(N)).numpy()
    for deg in (1, 2, 5, 2 * m - 1):
        exact = np.einsum("pi,pi->p", V, V @ np.linalg.matrix_power(A, deg))
        quad = r.probe_integrals(lambda x, d=deg: x ** d)
        np.testing.assert_allclose(quad, exact, rtol=1e-9, atol=1e-12 * 9.0 ** deg)


def test_slq_without_reorthogonalization_keeps_the_moments_despite_ghosts():
    """The three-term recurrence alone (2 vectors per probe): long enough for the outliers to converge
    and reappear as ghost copies, yet the Gauss rule's moments equal the exact ``v^T A^d v`` and the
    broadened density equals the fully reorthogonalized one."""
    rng = np.random.default_rng(0)
    n, m, p, seed = 600, 60, 3, 1
    lam = np.concatenate([[50.0, 20.0, 10.0], rng.uniform(-1, 1, n - 3)])
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    A = (Q * lam) @ Q.T
    full = slq(dense_matvec(A), n, n_probes=p, n_steps=m, seed=seed)
    plain = slq(dense_matvec(A), n, n_probes=p, n_steps=m, seed=seed, reorth=False)
    assert plain.n_matvec == full.n_matvec == p * m
    ghosts = int(np.sum(np.abs(plain.nodes[0] - 50.0) < 1e-6))
    assert ghosts > 1 and int(np.sum(np.abs(full.nodes[0] - 50.0) < 1e-6)) == 1
    V = (_rademacher(p, n, torch.Generator().manual_seed(seed), "cpu") / math.sqrt(n)).numpy()
    AkV = V.copy()
    for deg in range(1, 2 * m):
        AkV = AkV @ A
        if deg in (1, 2, 5, 11, 20, 40):
            exact = np.einsum("pi,pi->p", V, AkV)
            for r in (full, plain):
                np.testing.assert_allclose(r.probe_integrals(lambda x, d=deg: x**d), exact, rtol=1e-8)
    sigma = full.default_sigma(0.01)
    grid, a = full.density(sigma, n_grid=2048)
    _, b = plain.density(sigma, grid=grid)
    assert np.trapezoid(np.abs(a - b), grid) < 1e-6


def test_slq_density_integrates_to_one_and_its_mean_is_trace_over_n():
    A = sym_with_spectrum(SPECTRA["negative"])
    r = slq(dense_matvec(A), N, n_probes=16, n_steps=40, seed=0)
    sigma = r.default_sigma(0.01)
    grid, vals = r.density(sigma, n_grid=2048)
    assert np.all(vals >= 0)
    assert abs(np.trapezoid(vals, grid) - 1.0) < 1e-6
    mean, se = r.integral(lambda x: x)
    # broadening by a symmetric kernel keeps the mean
    assert abs(np.trapezoid(grid * vals, grid) - mean) < 1e-6 * np.abs(grid).max()
    assert abs(mean - np.trace(A) / N) <= 3 * se


# ------------------------------------------------------------------ trace

def test_trace_exact_when_budget_reaches_dimension():
    A = sym_with_spectrum(np.arange(1.0, 11.0) - 3)
    blocks = [slice(0, 4), slice(4, 10)]
    r = trace(dense_matvec(A), 10, 10, blocks=blocks)
    assert r.method == "exact" and r.stderr == 0.0 and r.n_matvec == 10
    assert abs(r.trace - np.trace(A)) < 1e-12
    np.testing.assert_allclose(r.block_traces, [np.trace(A[:4, :4]), np.trace(A[4:, 4:])], atol=1e-12)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_its_standard_error_and_blocks_add_up(method):
    A = sym_with_spectrum(SPECTRA["outliers"])
    blocks = [slice(0, 100), slice(100, N)]
    r = trace(dense_matvec(A), N, 60, method=method, blocks=blocks, seed=0)
    assert r.method == method and r.n_matvec == 60
    assert abs(r.trace - np.trace(A)) <= 3 * r.stderr
    assert abs(r.block_traces.sum() - r.trace) < 1e-9 * abs(r.trace)
    exact_blocks = [np.trace(A[b, b]) for b in blocks]
    assert np.all(np.abs(r.block_traces - exact_blocks) <= 3 * r.block_stderr)


def test_hutchinson_standard_error_matches_the_exact_variance():
    """Var(z^T A z) = 2 (||A||_F^2 - sum A_ii^2) for Rademacher z; over 200 seeds the mean of the
    reported SE^2 and the spread of the estimates both match it (relative s.e. of a variance
    estimate from 200 draws is about sqrt(2/200) = 10%: allow 3 of those)."""
    A = sym_with_spectrum(np.r_[np.linspace(1, 4, 6), 0.2 * np.random.default_rng(0).standard_normal(54)])
    m = 20
    var = 2 * (np.sum(A * A) - np.sum(np.diag(A) ** 2)) / m
    est = [trace(dense_matvec(A), 60, m, method="hutchinson", seed=s) for s in range(200)]
    t = np.array([e.trace for e in est])
    se2 = np.array([e.stderr ** 2 for e in est])
    assert abs(t.mean() - np.trace(A)) <= 3 * math.sqrt(var / 200)
    assert abs(t.var(ddof=1) / var - 1) < 0.3
    assert abs(se2.mean() / var - 1) < 0.3


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    """With a few dominant eigenvalues Hutch++ removes them exactly: its error is far below
    Hutchinson's at the same budget (averaged over 30 seeds to make the comparison stable)."""
    A = sym_with_spectrum(SPECTRA["outliers"])
    errs = {m: np.mean([abs(trace(dense_matvec(A), N, 30, method=m, seed=s).trace - np.trace(A))
                        for s in range(30)]) for m in ("hutchinson", "hutch++")}
    assert errs["hutch++"] < 0.5 * errs["hutchinson"]


def test_float32_basis_stays_orthogonal_at_a_million_coordinates():
    """Inner products of float32 vectors are accumulated in float64: summed in float32, a length-10^6
    inner product is off by ~1e-4 relative, which biased every Ritz value by ~5e-4 (measured before
    the fix); now the top-5 of a known diagonal spectrum come out within float32's precision."""
    n = 1_000_000
    d = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d[:6] = torch.tensor([3.5, 3.45, 3.42, 3.31, 3.29, 3.2], dtype=torch.float64)
    d32 = d.float()
    r = lanczos(lambda V: V * d32, n, 5, seed=0, tol=1e-5, max_basis=30, dtype=torch.float32)
    assert r.all_converged
    np.testing.assert_allclose(r.eigenvalues, [3.5, 3.45, 3.42, 3.31, 3.29], rtol=1e-6)


def test_lanczos_multiplies_its_pending_block_inside_the_basis_buffer():
    """Memory: the block being multiplied is a view of the basis buffer's next rows (one buffer of
    max_basis + 1 rows), never a second copy, through thick restarts too; the eigenvalues stay exact."""
    d = torch.linspace(1.0, 2.0, 200, dtype=torch.float64) ** 3
    storages = []

    def matvec(V):
        storages.append(V.untyped_storage().nbytes())
        return V * d.to(V.dtype)

    r = lanczos(matvec, 200, 3, max_basis=20, dtype=torch.float32, tol=1e-6, true_residuals=False)
    assert r.n_restarts >= 1 and r.all_converged
    assert set(storages) == {21 * 200 * 4}, set(storages)
    assert np.allclose(r.eigenvalues, np.sort(d.numpy())[::-1][:3], rtol=1e-5)
