r"""Local entropy of a minimum, its landscape over the coupling gamma, and its gradient.

Convention (García Trillos, Kaplan & Sanz-Alonso 2019, "Variational characterizations of local entropy
and heat regularization in deep learning", arXiv:1901.10082, eq. 2.2: F_tau with a Gaussian of
variance tau = 1/(beta gamma), generalized to an inverse temperature beta; the L_LE of Pittorino et
al. 2021, arXiv:2006.07897, up to an additive constant)::

    q_gamma(w' | w) ∝ exp(-beta L(w') - beta gamma / 2 ||w' - w||^2)

    F_gamma(w) = -(1/beta) log ∫ exp(-beta L(w')) phi_{w, 1/(beta gamma)}(w') dw'

with phi_{w, s} the density of N(w, s I). F is a loss (small = a wide, deep valley); it tends to
L(w) as gamma -> infinity and to the flat average as gamma -> 0. Entropy-SGD's "negative local
entropy" (Chaudhari et al. 2017, "Entropy-SGD: Biasing Gradient Descent Into Wide Valleys",
arXiv:1611.01838) is the same integral without the
Gaussian's normalization; the two differ by (n / (2 beta)) log(2 pi / (beta gamma)), n = dim w.

Gradient (García Trillos et al. 2019, eq. 3.5, Entropy-SGD): grad F = gamma (w - <w'>_q).

Quadratic loss (exact). For L(w + d) = L + g.d + 1/2 d.H d and A = H + gamma I positive definite,
completing the square, -beta(g.d + 1/2 d.A d) = -beta/2 (d + A^-1 g).A(d + A^-1 g) + beta/2 g.A^-1 g,
so ∫ exp(-beta L - beta gamma/2 |d|^2) dd = exp(-beta L + beta/2 g.A^-1 g) (2 pi)^{n/2} det(beta A)^{-1/2};
with the Gaussian's normalization (beta gamma / 2 pi)^{n/2}::

    F = L(w) - 1/2 g.(H + gamma I)^-1 g + 1/(2 beta) log det(I + H / gamma)

q is Gaussian with precision beta (H + gamma I) and mean w - (H + gamma I)^-1 g, hence

    <||w'-w||^2> = ||A^-1 g||^2 + tr(A^-1) / beta
    <L(w')>      = L - g.A^-1 g + 1/2 g.A^-1 H A^-1 g + tr(H A^-1) / (2 beta)

(:func:`quadratic_closed_form`). At beta = 1 this is the issue's "1/2 log det(I + H/gamma) plus a
quadratic term".

Thermodynamic integration. Writing F = -(1/beta)[(n/2) log(beta gamma / 2 pi) + log Z_gamma] and
d log Z / d gamma = -beta/2 <||d||^2>_q (d = w' - w)::

    dF/dgamma = 1/2 (<||d||^2>_q - n / (beta gamma))                               (direct)

The virial (Stein) identity <d . grad U> = n for U = beta L(w') + beta gamma/2 ||d||^2 (integration
by parts) gives gamma <||d||^2> - n/beta = -<d . grad L(w')>, so::

    dF/dgamma = -<d . grad L(w')>_q / (2 gamma),   dF/dlog(gamma) = -m/2,   m = <d . grad L(w')>   (virial)

The direct form subtracts two large numbers (<||d||^2> is dominated by the n/(beta gamma) of
unconstrained directions); the virial form never sees directions with no curvature, and its
variance is smaller by orders of magnitude (tests/test_local_entropy.py measures both). flatscope
integrates the virial form over s = log gamma on the user's grid, from gamma_max down::

    F(gamma_k) = F(gamma_max) + ∫_{log gamma_k}^{log gamma_max} m / 2  ds

Tail. For large gamma (q tight around w: the small-variance cumulant expansion of
-(1/beta) log E exp(-beta L(w + xi)), xi ~ N(0, I/(beta gamma)))::

    F(gamma) = L(w) + c1 / (2 gamma) + O(gamma^-2),   c1 = tr(H)/beta - ||g||^2,   m(gamma) = c1/gamma + O(gamma^-2)

so F(gamma_max) = L(w) + m(gamma_max) / 2, estimated from the chains themselves. With two or more
gammas the next order (m = c1/gamma + c2/gamma^2 through the top two points, tail c1/(2 gamma) +
c2/(4 gamma^2)) gives the tail's truncation error (twice that difference is reported).

Anchor. The expansion needs L to be smooth on the scale 1/sqrt(beta gamma). ReLU networks are only
piecewise smooth (autograd's Hessian misses the kinks) and a saturated softmax makes the loss
exponential in the margins, so gamma * m can keep drifting far above lambda_max (on the sample MLP
it grows from 2.1e-3 at gamma = 100 lambda_max to 5.8e-3 at 3e5 lambda_max, while
tr(H)/beta - |g|^2 = 1.3e-3). Importance sampling, on the other hand, is nearly exact at gamma_max
(the Gaussian is close to q there: ESS ~ J). So when importance sampling is on and its ESS at
gamma_max is at least max(100, J/2), F(gamma_max) is its log-mean-exp estimate (error: its delta-method
standard error) and TI integrates down from there; otherwise the asymptotic tail is used. The two
are compared and a disagreement beyond their errors is reported.

Error of F. Each chain runs over the whole gamma grid, so each chain has its own estimate of the
whole path; the Monte Carlo error of F(gamma_k) is the standard error of those per-chain estimates
(so correlations across gamma from warm starts are accounted for). The integral over log gamma
uses a log-quadratic rule (exact for power laws m ~ gamma^p, which m is in both limits) when m
keeps its sign, else a local quadratic; the quadrature error is estimated from the difference of
the two rules (see :func:`thermodynamic_integration`), and the tail's truncation error (without an
anchor, below) adds to it: err = sqrt(mc^2 + (quad + tail)^2).

Importance sampling (García Trillos et al. 2019, Algorithm 4): J draws w' = w + xi / sqrt(beta gamma) from the
Gaussian, weights exp(-beta L(w')), self-normalized; it gives <w'>, <L>, <||d||^2> and directly
F = L(w) - (1/beta) log mean exp(-beta (L(w') - L(w))), with Kish's effective sample size
(sum w)^2 / sum w^2. It needs no gradient but degrades exponentially with the dimension
(García Trillos et al. 2019, 5.1.2): it is reliable when ESS >= 100 (flagged).

beta. The default is beta = N, the number of samples in the split: then exp(-beta L) is the
model's likelihood of the data under cross-entropy (a product of per-sample probabilities), and q is
the Bayesian posterior with a Gaussian prior of variance 1/(N gamma) around w. Entropy-SGD's
inner loop adds noise sqrt(eta') eps xi where SGLD adds sqrt(2 eta / beta) xi: its eps = 1e-4
is beta = 2 / eps^2 = 2e8, a nearly zero temperature at which q is the gamma-proximal point of L
plus tiny fluctuations.

Minibatch heating. SGLD's minibatch gradient adds noise of covariance eta^2 Sigma per step to the
injected 2 eta / beta; on a quadratic the stationary covariance then grows by Delta S with
A Delta S + Delta S A = eta Sigma (first order in eta, A = H + gamma I), so <L>_q rises by
tr(H Delta S)/2 <= tr(A Delta S)/2 = eta tr(Sigma) / 4 (``minibatch_heating``, loss units, from
32 minibatch gradients at up to four chains' final states; ``minibatch_noise_ratio`` = eta beta
sigma_top / 2 for the top direction). On small models this bias reached 6-10 standard errors
(benchmarks/RESULTS.md), so:

- the default (:func:`default_minibatch`) is full-batch gradients for splits of at most
  ``FULL_BATCH_MAX_SAMPLES`` samples (no minibatch bias; the Leimkuhler-Matthews step bias is
  second order and measured below the standard errors);
- with a minibatch ``m`` (asked for, or the default on larger splits) and at least 4 chains, half the
  chains draw ``m`` samples and half ``2m``. Since Sigma_m = Sigma / m, the bias of any average is
  b(m) = c / m to first order in eta, so the bias of the pooled estimate is
  ``(1/m + 1/(2m))/2 / (1/m - 1/(2m)) (q_m - q_2m) = 1.5 (q_m - q_2m)`` (``<q>_bias``), with its
  own Monte Carlo error from the two groups' spreads (``<q>_bias_sem``), for ⟨L⟩_q, ⟨|d|^2⟩_q, F
  (thermodynamic integration of each group's virial) and |grad F|. The reported errors
  (``mean_loss_err``, ``mean_sq_dist_err``, ``local_entropy_err``, ``grad_norm_err``, ``grad_err``)
  fold it in, sqrt(se^2 + bias^2 + bias_sem^2) (the ``_sem`` fields stay the Monte Carlo errors
  alone), and a gamma is flagged (``minibatch_biased``, a warning, the table, the plot) when the
  estimated bias is resolved (beyond twice its own error) and larger than the standard error.

The samplers are in :mod:`flatscope.samplers`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import FlatscopeError
from ..grids import parse_grid
from ..samplers import (
    INTEGRATORS,
    SAMPLERS,
    SGLD_STEP_FRACTION,
    ChainRun,
    ObjectivePotential,
    Potential,
    SamplerDivergence,
    effective_sample_size,
    power_lambda_max,
    run_chains,
    split_rhat,
)

IS_MIN_ESS = 100.0
RHAT_WARN = 1.01  # Vehtari, Gelman, Simpson, Carpenter & Buerkner (2021): R-hat < 1.01 and ESS > 400
ESS_WARN = 400.0
FULL_BATCH_MAX_SAMPLES = 4096  # the default minibatch: the full batch up to this many samples, else 64
DEFAULT_MINIBATCH = 64
FROZEN_ACCEPT = 0.05  # a MALA chain accepting fewer proposals than this is frozen (restarted)
TAIL_BATCHES = 10


# ---------------------------------------------------------------------------------------------------
# The gamma grid grammar
# ---------------------------------------------------------------------------------------------------
def parse_gamma(spec: str) -> tuple[np.ndarray, bool]:
    """The ``--gamma`` grid: (ascending distinct couplings γ > 0, relative), in the grammar of
    :mod:`flatscope.grids` (shared with ``--sigma``); a trailing ``x`` on every number makes it
    relative to the top Hessian eigenvalue: ``0.1x..100x:7`` is 0.1 λ_max ... 100 λ_max."""
    return parse_grid(spec, option="--gamma", symbol="γ", positive=True, relative=True)


def default_minibatch(n_samples: int) -> int | None:
    """The default SGLD minibatch: None (full-batch gradients, no minibatch bias) for a split of at most
    ``FULL_BATCH_MAX_SAMPLES`` samples, else ``DEFAULT_MINIBATCH`` (whose bias is then estimated from two
    minibatch sizes and folded into the reported errors); benchmarks/bench_error_bars.py measured both."""
    return None if n_samples <= FULL_BATCH_MAX_SAMPLES else DEFAULT_MINIBATCH


# ---------------------------------------------------------------------------------------------------
# Exact answers on a quadratic
# ---------------------------------------------------------------------------------------------------
def quadratic_closed_form(H, g, L0: float, gammas, beta: float) -> dict:
    """Exact q-averages and F for ``L(w + d) = L0 + g.d + 1/2 d.H d`` at each gamma (see module doc).

    Returns arrays over gamma: ``mean_loss``, ``mean_sq_dist``, ``virial`` (<d . grad L>),
    ``local_entropy``, ``dF_dgamma``, and ``mean_shift`` / ``grad`` of shape (K, n).
    """
    H = np.asarray(H, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    lam, Q = np.linalg.eigh(0.5 * (H + H.T))
    gq = Q.T @ g
    out = {k: [] for k in ("mean_loss", "mean_sq_dist", "virial", "local_entropy", "dF_dgamma", "mean_shift", "grad")}
    for gam in np.atleast_1d(np.asarray(gammas, dtype=np.float64)):
        a = lam + gam
        if np.any(a <= 0):
            raise FlatscopeError(f"gamma={gam} does not make H + gamma I positive definite: q is not normalizable")
        shift = -(Q @ (gq / a))
        out["mean_shift"].append(shift)
        out["grad"].append(-gam * shift)
        out["mean_sq_dist"].append(np.sum(gq**2 / a**2) + np.sum(1 / a) / beta)
        out["mean_loss"].append(
            L0 - np.sum(gq**2 / a) + 0.5 * np.sum(lam * gq**2 / a**2) + 0.5 * np.sum(lam / a) / beta
        )
        out["virial"].append(-np.sum(gq**2 / a) + np.sum(lam * gq**2 / a**2) + np.sum(lam / a) / beta)
        out["local_entropy"].append(L0 - 0.5 * np.sum(gq**2 / a) + 0.5 / beta * np.sum(np.log1p(lam / gam)))
        out["dF_dgamma"].append(0.5 * np.sum(gq**2 / a**2) + 0.5 / beta * np.sum(1 / a - 1 / gam))
    return {k: np.array(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------
# Thermodynamic integration over log gamma
# ---------------------------------------------------------------------------------------------------
_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)


def _fit_integral(x3, y3, a, b, log: bool) -> float:
    """Integral over [a, b] of the quadratic through (x3, y3), or of exp(that quadratic) if ``log``."""
    xc = x3.mean()
    p = np.polyfit(x3 - xc, y3, 2)
    if not log:
        P = np.polyint(p)
        return float(np.polyval(P, b - xc) - np.polyval(P, a - xc))
    x = 0.5 * (b - a) * _GL_X + 0.5 * (a + b)
    return float(0.5 * (b - a) * np.sum(_GL_W * np.exp(np.polyval(p, x - xc))))


def _local_rule(s: np.ndarray, f: np.ndarray, log: bool) -> np.ndarray:
    """Per interval, the average of the integrals of the (up to two) three-point interpolants that
    contain it: of f itself, or of exp of the interpolant of log f (exact for power laws in gamma)."""
    K = len(s)
    y = np.log(f) if log else f
    out = np.empty(K - 1)
    for j in range(K - 1):
        fits = [
            _fit_integral(s[lo : lo + 3], y[lo : lo + 3], s[j], s[j + 1], log)
            for lo in (j - 1, j)
            if lo >= 0 and lo + 3 <= K
        ]
        out[j] = np.mean(fits)
    return out


def _interval_rules(s: np.ndarray, f: np.ndarray) -> dict:
    """Per-interval integrals of ``f`` sampled at nodes ``s``: trapezoid ``T``, local quadratic ``Q``
    (three or more nodes), and when f keeps one strict sign, the power-law (log-linear) rule ``LM``
    and the log-quadratic rule ``LQ`` (three or more nodes)."""
    K = len(s)
    h = np.diff(s)
    out = {"T": 0.5 * h * (f[:-1] + f[1:])}
    if K >= 3:
        out["Q"] = _local_rule(s, f, log=False)
    sign = np.sign(f[0])
    if sign != 0 and np.all(np.sign(f) == sign):
        a, b = np.abs(f[:-1]), np.abs(f[1:])
        with np.errstate(divide="ignore", invalid="ignore"):
            lm = np.where(np.isclose(a, b, rtol=1e-12), 0.5 * h * (a + b), h * (b - a) / np.log(b / a))
        out["LM"] = sign * lm
        if K >= 3:
            out["LQ"] = sign * _local_rule(s, np.abs(f), log=True)
    return out


def _choose_rule(rules: dict) -> tuple[str, np.ndarray]:
    """The rule used and its per-interval error estimate.

    Log-quadratic when available (the integrand keeps its sign: exact for power laws, which both
    asymptotic regimes of m are), error 2 |LQ - Q|; else the local quadratic, error 2 |T - Q|
    (twice the difference to a rule of the other family or order: a safety factor of 2, checked on
    exact integrands in the tests); for two nodes the power-law rule, error |LM - T|, else the
    trapezoid with no internal estimate.
    """
    if "LQ" in rules:
        return "LQ", 2.0 * np.abs(rules["LQ"] - rules["Q"])
    if "Q" in rules:
        return "Q", 2.0 * np.abs(rules["T"] - rules["Q"])
    if "LM" in rules:
        return "LM", np.abs(rules["LM"] - rules["T"])
    return "T", np.full(len(rules["T"]), np.nan)


def thermodynamic_integration(
    gammas,
    m_rep: np.ndarray,
    center_loss: float,
    anchor: float | None = None,
    anchor_err: float = 0.0,
    lambda_max: float | None = None,
) -> dict:
    """F(gamma) on an ascending grid from replicate estimates ``m_rep`` (R, K) of m = <d . grad L>.

    F(gamma_k) = F(gamma_max) + integral of m/2 over s = log gamma from s_k to s_max. Replicates are
    independent chains (or batch means of one chain); each gives a whole path, and the Monte Carlo
    error is the standard error of the paths. The quadrature rule (:func:`_choose_rule`): when every
    replicate's m keeps one sign, the log-quadratic rule (each interval integrates the exponential of
    the three-point interpolants of log|m| that contain it, averaged: exact for power laws, and m is
    a power law in both limits, ~1/gamma above the curvature scale and flat below it), with error
    2 sum |LQ - Q| over the intervals above gamma_k, Q the same interpolation of m itself; otherwise
    Q, with error 2 sum |T - Q| (T the trapezoid). Two nodes: the power-law rule, error |LM - T|.

    F(gamma_max) is ``anchor`` (standard error ``anchor_err``, added to the Monte Carlo error) when
    given, else the asymptotic tail L(w) + m(gamma_max)/2 (m ~ c1/gamma), whose truncation error is
    twice the change from the next order m = c1/gamma + c2/gamma^2 fitted through the top two nodes,
    and at least tail * lambda_max / gamma_max when ``lambda_max`` is given (for a quadratic at a
    minimum the relative truncation error is below lambda_max / (2 gamma_max)).

    Returns ``local_entropy``, ``err`` = sqrt(mc^2 + (quad + tail_err)^2) (tail_err only without an
    anchor), ``mc_err``, ``quad_err``, ``tail``, ``tail_err`` (the asymptotic tail and its
    truncation error, always), ``anchor``, ``rule`` and ``trapezoid`` (F by the trapezoid rule).
    """
    gam = np.asarray(gammas, dtype=np.float64)
    m_rep = np.atleast_2d(np.asarray(m_rep, dtype=np.float64))
    R, K = m_rep.shape
    s = np.log(gam)
    mbar = m_rep.mean(0)
    top = center_loss + 0.5 * m_rep[:, -1] if anchor is None else np.full(R, float(anchor))
    if K == 1:
        rule, dq = "none", np.zeros(0)
        F_rep = top[:, None]
        F_trap = np.array([top.mean()])
    else:
        per_rep = [_interval_rules(s, 0.5 * m_rep[r]) for r in range(R)]
        rules_bar = _interval_rules(s, 0.5 * mbar)
        rule, dq = _choose_rule(rules_bar)
        if any(rule not in pr for pr in per_rep):  # a replicate crosses zero: stay in linear space
            rule, dq = _choose_rule({k: v for k, v in rules_bar.items() if k in ("T", "Q")})
        F_rep = np.stack([top[r] + np.concatenate([np.cumsum(per_rep[r][rule][::-1])[::-1], [0.0]]) for r in range(R)])
        F_trap = top.mean() + np.concatenate([np.cumsum(rules_bar["T"][::-1])[::-1], [0.0]])
    F = F_rep.mean(0)
    mc = F_rep.std(0, ddof=1) / math.sqrt(R) if R > 1 else np.full(K, np.nan)
    if anchor is not None:
        mc = np.sqrt(mc**2 + float(anchor_err) ** 2)
    quad = np.concatenate([np.cumsum(dq[::-1])[::-1], [0.0]])
    tail = 0.5 * mbar[-1]
    if K >= 2:
        g1, g2 = gam[-2], gam[-1]
        c2 = (mbar[-1] * g2 - mbar[-2] * g1) / (1 / g2 - 1 / g1)
        c1 = mbar[-1] * g2 - c2 / g2
        tail_err = 2.0 * abs(0.5 * c1 / g2 + 0.25 * c2 / g2**2 - tail)
    else:
        tail_err = abs(tail)
    if lambda_max is not None and K >= 2:
        tail_err = max(tail_err, abs(tail) * float(lambda_max) / gam[-1])
    err = np.sqrt(mc**2 + (quad + (tail_err if anchor is None else 0.0)) ** 2)
    return {
        "local_entropy": F,
        "err": err,
        "mc_err": mc,
        "quad_err": quad,
        "tail": tail,
        "tail_err": tail_err,
        "trapezoid": F_trap,
        "rule": rule,
        "anchor": "asymptotic tail" if anchor is None else "importance sampling",
    }


# ---------------------------------------------------------------------------------------------------
# Importance sampling (gradient-free cross-check)
# ---------------------------------------------------------------------------------------------------
def importance_sampling(
    potential: Potential,
    center: torch.Tensor,
    center_loss: float,
    gamma: float,
    beta: float,
    samples: int,
    generator: torch.Generator,
    block: int = 64,
) -> dict:
    """Algorithm 4 of García Trillos et al. 2019: draws from N(w, I/(beta gamma)), weights exp(-beta L).

    Returns F (log-mean-exp) with its delta-method standard error, Kish's ESS, and the
    self-normalized <L>, <||d||^2> (with standard errors) and the gradient gamma (w - <w'>).
    """
    n = center.numel()
    sd = 1.0 / math.sqrt(beta * gamma)
    logw, Ls, sqs = [], [], []
    acc_d = torch.zeros(n, dtype=torch.float64, device=center.device)
    M = -math.inf
    for start in range(0, samples, block):
        J = min(block, samples - start)
        xi = torch.randn((J, n), generator=generator, device=generator.device, dtype=center.dtype).to(center.device)
        D = sd * xi
        L = potential.losses(center + D).double()
        lw = -beta * (L - center_loss)
        lw = torch.where(torch.isfinite(lw), lw, torch.full_like(lw, -math.inf))
        Mb = float(lw.max())
        if Mb > M:
            acc_d *= math.exp(M - Mb) if math.isfinite(M) else 0.0
            M = Mb
        acc_d += (torch.exp(lw - M)[:, None] * D.double()).sum(0)
        logw.append(lw.cpu())
        Ls.append(L.cpu())
        sqs.append(D.double().pow(2).sum(-1).cpu())
    lw = torch.cat(logw).numpy()
    L = torch.cat(Ls).numpy()
    sq = torch.cat(sqs).numpy()
    if not np.isfinite(M):
        return {
            "local_entropy": math.nan,
            "local_entropy_err": math.nan,
            "ess": 0.0,
            "mean_loss": math.nan,
            "mean_loss_se": math.nan,
            "mean_sq_dist": math.nan,
            "mean_sq_dist_se": math.nan,
            "grad_norm": math.nan,
            "reliable": False,
        }
    wts = np.exp(lw - M)
    S1, S2 = wts.sum(), (wts**2).sum()
    wn = wts / S1
    ess = float(S1**2 / S2)
    J = len(wts)
    mean_w = S1 / J
    F = center_loss - (M + math.log(mean_w)) / beta
    F_err = float(np.std(wts, ddof=1) / (mean_w * math.sqrt(J)) / beta) if J > 1 else math.nan

    def sn(f):
        mu = float((wn * f).sum())
        return mu, float(np.sqrt((wn**2 * (f - mu) ** 2).sum()))

    mL, seL = sn(L)
    mS, seS = sn(sq)
    mean_d = acc_d / S1
    return {
        "local_entropy": float(F),
        "local_entropy_err": F_err,
        "ess": ess,
        "mean_loss": mL,
        "mean_loss_se": seL,
        "mean_sq_dist": mS,
        "mean_sq_dist_se": seS,
        "grad_norm": float(gamma * mean_d.norm()),
        "reliable": bool(ess >= IS_MIN_ESS),
    }


# ---------------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------------
@dataclass
class LocalEntropyResult:
    gamma: np.ndarray
    beta: float
    n_params: int
    center_loss: float
    center_grad_norm: float
    lambda_max: float
    lambda_max_source: str
    sampler: str
    chains: int
    steps: int
    burn_in: int
    thin: int
    minibatch: int | None
    warm_start: str
    integrator: str
    per_gamma: dict  # name -> (K,) arrays
    vectors: dict  # mean_params, grad, grad_sem: (K, n)
    traces: dict  # loss, sq_dist, virial: (K, C, S_thin); step: (S_thin,)
    importance: dict | None  # name -> (K,) arrays
    warnings: list = field(default_factory=list)
    anchor: str = "asymptotic tail"

    JSON_KEYS = (
        "mean_loss",
        "mean_loss_sem",
        "mean_loss_err",
        "mean_sq_dist",
        "mean_sq_dist_sem",
        "mean_sq_dist_err",
        "local_entropy",
        "local_entropy_err",
        "local_entropy_mc_err",
        "local_entropy_quad_err",
        "local_entropy_direct",
        "local_entropy_direct_err",
        "virial",
        "virial_sem",
        "dF_dgamma",
        "dF_dgamma_sem",
        "dF_dgamma_direct",
        "dF_dgamma_direct_sem",
        "grad_norm",
        "grad_norm_err",
        "grad_noise_floor",
        "grad_norm_debiased",
        "step_size",
        "step_fraction",
        "accept_rate",
        "rhat",
        "ess",
        "minibatch_noise_ratio",
        "minibatch_heating",
        "minibatch_biased",
        "mean_loss_bias",
        "mean_loss_bias_sem",
        "mean_sq_dist_bias",
        "mean_sq_dist_bias_sem",
        "local_entropy_bias",
        "local_entropy_bias_sem",
        "grad_norm_bias",
        "grad_norm_bias_sem",
        "wall_time_s",
        "grad_evals",
    )

    def summary(self) -> dict:
        """Headline numbers (stable names, audited as ``local_entropy.<name>``), at the smallest gamma:

        ``local_entropy`` F, ``local_entropy_err``, ``entropy_gap`` F - L(w) (>= 0 near a minimum;
        small = flat), ``mean_loss`` <L>_q, ``mean_sq_dist``, ``grad_norm`` |grad F|, plus
        ``center_loss``, ``beta``, ``gamma_min``, ``gamma_max``, ``lambda_max``, ``max_rhat``,
        ``min_ess``, ``min_accept_rate`` (MALA; NaN for SGLD), ``is_min_ess`` (NaN without IS),
        ``n_minibatch_biased`` (gammas whose estimated minibatch bias exceeds the standard error;
        0 with full-batch gradients), ``n_warnings``.
        """
        p = self.per_gamma
        imp = self.importance
        return {
            "local_entropy": float(p["local_entropy"][0]),
            "local_entropy_err": float(p["local_entropy_err"][0]),
            "entropy_gap": float(p["local_entropy"][0] - self.center_loss),
            "mean_loss": float(p["mean_loss"][0]),
            "mean_sq_dist": float(p["mean_sq_dist"][0]),
            "grad_norm": float(p["grad_norm"][0]),
            "center_loss": self.center_loss,
            "beta": self.beta,
            "gamma_min": float(self.gamma[0]),
            "gamma_max": float(self.gamma[-1]),
            "lambda_max": self.lambda_max,
            "max_rhat": float(np.nanmax(p["rhat"])) if np.any(np.isfinite(p["rhat"])) else math.nan,
            "min_ess": float(np.nanmin(p["ess"])) if np.any(np.isfinite(p["ess"])) else math.nan,
            "min_accept_rate": (
                float(np.nanmin(p["accept_rate"])) if np.any(np.isfinite(p["accept_rate"])) else math.nan
            ),
            "is_min_ess": float(np.min(imp["ess"])) if imp else math.nan,
            "n_minibatch_biased": int(np.sum(p.get("minibatch_biased", 0))),
            "n_warnings": len(self.warnings),
        }

    def to_tree(self) -> dict:
        tree = {
            "gamma": self.gamma,
            "beta": np.float64(self.beta),
            "n_params": np.int64(self.n_params),
            "center_loss": np.float64(self.center_loss),
            "center_grad_norm": np.float64(self.center_grad_norm),
            "lambda_max": np.float64(self.lambda_max),
            "lambda_max_source": self.lambda_max_source,
            "sampler": self.sampler,
            "chains": np.int64(self.chains),
            "steps": np.int64(self.steps),
            "burn_in": np.int64(self.burn_in),
            "thin": np.int64(self.thin),
            "minibatch": np.int64(self.minibatch or 0),
            "warm_start": self.warm_start,
            "anchor": self.anchor,
            "integrator": self.integrator,
            "warnings": json.dumps(self.warnings),
        }
        tree.update({k: (v if isinstance(v, str) else np.asarray(v)) for k, v in self.per_gamma.items()})
        tree.update({k: np.asarray(v) for k, v in self.vectors.items()})
        tree["traces"] = {k: np.asarray(v) for k, v in self.traces.items()}
        if self.importance:
            tree["importance"] = {k: np.asarray(v) for k, v in self.importance.items()}
        return tree

    def to_json(self) -> dict:
        out = {
            "gamma": self.gamma,
            "beta": self.beta,
            "n_params": self.n_params,
            "center_loss": self.center_loss,
            "center_grad_norm": self.center_grad_norm,
            "lambda_max": self.lambda_max,
            "lambda_max_source": self.lambda_max_source,
            "sampler": self.sampler,
            "chains": self.chains,
            "steps": self.steps,
            "burn_in": self.burn_in,
            "thin": self.thin,
            "minibatch": self.minibatch,
            "warm_start": self.warm_start,
            "integrator": self.integrator,
            "anchor": self.anchor,
            "tail": self.per_gamma["tail"],
            "tail_err": self.per_gamma["tail_err"],
            "tail_gap": self.per_gamma["tail_gap"],
            "quadrature_rule": self.per_gamma["quadrature_rule"],
        }
        out.update({k: self.per_gamma[k] for k in self.JSON_KEYS if k in self.per_gamma})
        out["rhat_detail"] = {k: self.per_gamma[f"rhat_{k}"] for k in ("loss", "sq_dist", "virial")}
        out["ess_detail"] = {k: self.per_gamma[f"ess_{k}"] for k in ("loss", "sq_dist", "virial")}
        out["importance"] = self.importance
        out["warnings"] = self.warnings
        out["summary"] = self.summary()
        return out


def _replicates(x: torch.Tensor) -> np.ndarray:
    """Per-replicate means of traces (C, S): chains when C >= 2, else TAIL_BATCHES batch means."""
    a = x.cpu().numpy()
    C, S = a.shape
    if C >= 2:
        return a.mean(1)
    B = min(TAIL_BATCHES, S)
    return np.array([b.mean() for b in np.array_split(a[0], B)])


def _sem(rep: np.ndarray) -> float:
    return float(rep.std(ddof=1) / math.sqrt(len(rep))) if len(rep) > 1 else math.nan


def _restart_frozen(
    run: ChainRun,
    pot: Potential,
    center: torch.Tensor,
    gamma: float,
    beta: float,
    lam: float,
    warnings: list,
    *,
    gen,
    steps: int,
    burn_in: int,
    adapt: bool,
    scale: float,
    integrator: str,
) -> ChainRun:
    """Restart every MALA chain whose acceptance over the kept steps is below ``FROZEN_ACCEPT``.

    A chain freezes when its warm start lies in a region much stiffer than where the others are
    (its step is then several times over its stability limit and every proposal is rejected);
    more steps cannot help. Such chains are redrawn from the prior N(w, I/(beta gamma)) and run
    again (burn-in with their own step adaptation, then ``steps`` kept steps) starting from the
    median step of the healthy chains; the restart and any chain still frozen after it are
    reported in ``warnings``. When every chain is frozen nothing is restarted (the caller raises).
    """
    acc = run.accept.cpu().numpy()
    frozen = np.flatnonzero(acc < FROZEN_ACCEPT)
    if frozen.size == 0 or frozen.size == acc.size:
        return run
    healthy = np.setdiff1d(np.arange(acc.size), frozen)
    eta = float(np.median(run.chain_step[healthy]))
    idx = torch.as_tensor(frozen, device=run.final.device)
    W0 = center + torch.randn((frozen.size, center.numel()), generator=gen, device=gen.device, dtype=center.dtype).to(
        center.device
    ) / math.sqrt(beta * gamma)
    sub = run_chains(
        pot,
        center,
        gamma,
        beta,
        W0,
        sampler="mala",
        step=eta,
        steps=steps,
        burn_in=burn_in,
        adapt=adapt,
        lambda_max=lam,
        generator=gen,
        divergence_scale=scale,
        integrator=integrator,
    )
    rates = ", ".join(f"{int(i)}: {acc[i]:.3f}" for i in frozen)
    after = sub.accept.cpu().numpy()
    warnings.append(
        f"gamma={gamma:.4g}: MALA chain(s) froze (acceptance {rates} over the kept steps; "
        f"their warm starts lay where the step is over the stability limit); restarted them from "
        f"the prior with a fresh burn-in: acceptance now " + ", ".join(f"{a:.3f}" for a in after)
    )
    if np.any(after < FROZEN_ACCEPT):
        warnings.append(
            f"gamma={gamma:.4g}: MALA chain(s) {frozen[after < FROZEN_ACCEPT].tolist()} are still "
            "frozen after a restart: the error bars there are not reliable; lower --step-size "
            "or raise --burn-in"
        )

    def put(full, part):
        out = full.clone()
        out[idx] = part.to(out.device)
        return out

    chain_step = run.chain_step.copy()
    chain_step[frozen] = sub.chain_step
    fraction = None if run.fraction is None else run.fraction.copy()
    if fraction is not None and sub.fraction is not None:
        fraction[frozen] = sub.fraction
    return ChainRun(
        loss=put(run.loss, sub.loss),
        sq_dist=put(run.sq_dist, sub.sq_dist),
        virial=put(run.virial, sub.virial),
        mean_params=put(run.mean_params, sub.mean_params),
        accept=put(run.accept, sub.accept),
        final=put(run.final, sub.final),
        step=float(np.median(chain_step)),
        diverged=put(run.diverged, sub.diverged),
        grad_evals=run.grad_evals,
        fraction=fraction,
        chain_step=chain_step,
        minibatch=run.minibatch,
        restarted=frozen,
    )


def local_entropy(
    target,
    gammas,
    *,
    beta: float | None = None,
    sampler: str = "sgld",
    steps: int = 1000,
    burn_in: int = 200,
    thin: int = 10,
    chains: int = 4,
    step_size: float | None = None,
    step_fraction: float | None = None,
    minibatch: int | None = None,
    is_samples: int = 0,
    lambda_max: float | None = None,
    warm_start: str = "previous",
    chain_mode: str = "auto",
    center: torch.Tensor | None = None,
    seed: int = 0,
    device_generator: torch.Generator | None = None,
    local_curvature: bool = True,
    retries: int = 2,
    integrator: str = "lm",
    bias_check: bool = True,
    progress: Callable[[int], None] | None = None,
) -> LocalEntropyResult:
    """Estimate the local entropy landscape of ``target`` around its weights at each coupling.

    ``target``: an :class:`~flatscope.objective.Objective` (center: its weights) or a
    :class:`~flatscope.samplers.Potential` with ``center``. ``gammas``: positive couplings.
    ``beta``: inverse temperature (default: the number of samples, see the module docstring).
    Step: ``step_size`` (eta, the same at every gamma) or ``step_fraction`` c with
    eta = c / (lambda_max + gamma) (default 0.25 for SGLD with LM noise, 0.1 with Euler; adapted during
    burn-in for MALA).
    ``minibatch``: SGLD minibatch size (None: full batch). ``integrator``: SGLD noise scheme, ``lm``
    (Leimkuhler-Matthews, default) or ``euler`` (Welling & Teh, Entropy-SGD). ``is_samples``: importance-sampling draws
    per gamma (0: none). ``warm_start``: ``previous`` (chains continue from the next larger gamma,
    widened by the extra prior variance 1/(beta gamma_k) - 1/(beta gamma_{k+1}) so unconstrained
    directions start in equilibrium) or ``center`` (fresh draws from N(w, I/(beta gamma))).
    ``local_curvature``: with an automatic step, lambda in the rule is the larger of lambda_max at
    the center and 10 power iterations at the first chain's starting point for that gamma (wide q
    visits stiffer regions than the minimum). ``retries``: with an automatic step, a divergence
    restarts that gamma with c / 4 (at most ``retries`` times, each recorded in ``warnings``); with
    an explicit ``step_size`` it raises :class:`~flatscope.samplers.SamplerDivergence`.
    """
    if isinstance(target, Potential):
        pot = target
        if center is None:
            raise FlatscopeError("a Potential target needs center=")
    else:
        pot = ObjectivePotential(target, chain_mode=chain_mode)
        center = target.w0 if center is None else center
    center = center.to(device=pot.device, dtype=pot.dtype)
    n = pot.dim
    gam = np.unique(np.asarray(gammas, dtype=np.float64))
    if gam.size == 0 or not np.all(np.isfinite(gam)) or np.any(gam <= 0):
        raise FlatscopeError(f"every coupling gamma must be positive and finite, got {list(np.asarray(gammas))}")
    if beta is None:
        if pot.n_samples is None:
            raise FlatscopeError("beta must be given for a loss without data")
        beta = float(pot.n_samples)
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise FlatscopeError(f"--beta must be positive and finite, got {beta}")
    if sampler not in SAMPLERS:
        raise FlatscopeError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if integrator not in INTEGRATORS:
        raise FlatscopeError(f"unknown integrator {integrator!r}; choose from {', '.join(INTEGRATORS)}")
    if chains < 1:
        raise FlatscopeError(f"--chains must be at least 1, got {chains}")
    if steps < 1:
        raise FlatscopeError(f"--steps must be at least 1, got {steps}")
    if burn_in < 0:
        raise FlatscopeError(f"--burn-in must be non-negative, got {burn_in}")
    if thin < 1:
        raise FlatscopeError(f"--thin must be at least 1, got {thin}")
    if is_samples < 0:
        raise FlatscopeError(f"--is-samples must be non-negative, got {is_samples}")
    if warm_start not in ("previous", "center"):
        raise FlatscopeError(f"unknown warm start {warm_start!r}; choose previous or center")
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise FlatscopeError(f"--step-size must be positive, got {step_size}")
    if step_fraction is not None and not (math.isfinite(step_fraction) and step_fraction > 0):
        raise FlatscopeError(f"the step fraction must be positive, got {step_fraction}")
    if minibatch is not None:
        if minibatch < 1:
            raise FlatscopeError(f"--minibatch must be at least 1, got {minibatch}")
        if sampler == "mala":
            raise FlatscopeError("MALA needs full-batch gradients to be exact; drop --minibatch or use --sampler sgld")
        if pot.n_samples is None:
            raise FlatscopeError("--minibatch needs a loss over data")

    cpu_gen = torch.Generator().manual_seed(int(seed))
    gen = (
        device_generator
        if device_generator is not None
        else (cpu_gen if pot.device.type == "cpu" else torch.Generator(device=pot.device).manual_seed(int(seed)))
    )

    L0_t, G0 = pot.loss_grad(center[None])
    center_loss = float(L0_t[0])
    if not math.isfinite(center_loss):
        raise FlatscopeError("the loss is not finite at the checkpoint's weights")
    g0 = G0[0]
    gnorm = float(g0.double().norm())
    if lambda_max is None:
        lam = power_lambda_max(pot.hvp_at(center), n, iters=20, dtype=pot.dtype, device=pot.device, generator=cpu_gen)
        lam_src = "power iteration (20 steps)"
    else:
        if not (math.isfinite(lambda_max) and lambda_max >= 0):
            raise FlatscopeError(f"--lambda-max must be non-negative, got {lambda_max}")
        lam, lam_src = float(lambda_max), "given"
    adapt = sampler == "mala" and step_size is None and burn_in > 0
    if step_fraction is None:
        step_fraction = SGLD_STEP_FRACTION[integrator] if sampler == "sgld" else min(1.0, n ** (-1.0 / 3.0))

    warnings: list[str] = []
    K = len(gam)
    order = np.arange(K)[::-1]  # sample from gamma_max down
    runs: dict[int, ChainRun] = {}
    wall = np.zeros(K)
    evals = np.zeros(K, dtype=np.int64)
    noise_ratio = np.full(K, np.nan)
    heating = np.full(K, np.nan)
    lam_used = np.full(K, np.nan)

    def minibatch_noise(states: torch.Tensor) -> tuple[float, float]:
        """(top eigenvalue, trace) of the minibatch gradient's covariance, averaged over the rows of
        ``states``, from 32 draws at each."""
        reps = 32
        tops, traces = [], []
        for w in states:
            _, Gm = pot.minibatch_loss_grad(w[None].expand(reps, n).contiguous(), minibatch, gen)
            Gc = (Gm - Gm.mean(0)).double()
            tops.append(float(torch.linalg.matrix_norm(Gc, ord=2) ** 2 / (reps - 1)))
            traces.append(float(Gc.pow(2).sum() / (reps - 1)))
        return float(np.mean(tops)), float(np.mean(traces))

    noise_center = minibatch_noise(center[None]) if sampler == "sgld" and minibatch else None
    # the two-size minibatch bias estimate: half the chains at m, half at 2m (see the module docstring)
    chain_minibatch = minibatch
    groups = None
    if minibatch is not None and bias_check:
        if chains >= 4:
            half = chains // 2
            chain_minibatch = np.array([minibatch] * half + [2 * minibatch] * (chains - half), dtype=np.int64)
            groups = (np.arange(half), np.arange(half, chains), minibatch, 2 * minibatch)
        else:
            warnings.append(
                f"--minibatch {minibatch} with {chains} chains: the minibatch bias needs at least 4 "
                "chains (two per minibatch size) to be estimated; it is not checked"
            )

    W = None
    prev_gamma = None
    frac = step_fraction
    for k in order:
        g_k = float(gam[k])
        t0 = time.time()
        if W is None or warm_start == "center":
            W = center + torch.randn((chains, n), generator=gen, device=gen.device, dtype=pot.dtype).to(
                pot.device
            ) / math.sqrt(beta * g_k)
        else:
            extra = 1.0 / (beta * g_k) - 1.0 / (beta * prev_gamma)
            W = W + math.sqrt(max(extra, 0.0)) * torch.randn(
                W.shape, generator=gen, device=gen.device, dtype=pot.dtype
            ).to(pot.device)
        # curvature where the chains start (wide q reaches stiffer regions than the center)
        lam_k = lam
        if step_size is None and local_curvature:
            lam_k = max(
                lam,
                power_lambda_max(pot.hvp_at(W[0]), n, iters=10, dtype=pot.dtype, device=pot.device, generator=cpu_gen),
            )
        lam_used[k] = lam_k
        scale = n / (beta * g_k) + gnorm**2 / g_k**2 + float(center.double().pow(2).sum())
        for attempt in range(retries + 1):
            eta = step_size if step_size is not None else frac / (lam_k + g_k)
            try:
                run = run_chains(
                    pot,
                    center,
                    g_k,
                    beta,
                    W,
                    sampler=sampler,
                    step=eta,
                    steps=steps,
                    burn_in=burn_in,
                    minibatch=chain_minibatch,
                    adapt=adapt,
                    lambda_max=lam_k,
                    generator=gen,
                    divergence_scale=scale,
                    progress=progress,
                    integrator=integrator,
                )
                break
            except SamplerDivergence as exc:
                if step_size is not None or attempt == retries:
                    raise
                frac = frac / 4.0
                warnings.append(
                    f"gamma={g_k:.4g}: chains diverged with the automatic step; retried with "
                    f"c={float(np.median(frac)):.3g} ({exc})"
                )
        if sampler == "mala":
            run = _restart_frozen(
                run,
                pot,
                center,
                g_k,
                beta,
                lam_k,
                warnings,
                gen=gen,
                steps=steps,
                burn_in=burn_in,
                adapt=adapt,
                scale=scale,
                integrator=integrator,
            )
        if adapt and run.fraction is not None:
            frac = run.fraction
        runs[k] = run
        W = run.final
        prev_gamma = g_k
        wall[k] = time.time() - t0
        evals[k] = run.grad_evals * chains
        if noise_center is not None:
            # where the chains are: the minibatch noise grows with the loss away from the minimum
            top, trace = minibatch_noise(run.final[:4])
            noise_ratio[k] = run.step * beta * max(top, noise_center[0]) / 2.0
            heating[k] = run.step * trace / 4.0

    # ---------------------------------------------------------------- per-gamma statistics
    def stat(name):
        reps = [_replicates(getattr(runs[k], name)) for k in range(K)]
        return np.array([r.mean() for r in reps]), np.array([_sem(r) for r in reps]), np.stack(reps, 1)

    mean_loss, mean_loss_sem, _ = stat("loss")
    mean_sq, mean_sq_sem, sq_rep = stat("sq_dist")
    vir, vir_sem, vir_rep = stat("virial")
    m_direct_rep = n / beta - gam[None, :] * sq_rep
    dF = -vir / (2 * gam)
    dF_sem = vir_sem / (2 * gam)
    dF_direct = 0.5 * (mean_sq - n / (beta * gam))
    dF_direct_sem = 0.5 * mean_sq_sem
    # ---------------------------------------------------------------- importance sampling
    importance = None
    if is_samples:
        rows = [importance_sampling(pot, center, center_loss, float(gam[k]), beta, is_samples, gen) for k in range(K)]
        importance = {key: np.array([r[key] for r in rows]) for key in rows[0]}
        importance["samples"] = np.int64(is_samples)

    # F(gamma_max): importance sampling when its ESS is adequate there, else the asymptotic tail
    anchor = anchor_err = None
    if importance is not None and importance["ess"][-1] >= max(IS_MIN_ESS, 0.5 * is_samples):
        anchor, anchor_err = float(importance["local_entropy"][-1]), float(importance["local_entropy_err"][-1])
    ti = thermodynamic_integration(gam, vir_rep, center_loss, anchor, anchor_err or 0.0, lam)
    ti_direct = thermodynamic_integration(gam, m_direct_rep, center_loss, anchor, anchor_err or 0.0, lam)
    tail_gap = math.nan
    if anchor is not None:
        tail_gap = anchor - (center_loss + ti["tail"])
        tol = 3 * math.sqrt(anchor_err**2 + (0.5 * vir_sem[-1]) ** 2) + ti["tail_err"]
        if abs(tail_gap) > tol:
            warnings.append(
                f"at gamma_max={gam[-1]:.4g} the asymptotic tail F ~ L + m/2 = "
                f"{center_loss + ti['tail']:.6g} and importance sampling F = {anchor:.6g} differ by "
                f"{tail_gap:.3g} (> {tol:.2g}): the loss "
                "is not yet quadratic at this scale (ReLU kinks, a saturated softmax); F is anchored on "
                "importance sampling"
            )
    elif K > 1 and is_samples:
        warnings.append(
            f"importance sampling at gamma_max={gam[-1]:.4g} has ESS {importance['ess'][-1]:.0f} of "
            f"{is_samples}: F(gamma_max) falls back to the asymptotic tail L + m/2; extend the grid upward"
        )

    mean_params = np.stack([runs[k].mean_params.mean(0).cpu().numpy() for k in range(K)])
    c_np = center.double().cpu().numpy()
    grad = gam[:, None] * (c_np[None, :] - mean_params)
    grad_norm = np.linalg.norm(grad, axis=1)
    gn_err, gn_floor = np.full(K, np.nan), np.full(K, np.nan)
    grad_sem = np.full((K, n), np.nan)
    for k in range(K):
        mp = runs[k].mean_params.cpu().numpy()
        if mp.shape[0] >= 2:
            sem_vec = gam[k] * mp.std(0, ddof=1) / math.sqrt(mp.shape[0])
            grad_sem[k] = sem_vec
            gn_floor[k] = float(np.linalg.norm(sem_vec))
            u = grad[k] / grad_norm[k] if grad_norm[k] > 0 else np.zeros(n)
            gn_err[k] = float(np.sqrt(np.sum(u**2 * sem_vec**2)))

    # ---------------------------------------------------------------- minibatch bias (two sizes)
    bias, bias_sem = {}, {}
    shift_bias = np.full((K, n), np.nan)
    shift_bias_sem = np.full((K, n), np.nan)
    flagged = np.zeros(K, dtype=bool)
    flag_what: list[list[str]] = [[] for _ in range(K)]
    if groups is not None:
        gA, gB, mA, mB = groups
        fac = 0.5 * (1 / mA + 1 / mB) / (1 / mA - 1 / mB)  # bias of the pooled mean per unit (A - B)

        def two(repA, repB):
            d = repA.mean(0) - repB.mean(0)
            sd = np.sqrt(repA.var(0, ddof=1) / len(repA) + repB.var(0, ddof=1) / len(repB))
            return fac * d, fac * sd

        loss_rep = np.stack([runs[k].loss.cpu().numpy().mean(1) for k in range(K)], 1)
        bias["mean_loss"], bias_sem["mean_loss"] = two(loss_rep[gA], loss_rep[gB])
        bias["mean_sq_dist"], bias_sem["mean_sq_dist"] = two(sq_rep[gA], sq_rep[gB])
        tA = thermodynamic_integration(gam, vir_rep[gA], center_loss, anchor, 0.0, lam)
        tB = thermodynamic_integration(gam, vir_rep[gB], center_loss, anchor, 0.0, lam)
        bias["local_entropy"] = fac * (tA["local_entropy"] - tB["local_entropy"])
        bias_sem["local_entropy"] = fac * np.sqrt(tA["mc_err"] ** 2 + tB["mc_err"] ** 2)
        gnA, gnB = np.zeros(K), np.zeros(K)
        for k in range(K):
            mp = runs[k].mean_params.cpu().numpy()
            shift_bias[k] = fac * (mp[gA].mean(0) - mp[gB].mean(0))
            shift_bias_sem[k] = fac * np.sqrt(mp[gA].var(0, ddof=1) / len(gA) + mp[gB].var(0, ddof=1) / len(gB))
            gnA[k] = gam[k] * np.linalg.norm(c_np - mp[gA].mean(0))
            gnB[k] = gam[k] * np.linalg.norm(c_np - mp[gB].mean(0))
        bias["grad_norm"] = fac * (gnA - gnB)
        bias_sem["grad_norm"] = fac * np.sqrt(chains / len(gA) + chains / len(gB)) * gn_err
        errs = {
            "mean_loss": mean_loss_sem,
            "mean_sq_dist": mean_sq_sem,
            "local_entropy": ti["err"],
            "grad_norm": gn_err,
        }
        for q, b in bias.items():
            # flagged: the bias is resolved (beyond twice its own noise) and larger than the error bar
            hit = (np.abs(b) > errs[q]) & (np.abs(b) > 2 * bias_sem[q])
            for k in np.flatnonzero(hit):
                flag_what[k].append(q)
            flagged |= hit

    def total(q, err):
        """The reported error: the Monte Carlo error with the minibatch bias (and its own noise) folded in."""
        if q not in bias:
            return err
        return np.sqrt(err**2 + bias[q] ** 2 + bias_sem[q] ** 2)

    grad_err = (
        grad_sem
        if groups is None
        else np.sqrt(grad_sem**2 + (gam[:, None] * shift_bias) ** 2 + (gam[:, None] * shift_bias_sem) ** 2)
    )

    def diag(fn, name):
        return np.array([fn(getattr(runs[k], name).cpu().numpy()) for k in range(K)])

    rhat = {q: diag(split_rhat, q) for q in ("loss", "sq_dist", "virial")}
    ess = {q: diag(effective_sample_size, q) for q in ("loss", "sq_dist", "virial")}
    accept = np.array([float(runs[k].accept.mean()) for k in range(K)])
    accept_chain = np.stack([runs[k].accept.cpu().numpy() for k in range(K)])
    step = np.array([runs[k].step for k in range(K)])

    # ---------------------------------------------------------------- warnings
    for k in range(K):
        bad = [
            f"R-hat({q}) {rhat[q][k]:.3f} > {RHAT_WARN}"
            for q in ("loss", "virial")
            if np.isfinite(rhat[q][k]) and rhat[q][k] > RHAT_WARN
        ]
        bad += [
            f"ESS({q}) {ess[q][k]:.0f} < {ESS_WARN:.0f}"
            for q in ("loss", "virial")
            if np.isfinite(ess[q][k]) and ess[q][k] < ESS_WARN
        ]
        if bad:
            warnings.append(
                f"gamma={gam[k]:.4g}: chains have not equilibrated or mixed enough ({', '.join(bad)}): "
                "the standard errors there are too small; raise --steps/--burn-in"
            )
        if sampler == "mala" and accept[k] < 0.15:
            warnings.append(
                f"gamma={gam[k]:.4g}: MALA acceptance {accept[k]:.3f} is low; chains barely move (lower --step-size)"
            )
        if flagged[k]:
            what = ", ".join(f"{q} by {bias[q][k]:+.3g} ± {bias_sem[q][k]:.2g}" for q in flag_what[k])
            warnings.append(
                f"gamma={gam[k]:.4g}: minibatch gradient noise biases {what} (estimated from chains at "
                f"minibatch {groups[2]} and {groups[3]}), beyond the reported standard error: raise "
                "--minibatch, lower --step-size, or use --minibatch full"
            )
        elif groups is None and np.isfinite(heating[k]) and heating[k] > mean_loss_sem[k]:
            warnings.append(
                f"gamma={gam[k]:.4g}: minibatch gradient noise heats the chains: it may raise <L>_q by "
                f"up to {heating[k]:.2g} (eta tr Cov(g_minibatch) / 4), more than its standard error "
                f"{mean_loss_sem[k]:.2g} (raise --minibatch, lower --step-size, or use --minibatch full)"
            )
    if sampler == "mala" and np.all(accept < 0.01):
        raise FlatscopeError(
            f"MALA accepted almost no proposal (rate {accept.max():.3g}): the step size is far "
            "too large for this curvature; lower --step-size"
        )
    if chains == 1:
        warnings.append("one chain: standard errors come from batch means of that chain; use --chains >= 2")
    if K == 1:
        warnings.append(
            "one gamma: F rests on the large-gamma tail alone and its error is the whole tail; "
            "give a grid reaching gamma >> lambda_max"
        )
    elif lam > 0 and gam[-1] < 10 * lam:
        warnings.append(
            f"gamma_max={gam[-1]:.3g} is below 10 lambda_max={10 * lam:.3g}: the asymptotic tail "
            "F ~ L + m/2 may be inaccurate; extend the grid upward"
        )

    S = steps
    keep = np.arange(0, S, thin)
    traces = {
        q: np.stack([getattr(runs[k], q).cpu().numpy()[:, keep] for k in range(K)])
        for q in ("loss", "sq_dist", "virial")
    }
    traces["step"] = keep + burn_in

    per_gamma = {
        "mean_loss": mean_loss,
        "mean_loss_sem": mean_loss_sem,
        "mean_loss_err": total("mean_loss", mean_loss_sem),
        "mean_sq_dist": mean_sq,
        "mean_sq_dist_sem": mean_sq_sem,
        "mean_sq_dist_err": total("mean_sq_dist", mean_sq_sem),
        "virial": vir,
        "virial_sem": vir_sem,
        "dF_dgamma": dF,
        "dF_dgamma_sem": dF_sem,
        "dF_dgamma_direct": dF_direct,
        "dF_dgamma_direct_sem": dF_direct_sem,
        "local_entropy": ti["local_entropy"],
        "local_entropy_err": total("local_entropy", ti["err"]),
        "local_entropy_mc_err": ti["mc_err"],
        "local_entropy_quad_err": ti["quad_err"],
        "local_entropy_trapezoid": ti["trapezoid"],
        "quadrature_rule": ti["rule"],
        "local_entropy_direct": ti_direct["local_entropy"],
        "local_entropy_direct_err": ti_direct["err"],
        "tail": np.float64(ti["tail"]),
        "tail_err": np.float64(ti["tail_err"]),
        "tail_gap": np.float64(tail_gap),
        "grad_norm": grad_norm,
        "grad_norm_err": total("grad_norm", gn_err),
        "grad_noise_floor": gn_floor,
        "grad_norm_debiased": np.sqrt(np.maximum(grad_norm**2 - np.nan_to_num(gn_floor) ** 2, 0.0)),
        "step_size": step,
        "step_fraction": step * (lam_used + gam),
        "lambda_local": lam_used,
        "accept_rate": accept,
        "accept_rate_chains": accept_chain,
        "rhat": np.fmax(rhat["loss"], rhat["virial"]),
        "ess": np.fmin(ess["loss"], ess["virial"]),
        "rhat_loss": rhat["loss"],
        "rhat_sq_dist": rhat["sq_dist"],
        "rhat_virial": rhat["virial"],
        "ess_loss": ess["loss"],
        "ess_sq_dist": ess["sq_dist"],
        "ess_virial": ess["virial"],
        "minibatch_noise_ratio": noise_ratio,
        "minibatch_heating": heating,
        "wall_time_s": wall,
        "grad_evals": evals,
        "minibatch_biased": flagged,
    }
    for q in ("mean_loss", "mean_sq_dist", "local_entropy", "grad_norm"):
        per_gamma[f"{q}_bias"] = bias.get(q, np.full(K, np.nan))
        per_gamma[f"{q}_bias_sem"] = bias_sem.get(q, np.full(K, np.nan))
    return LocalEntropyResult(
        gamma=gam,
        beta=beta,
        n_params=n,
        center_loss=center_loss,
        center_grad_norm=gnorm,
        lambda_max=lam,
        lambda_max_source=lam_src,
        sampler=sampler,
        chains=chains,
        steps=steps,
        burn_in=burn_in,
        thin=thin,
        minibatch=minibatch,
        warm_start=warm_start,
        integrator=integrator if sampler == "sgld" else "mala",
        per_gamma=per_gamma,
        vectors={
            "mean_params": mean_params,
            "grad": grad,
            "grad_sem": grad_sem,
            "grad_err": grad_err,
            "mean_shift_bias": shift_bias,
        },
        traces=traces,
        importance=importance,
        warnings=warnings,
        anchor=ti["anchor"],
    )
