"""Langevin samplers for the local-entropy measure, on abstract loss callables.

The target is, for a center ``w``, a coupling ``gamma`` and an inverse temperature ``beta``,

    q_gamma(w' | w)  ∝  exp(-beta L(w') - beta gamma / 2 ||w' - w||^2)

(Chaudhari et al. 2017, Entropy-SGD, arXiv:1611.01838; García Trillos, Kaplan & Sanz-Alonso 2019,
arXiv:1901.10082, eq. 2.6 with tau = 1 / (beta gamma)). Its potential is ``U(w') = beta (L(w') + gamma/2 ||w' - w||^2)``.

Two samplers, both run ``C`` chains at once (rows of a ``(C, dim)`` tensor):

- **SGLD** (Welling & Teh 2011; the inner loop of Entropy-SGD, Algorithm 1 there; Algorithm 3 of the
  García Trillos et al. 2019 with a constant step):

      w' <- w' - eta (g(w') + gamma (w' - w)) + sqrt(2 eta / beta) xi,      xi ~ N(0, I)

  with ``g`` the gradient of the loss on a fresh minibatch per chain and step, drawn with
  replacement (so ``g`` is unbiased and its noise covariance is exactly Cov_i(grad l_i) / m), or
  the full-batch gradient (then SGLD is the unadjusted Langevin algorithm, ULA). ``eta`` is in the
  units of a learning rate; the Langevin time step is ``h = eta / beta``. Entropy-SGD writes the
  noise as ``sqrt(eta') eps xi``: matching ``sqrt(2 eta / beta) = sqrt(eta) eps`` gives
  ``beta = 2 / eps^2`` (``eps = 1e-4`` is ``beta = 2e8``).
  By default the noise enters as ``sqrt(2 eta / beta) (xi_t + xi_{t+1}) / 2`` (the Leimkuhler-Matthews
  scheme, Leimkuhler & Matthews 2013, Appl. Math. Res. Express): the same cost (one gradient and one
  Gaussian vector per step), but second order for averages under the invariant law and, for a
  quadratic loss with exact gradients, an exact stationary variance ``1/(beta a_i)`` at any stable
  step (the Euler update, ``integrator="euler"``, Welling & Teh's and Entropy-SGD's, inflates it by
  ``1/(1 - eta a_i / 2)``). Minibatch gradient noise still heats the chain: by a fraction
  ``eta beta sigma_i^2 / 2`` of the variance in a direction where the minibatch gradient has variance
  ``sigma_i^2``, and on a quadratic it raises <L> by ``eta tr(Cov) / 4``; the analysis reports both.
- **MALA**: the Euler proposal with the full-batch gradient, accepted with the Metropolis-Hastings
  probability, so the chain is exact for any step size (full batch only).

Step-size rule. On a quadratic loss with Hessian eigenvalues lambda_i the update contracts each
direction by ``1 - eta (lambda_i + gamma)``: it is stable iff ``eta (lambda_max + gamma) < 2``, and
Euler's (ULA's) stationary variance in direction i is ``1 / (beta a_i (1 - eta a_i / 2))``, ``a_i =
lambda_i + gamma``, a relative bias ``eta a_i / (2 - eta a_i)`` (none with the LM noise above). The
slowest direction relaxes in about ``1 / (eta gamma)`` steps. flatscope sets

      eta_gamma = c / (lambda_max + gamma)          (Langevin time h = c / (beta (lambda_max + gamma)))

with ``c = 0.25`` for SGLD with LM noise (no variance bias on a quadratic; second order in c
otherwise; measured on the sample MLP against importance sampling) and ``c = 0.1`` with Euler noise
(at most ~5% variance bias, in the stiffest direction), minibatch noise aside, and, for MALA,
``c`` adapted during burn-in toward an acceptance rate of 0.574 (Roberts & Rosenthal 1998) by a
Robbins-Monro recursion on ``log c`` that stops at the end of burn-in (so the kept chain is an exact
MALA chain). ``lambda_max`` is given or estimated by :func:`power_lambda_max` at the center.

Divergence: a chain whose state or loss is not finite, or whose squared distance from the center
exceeds ``1e4 * (dim / (beta gamma) + ||g(w)||^2 / gamma^2 + ||w||^2)`` (far beyond any scale the
target has: the prior's, the mean shift's, the weights'), is flagged; :func:`run_chains` stops and
reports it instead of averaging it.

Measurements are byproducts of each step's gradient: ``L(w')``, ``||d||^2`` and the virial
``d . grad L(w')`` (``d = w' - w``), at every post-burn-in step (with minibatches, the minibatch
loss and gradient: unbiased given the state). Averages use every post-burn-in step (thinning never
lowers the variance of an average; MacEachern & Berliner 1994); ``thin`` selects the stored traces.

Diagnostics: split R-hat and the multi-chain effective sample size (Gelman et al., BDA3 ch. 11;
Geyer's initial monotone sequence), :func:`split_rhat`, :func:`effective_sample_size`.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import grad_and_value, vmap

from .errors import FlatscopeError

SAMPLERS = ("sgld", "mala")
INTEGRATORS = ("lm", "euler")
MALA_TARGET_ACCEPT = 0.574
SGLD_STEP_FRACTION = {"lm": 0.25, "euler": 0.1}
VMAP_MIN_CHAINS = 8
VMAP_MAX_WORK = 2_000_000
DIVERGENCE_FACTOR = 1e4


class SamplerDivergence(FlatscopeError):
    """Chains left every scale of the target (step size too large for the curvature)."""


# ---------------------------------------------------------------------------------------------------
# Potentials: what a sampler needs from a loss
# ---------------------------------------------------------------------------------------------------
class Potential:
    """The loss as the samplers see it: batched over chains (rows of ``W``, shape ``(C, dim)``).

    - ``loss_grad(W) -> (losses (C,) float64, grads (C, dim))``: exact (full batch);
    - ``minibatch_loss_grad(W, m, gen)``: unbiased estimates from ``m`` samples per chain, drawn
      with replacement, independently per chain;
    - ``losses(W) -> (J,) float64``: values only (importance sampling);
    - ``hvp_at(w) -> (v -> H(w) v)`` (for :func:`power_lambda_max`).
    """

    dim: int
    dtype: torch.dtype
    device: torch.device
    n_samples: int | None = None

    def loss_grad(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def minibatch_loss_grad(self, W: torch.Tensor, m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise FlatscopeError("this loss has no data to draw minibatches from; use full-batch gradients")

    def losses(self, W: torch.Tensor) -> torch.Tensor:
        return self.loss_grad(W)[0]

    def hvp_at(self, w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``v -> H(w) v`` (the step-size rule's curvature scale)."""
        raise NotImplementedError


class QuadraticPotential(Potential):
    """``L(c + d) = L0 + g.d + 1/2 d.H d`` around a point ``c`` (explicit matrices; tests, docs)."""

    def __init__(self, H: torch.Tensor, g: torch.Tensor, L0: float = 0.0, point: torch.Tensor | None = None):
        self.H = H
        self.g = g
        self.L0 = float(L0)
        self.dim = int(g.shape[0])
        self.dtype, self.device = g.dtype, g.device
        self.point = torch.zeros_like(g) if point is None else point

    def loss_grad(self, W):
        D = W - self.point
        HD = D @ self.H
        loss = self.L0 + (D @ self.g).double() + 0.5 * (D * HD).sum(-1).double()
        return loss, self.g + HD

    def hvp_at(self, w):
        return lambda v: v @ self.H


def _flat_module(model: torch.nn.Module):
    """A copy of ``model`` whose parameters are views of one flat buffer (written in place per chain)."""
    m = copy.deepcopy(model)
    params = [p for p in m.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    p0 = params[0]
    flat = torch.zeros(n, dtype=p0.dtype, device=p0.device)
    off = 0
    for p in params:
        k = p.numel()
        flat[off : off + k].copy_(p.detach().reshape(-1))
        p.data = flat[off : off + k].view_as(p)
        p.grad = None
        off += k
    return m, params, flat


class ObjectivePotential(Potential):
    """A :class:`flatscope.objective.Objective` as a batched :class:`Potential`.

    Data access goes through the objective's public API only (``obj.batches()``, ``obj.minibatch(idx)``,
    ``obj.batch_loss``, ``obj.module_loss``), so inputs may be any batchable structure.

    ``chain_mode``: ``"vmap"`` pushes all chains through one ``torch.func.vmap`` of
    ``grad_and_value(obj.batch_loss)``; ``"loop"`` runs them one after another through a private
    copy of the model whose parameters are views of one flat buffer (plain autograd, no functorch
    overhead: the fastest single chain); ``"auto"`` (the default) takes ``vmap`` when there are at
    least ``VMAP_MIN_CHAINS`` chains and the work of one chain's call (rows x parameters) is at most
    ``VMAP_MAX_WORK``, ``loop`` otherwise: benchmarks/bench_local_entropy.py measured vmap faster
    only there (functorch's fixed cost per call is amortized over many small chains; large
    full-batch calls are compute-bound and vmap's gathers cost more than the loop). The choice is
    deterministic, so a seed reproduces a run.
    """

    def __init__(self, obj, chain_mode: str = "auto", block: int = 64):
        if chain_mode not in ("auto", "vmap", "loop"):
            raise FlatscopeError(f"unknown chain mode {chain_mode!r}; choose auto, vmap or loop")
        self.obj = obj
        self.dim, self.dtype, self.device = obj.dim, obj.dtype, obj.device
        self.n_samples = obj.n
        self.chain_mode = chain_mode
        self.block = int(block)
        gv = grad_and_value(obj.batch_loss)
        # the cross-process sum of a sharded objective (identity on one process)
        self._reduce = getattr(obj, "_reduce", lambda t: t)
        self._gv_shared = vmap(gv, in_dims=(0, None, None))
        self._gv_own = vmap(gv, in_dims=(0, 0, 0))
        self._fm = None

    def _mode(self, C: int, rows: int) -> str:
        if self.chain_mode != "auto":
            return self.chain_mode
        return "vmap" if C >= VMAP_MIN_CHAINS and rows * self.dim <= VMAP_MAX_WORK else "loop"

    def _loop_one(self, w: torch.Tensor, xb, yb):
        if self._fm is None:
            self._fm = _flat_module(self.obj.model)
        m, params, flat = self._fm
        with torch.no_grad():
            flat.copy_(w)
        loss = self.obj.module_loss(m, xb, yb)
        grads = torch.autograd.grad(loss, params)
        return loss.detach(), torch.cat([g.reshape(-1) for g in grads])

    def loss_grad(self, W):
        obj = self.obj
        C = W.shape[0]
        losses = torch.zeros(C, dtype=torch.float64, device=self.device)
        grads = torch.zeros_like(W)
        mode = self._mode(C, min(getattr(obj, "batch_size", obj.n) or obj.n, obj.n))
        for xb, yb, wt in obj.batches():
            if mode == "vmap":
                g, lo = self._gv_shared(W, xb, yb)
            else:
                pairs = [self._loop_one(W[c], xb, yb) for c in range(C)]
                lo = torch.stack([p[0] for p in pairs])
                g = torch.stack([p[1] for p in pairs])
            losses += wt * lo.double()
            grads += wt * g
        return self._reduce(losses), self._reduce(grads)

    def minibatch_loss_grad(self, W, m, gen):
        obj = self.obj
        C = W.shape[0]
        idx = torch.randint(obj.n, (C, int(m)), generator=gen, device=gen.device).to(obj.device)
        if self._mode(C, int(m)) == "vmap":
            g, lo = self._gv_own(W, *obj.minibatch(idx))
            return lo.double(), g
        if C == 1:
            lo, g = self._loop_one(W[0], *obj.minibatch(idx[0]))
            return lo.double()[None], g[None]
        pairs = [self._loop_one(W[c], *obj.minibatch(idx[c])) for c in range(C)]
        return torch.stack([p[0] for p in pairs]).double(), torch.stack([p[1] for p in pairs])

    def losses(self, W):
        out = [self.obj.evaluate_many(W[i : i + self.block])[0] for i in range(0, W.shape[0], self.block)]
        return torch.cat(out)

    def hvp_at(self, w):
        op = getattr(self.obj, "hvp_operator", None)
        return op(w) if op is not None else (lambda v: self.obj.hvp(v, w))


# ---------------------------------------------------------------------------------------------------
# Curvature scale for the step-size rule
# ---------------------------------------------------------------------------------------------------
def power_lambda_max(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    *,
    iters: int = 20,
    dtype=torch.float32,
    device="cpu",
    generator: torch.Generator | None = None,
) -> float:
    """Largest-magnitude Hessian eigenvalue by ``iters`` power iterations (a lower bound on it).

    Returns ``|lambda|``: the step-size rule needs the stiffness, whatever its sign.
    """
    v = torch.randn(dim, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    v = v / v.norm()
    lam = 0.0
    for _ in range(max(1, iters)):
        hv = matvec(v)
        lam = float(v.double() @ hv.double())
        nrm = float(hv.norm())
        if not math.isfinite(nrm):
            raise FlatscopeError("the Hessian-vector product is not finite at the checkpoint")
        if nrm == 0.0:
            return 0.0
        v = hv / nrm
    return abs(lam)


# ---------------------------------------------------------------------------------------------------
# The chains
# ---------------------------------------------------------------------------------------------------
@dataclass
class ChainRun:
    """Everything one coupling's chains produced (per chain, post-burn-in).

    ``loss``, ``sq_dist``, ``virial``: full traces ``(C, steps)`` (float64) of ``L(w')``,
    ``||w' - w||^2`` and ``(w' - w) . grad L(w')``; ``mean_params``: per-chain mean of ``w'``
    ``(C, dim)`` (float64); ``accept``: per-chain MALA acceptance rate (NaN for SGLD);
    ``final``: the last states (warm starts); ``step``: the step size ``eta`` used after burn-in
    (the median over chains when MALA adapted one per chain); ``chain_step``: per chain ``(C,)``;
    ``fraction``: per-chain eta (lambda_max + gamma) after MALA's adaptation ``(C,)`` (None without it);
    ``minibatch``: per-chain minibatch sizes ``(C,)`` (0: full batch); ``restarted``: chains that
    the analysis restarted because they froze (None: none).
    """

    loss: torch.Tensor
    sq_dist: torch.Tensor
    virial: torch.Tensor
    mean_params: torch.Tensor
    accept: torch.Tensor
    final: torch.Tensor
    step: float
    diverged: torch.Tensor
    grad_evals: int
    fraction: np.ndarray | None = None
    chain_step: np.ndarray | None = None
    minibatch: np.ndarray | None = None
    restarted: np.ndarray | None = None


def run_chains(
    potential: Potential,
    center: torch.Tensor,
    gamma: float,
    beta: float,
    init: torch.Tensor,
    *,
    sampler: str = "sgld",
    step,
    steps: int,
    burn_in: int = 0,
    minibatch=None,
    adapt: bool = False,
    lambda_max: float | None = None,
    generator: torch.Generator,
    divergence_scale: float | None = None,
    progress: Callable[[int], None] | None = None,
    check_every: int = 100,
    integrator: str = "lm",
) -> ChainRun:
    """Run ``init.shape[0]`` chains targeting ``q_gamma(. | center)`` for ``burn_in + steps`` steps.

    ``step`` is eta (learning-rate units): one number, or (MALA) one per chain. ``minibatch``: None
    (full batch), one size, or (SGLD) one size per chain (chains with equal sizes must be
    contiguous: the two-size minibatch bias estimate runs half the chains at ``m`` and half at
    ``2m``). ``integrator`` (SGLD): ``euler`` or ``lm`` (see the module docstring). With ``adapt``
    (MALA only) each chain's ``log(eta (lambda_max + gamma))`` follows its own Robbins-Monro
    recursion toward acceptance 0.574 during burn-in (a chain whose warm start lands in a stiffer
    region than the others shrinks its own step instead of freezing; each kept chain is still an
    exact MALA chain, with a fixed step). ``divergence_scale``
    is the squared-distance scale of the divergence test (see the module docstring); a divergence
    raises :class:`SamplerDivergence` naming the chains, the coupling and the step.
    """
    if sampler not in SAMPLERS:
        raise FlatscopeError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if integrator not in INTEGRATORS:
        raise FlatscopeError(f"unknown integrator {integrator!r}; choose from {', '.join(INTEGRATORS)}")
    C, n = init.shape
    sizes = None if minibatch is None else np.broadcast_to(np.asarray(minibatch, dtype=np.int64), (C,)).copy()
    if sizes is not None and np.all(sizes == 0):
        sizes = None
    if sampler == "mala" and sizes is not None:
        raise FlatscopeError("MALA is exact only with full-batch gradients; drop --minibatch or use --sampler sgld")
    if sizes is not None and np.any(sizes < 1):
        raise FlatscopeError(f"minibatch sizes must be at least 1, got {sorted(set(sizes.tolist()))}")
    if steps < 1:
        raise FlatscopeError(f"the number of sampling steps must be at least 1, got {steps}")
    steps_in = np.broadcast_to(np.asarray(step, dtype=np.float64), (C,))
    if not (gamma > 0 and beta > 0 and np.all(steps_in > 0)):
        raise FlatscopeError(f"gamma, beta and the step size must be positive (got {gamma}, {beta}, {step})")
    if sampler == "sgld" and not np.all(steps_in == steps_in[0]):
        raise FlatscopeError("SGLD runs every chain with one step size")
    dev, dt = init.device, init.dtype
    gen = generator
    W = init.clone()
    f64 = torch.float64
    eta = float(steps_in[0])  # SGLD: one step
    eta_c = torch.as_tensor(steps_in.copy(), dtype=f64, device=dev)  # MALA: one per chain
    scale = lambda_max + gamma if (adapt and lambda_max is not None) else None
    thresh = DIVERGENCE_FACTOR * (divergence_scale if divergence_scale is not None else n / (beta * gamma))
    # contiguous groups of chains sharing a minibatch size
    groups = []
    if sizes is not None:
        cuts = [0] + [i for i in range(1, C) if sizes[i] != sizes[i - 1]] + [C]
        groups = [(int(sizes[a]), slice(a, b)) for a, b in itertools.pairwise(cuts)]

    def minibatch_grad(W):
        if len(groups) == 1:
            return potential.minibatch_loss_grad(W, groups[0][0], gen)
        parts = [potential.minibatch_loss_grad(W[sl], m, gen) for m, sl in groups]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    rec_L, rec_sq, rec_vir = [], [], []
    sum_w = torch.zeros(C, n, dtype=torch.float64, device=dev)
    acc_sum = torch.zeros(C, dtype=torch.float64, device=dev)

    def noise(shape):
        return torch.randn(shape, generator=gen, device=gen.device, dtype=dt).to(dev)

    def check(t_done, L):
        D = W - center
        sq = (D * D).sum(-1, dtype=f64)
        bad = ~torch.isfinite(L) | ~torch.isfinite(sq) | (sq > thresh)
        if bool(bad.any()):
            _raise_divergence(bad, gamma, eta if sampler == "sgld" else float(eta_c.max()), lambda_max, t_done, sampler)

    if sampler == "mala":
        L, G = potential.loss_grad(W)
    lm = sampler == "sgld" and integrator == "lm"
    xi_prev = noise((C, n)) if lm else None
    total = burn_in + steps
    pending = 0
    for t in range(total):
        if sampler == "sgld":
            L, G = minibatch_grad(W) if groups else potential.loss_grad(W)
        D = W - center
        if t >= burn_in:
            rec_L.append(L)
            rec_sq.append(torch.linalg.vecdot(D, D))
            rec_vir.append(torch.linalg.vecdot(D, G))
            sum_w += W
        xi = noise((C, n))
        if sampler == "sgld":
            sd = math.sqrt(2.0 * eta / beta)
            # w' <- w' - eta (g + gamma (w' - w)) + sqrt(2 eta / beta) xi, in place; LM: xi -> (xi_t + xi_t+1)/2
            W.add_(G, alpha=-eta).add_(D, alpha=-eta * gamma)
            if lm:
                W.add_(xi_prev, alpha=0.5 * sd).add_(xi, alpha=0.5 * sd)
                xi_prev = xi
            else:
                W.add_(xi, alpha=sd)
        else:
            ec = eta_c.to(dt)[:, None]
            Y = W - ec * (G + gamma * D) + torch.sqrt(2.0 * ec / beta) * xi
            LY, GY = potential.loss_grad(Y)
            DY = Y - center
            U_x = beta * (L + 0.5 * gamma * (D * D).sum(-1, dtype=f64))
            U_y = beta * (LY + 0.5 * gamma * (DY * DY).sum(-1, dtype=f64))
            back = W - Y + ec * (GY + gamma * DY)
            log_fwd = -0.5 * (xi * xi).sum(-1, dtype=f64)
            log_back = -beta * (back * back).sum(-1, dtype=f64) / (4.0 * eta_c)
            log_alpha = U_x - U_y + log_back - log_fwd
            log_alpha = torch.where(torch.isfinite(log_alpha), log_alpha, torch.full_like(log_alpha, -math.inf))
            u = torch.rand(C, generator=gen, device=gen.device, dtype=f64).to(dev)
            accept = torch.log(u) < log_alpha
            W = torch.where(accept[:, None], Y, W)
            L = torch.where(accept, LY, L)
            G = torch.where(accept[:, None], GY, G)
            if t >= burn_in:
                acc_sum += accept
            elif adapt and scale is not None:
                rate = torch.exp(torch.clamp(log_alpha, max=0.0))  # per chain
                kappa = 1.0 / (t + 1.0) ** 0.6
                c = torch.clamp(torch.exp(torch.log(eta_c * scale) + kappa * (rate - MALA_TARGET_ACCEPT)), max=4.0)
                eta_c = c / scale
        pending += 1
        if progress is not None and (pending == 10 or t == total - 1):
            progress(pending)
            pending = 0
        if (t + 1) % check_every == 0:
            check(t + 1, L)
    tr_loss = torch.stack(rec_L, 1).to(f64)
    tr_sq = torch.stack(rec_sq, 1).to(f64)
    tr_vir = torch.stack(rec_vir, 1).to(f64)
    check(total, L)
    bad = ~(torch.isfinite(tr_loss).all(1) & torch.isfinite(tr_vir).all(1))
    if bool(bad.any()):
        _raise_divergence(bad, gamma, eta if sampler == "sgld" else float(eta_c.max()), lambda_max, total, sampler)
    grad_evals = total + (1 if sampler == "mala" else 0)
    chain_step = eta_c.cpu().numpy() if sampler == "mala" else np.full(C, eta)
    return ChainRun(
        loss=tr_loss,
        sq_dist=tr_sq,
        virial=tr_vir,
        mean_params=sum_w / steps,
        accept=(acc_sum / steps) if sampler == "mala" else torch.full((C,), math.nan, dtype=f64),
        final=W,
        step=float(np.median(chain_step)),
        diverged=bad.cpu(),
        grad_evals=grad_evals,
        fraction=chain_step * scale if scale is not None else None,
        chain_step=chain_step,
        minibatch=sizes if sizes is not None else np.zeros(C, dtype=np.int64),
    )


def _raise_divergence(bad, gamma, eta, lambda_max, step_no, sampler):
    which = [int(i) for i in torch.nonzero(bad).flatten().tolist()]
    limit = (
        f" (the stability limit is eta < 2/(lambda_max + gamma) = {2 / (lambda_max + gamma):.3g})"
        if lambda_max is not None
        else ""
    )
    raise SamplerDivergence(
        f"{sampler.upper()} chain(s) {which} diverged at gamma={gamma:.4g} after {step_no} steps with step size "
        f"eta={eta:.4g}{limit}; lower --step-size"
    )


# ---------------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------------
def split_rhat(x: np.ndarray) -> float:
    """Split R-hat of traces ``x`` of shape ``(chains, steps)`` (BDA3 eq. 11.4 on split chains).

    Each chain is cut into halves (the middle draw dropped when odd), so a drifting chain (not yet
    equilibrated) raises R-hat even with one chain. NaN for fewer than 4 draws or no variance.
    """
    x = np.asarray(x, dtype=np.float64)
    _, S = x.shape
    half = S // 2
    if half < 2:
        return math.nan
    y = np.concatenate([x[:, :half], x[:, S - half :]], axis=0)
    m = y.shape[1]
    means = y.mean(1)
    W = y.var(1, ddof=1).mean()
    B = m * means.var(ddof=1)
    if not np.isfinite(W) or W <= 0:
        return math.nan
    var_plus = (m - 1) / m * W + B / m
    return float(np.sqrt(var_plus / W))


def _autocov(x: np.ndarray) -> np.ndarray:
    """Biased autocovariance of each row, by FFT."""
    S = x.shape[-1]
    xc = x - x.mean(-1, keepdims=True)
    nfft = 1 << (2 * S - 1).bit_length()
    f = np.fft.rfft(xc, n=nfft, axis=-1)
    ac = np.fft.irfft(f * np.conj(f), n=nfft, axis=-1)[..., :S]
    return ac / S


def effective_sample_size(x: np.ndarray) -> float:
    """Multi-chain effective sample size of traces ``(chains, steps)`` (BDA3 sec. 11.5, Geyer's
    initial monotone sequence). NaN for fewer than 4 draws or no variance."""
    x = np.asarray(x, dtype=np.float64)
    C, S = x.shape
    if S < 4:
        return math.nan
    ac = _autocov(x)
    chain_var = ac[:, 0] * S / (S - 1)
    W = chain_var.mean()
    var_plus = W * (S - 1) / S + (x.mean(1).var(ddof=1) if C > 1 else 0.0)
    if not np.isfinite(var_plus) or var_plus <= 0:
        return math.nan
    rho = 1.0 - (W - ac.mean(0)) / var_plus
    rho[0] = 1.0
    tau = -1.0
    prev = math.inf
    for k in range(0, S - 1, 2):
        p = rho[k] + rho[k + 1]
        if p < 0:
            break
        p = min(p, prev)
        prev = p
        tau += 2.0 * p
    tau = max(tau, 1.0 / math.log10(max(C * S, 10)))
    return float(C * S / tau)
