"""Sharpness as a measurement: worst-case and average-case loss rise in a (scaled) ball around ``w``.

Definitions (Andriushchenko et al. 2023, *A modern look at the relationship between sharpness and
generalization*, arXiv:2302.07011; Foret et al. 2021, *Sharpness-aware minimization*,
arXiv:2010.01412; Kwon et al. 2021, *ASAM*, arXiv:2102.11600). With ``L_S`` the mean loss over a
set of samples ``S`` and ``c`` a positive scale vector::

    worst-case   S_max(ρ) = max_{‖δ ⊘ c‖_p ≤ ρ} L_S(w + δ) − L_S(w)
    average-case S_avg(ρ) = E_u [ L_S(w + c ⊙ u) ] − L_S(w)

- ``norm``: ``p = 2`` (``l2``) or ``p = ∞`` (``linf``).
- ``adaptive`` (the default): ``c = |w| + η`` elementwise, so the ball is ``{δ: ‖δ ⊘ (|w|+η)‖_p ≤ ρ}``
  (ASAM's ball with ``η = 0.01``; Andriushchenko et al.'s with ``η = 0``, the default here). With
  ``η = 0`` the measure is exactly invariant to the rescalings that leave the network's function
  unchanged (a ReLU layer's weights times ``a``, the next layer's times ``1/a``); a weight that is
  exactly 0 then cannot move. Standard (``adaptive=False``): ``c = 1``, an absolute ball.
- ``params``: entries outside the mask (``ParamLayout.mask``) have ``c = 0``: they are not perturbed.
- m-sharpness (``m``): the split is cut into ``⌊N/m⌋`` disjoint sub-batches of ``m`` samples (a seeded
  permutation, each sub-batch's indices sorted; the remaining ``N mod m`` samples are left out) and
  the worst case is the mean over sub-batches of each sub-batch's own maximum, with its standard error
  (sample s.d., ``ddof=1``, over the square root of the number of sub-batches). ``m = N`` is the
  full-batch worst case, computation for computation. Without ``m`` the maximum is over the whole split.

Worst case, by projected gradient ascent in the scaled variable ``u = δ ⊘ c`` (the ball is then the
plain ``‖u‖_p ≤ ρ``, and ``∇_u L = c ⊙ ∇L``). Each step moves by ``α`` along the steepest-ascent
direction of the norm (``∇_u / ‖∇_u‖₂`` for ℓ2, ``sign ∇_u`` for ℓ∞), projects back onto the ball
(rescaling for ℓ2, clipping for ℓ∞) and evaluates the loss and gradient there (one gradient
evaluation per step). The step is kept if the loss rose, else it is undone and ``α`` halved; ``α``
starts at ``step_size · ρ``. The reported value is therefore a loss actually reached at a feasible
point: a lower bound on the true maximum, never above it. Restart 0 starts at ``δ = 0`` (its first
ℓ2 step is SAM's ascent step); restarts 1, 2, ... start at a random point (ℓ2: uniform on the sphere
``‖u‖₂ = ρ``; ℓ∞: uniform in the cube), restart ``r`` drawn from a generator seeded by
``(seed, r)``, the same for every ρ and sub-batch. Restart 0 starts at random too if the gradient at
``w`` is exactly zero. Reported: the best over restarts and their spread (max − min), the loss
reached, the error rate there, ``‖u‖_p / ρ`` (1 on the boundary) and ``‖δ‖₂``.

Average case: ``n`` draws ``u_j`` (common random numbers: ``u_j(ρ) = ρ ũ_j`` for every ρ), over the
whole split, mean and standard error of ``L(w + c ⊙ u_j) − L(w)``:

- ``surface`` (default): uniform on the ball's boundary: ℓ2 ``ũ = z / ‖z‖₂``, z Gaussian; ℓ∞ a
  uniform point ``v`` of the cube radially projected, ``ũ = v / ‖v‖_∞`` (uniform on the cube's surface).
- ``gaussian``: ``u ~ N(0, s² I)`` with ``s² = ρ²/d`` for ℓ2 (``E‖u‖₂² = ρ²``, the sphere's) and
  ``s² = ρ²/3`` for ℓ∞ (the cube's per-coordinate variance), ``d`` the number of perturbed entries.
  Andriushchenko et al.'s average-case sharpness at their radius ``ρ'`` (``s = ρ'``) is this at
  ``ρ = ρ' √d`` (ℓ2).

The quantity averaged is ``value_fn(w)`` (default: the split's mean loss); a caller may pass any
``value_fn(w) -> float`` (a task metric). Its value is checked: an exception, a non-scalar or a
non-finite value is a :class:`FlatscopeError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from . import curves_json
from ..errors import FlatscopeError
from ..grids import parse_grid
from ..objective import Objective
from .local_energy import draw_normal

NORMS = ("l2", "linf")
AVERAGES = ("surface", "gaussian")
DEFAULT_RHO = "0.01..1:5"
_ON_SPHERE_RTOL = 1e-5


def parse_rhos(spec: str) -> np.ndarray:
    """The ``--rho`` grid: sorted distinct radii ρ > 0 (grammar: :mod:`flatscope.grids`).

    >>> parse_rhos("0.01..1:3").round(3).tolist()
    [0.01, 0.1, 1.0]
    """
    return parse_grid(spec, option="--rho", symbol="ρ", positive=True)[0]


def scale_vector(w0: torch.Tensor, mask: torch.Tensor, adaptive: bool, eta: float) -> torch.Tensor:
    """``c``: ``(|w| + η) ⊙ mask`` (adaptive) or ``mask`` (standard), in ``w0``'s dtype and device."""
    m = mask.to(device=w0.device, dtype=w0.dtype)
    return (w0.abs() + eta) * m if adaptive else m


def checked(value_fn: Callable[[torch.Tensor], float], what: str = "the metric function") -> Callable:
    """``value_fn`` with its output checked: a finite scalar, else one clear :class:`FlatscopeError`."""

    def call(w: torch.Tensor, where: str = "") -> float:
        try:
            v = value_fn(w)
        except FlatscopeError:
            raise
        except Exception as exc:  # noqa: BLE001  (a user function: any failure becomes one line)
            raise FlatscopeError(f"{what} raised {type(exc).__name__}{where}: {exc}") from None
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        arr = np.asarray(v)
        if arr.dtype == object or arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
            raise FlatscopeError(
                f"{what} must return one number{where}, got {type(v).__name__} of shape {list(arr.shape)}"
            )
        x = float(arr.reshape(()))
        if not math.isfinite(x):
            raise FlatscopeError(f"{what} returned {x}{where}")
        return x

    return call


# ---------------------------------------------------------------------------------- ascent
def _ball_norm(u: torch.Tensor, norm: str) -> float:
    return float(u.abs().max()) if norm == "linf" else float(torch.linalg.vector_norm(u))


def _project(u: torch.Tensor, rho: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return u.clamp(-rho, rho)
    n = float(torch.linalg.vector_norm(u))
    return u * (rho / n) if n > rho else u


def _direction(gu: torch.Tensor, norm: str) -> torch.Tensor | None:
    """Steepest ascent of unit norm for the ball's norm, or None if the gradient is zero."""
    if norm == "linf":
        d = gu.sign()
        return d if bool(d.any()) else None
    n = float(torch.linalg.vector_norm(gu))
    return gu / n if n > 0 else None


def random_start(
    dim: int, mask: torch.Tensor, rho: float, norm: str, seed: int, r: int, dtype=torch.float64
) -> torch.Tensor:
    """The start of restart ``r``: uniform on the ℓ2 sphere or in the ℓ∞ cube of radius ρ, on the mask."""
    z = draw_normal(seed, r, r + 1, dim, dtype=torch.float64)[0]
    m = mask.to(torch.float64)
    if norm == "linf":
        u = (2.0 * torch.special.ndtr(z) - 1.0) * rho * m
    else:
        zm = z * m
        u = zm * (rho / float(torch.linalg.vector_norm(zm)))
    return u.to(dtype)


@dataclass
class Ascent:
    """One restart's result: the loss reached (``loss``) at ``u`` (``δ = c ⊙ u``)."""

    loss: float
    u: torch.Tensor
    accepted: int
    evaluations: int


def ascend(
    obj: Objective,
    c: torch.Tensor,
    rho: float,
    u0: torch.Tensor,
    start: tuple[float, torch.Tensor],
    *,
    norm: str,
    steps: int,
    step_size: float,
) -> Ascent:
    """Projected gradient ascent of ``L(w0 + c ⊙ u)`` over ``‖u‖_p ≤ ρ`` from ``u0`` (module docstring).

    ``start`` is ``(loss, gradient)`` of ``obj`` at ``w0 + c ⊙ u0``.
    """
    w0 = obj.w0
    u = u0
    loss, g = start
    gu = c * g
    alpha = step_size * rho
    accepted = evals = 0
    for _ in range(steps):
        d = _direction(gu, norm)
        if d is None or alpha <= rho * 1e-12:
            break
        un = _project(u + alpha * d, rho, norm)
        ln, gn = obj.loss_and_grad(w0 + c * un)
        evals += 1
        if math.isfinite(ln) and ln > loss:
            u, loss, gu = un, ln, c * gn
            accepted += 1
        else:
            alpha *= 0.5
    return Ascent(loss, u, accepted, evals)


@dataclass
class WorstCase:
    """Worst case at one ρ on one set of samples, every restart kept."""

    base_loss: float
    base_error: float
    restarts: np.ndarray  # (R,) L(w + δ_r) − L(w), the loss rise reached by each restart
    best: int
    loss: float  # L(w + δ*) at the best restart
    error: float  # error rate at w + δ* (NaN for regression)
    ball_norm: float  # ‖u*‖_p / ρ  (1 on the boundary)
    delta_norm: float  # ‖δ*‖₂
    evaluations: int
    value: float = math.nan  # value_fn(w + δ*) − value_fn(w) (NaN without value_fn)

    @property
    def sharpness(self) -> float:
        return float(self.restarts[self.best])


def worst_case(
    obj: Objective,
    rho: float,
    *,
    c: torch.Tensor,
    mask: torch.Tensor,
    norm: str = "l2",
    steps: int = 20,
    step_size: float = 1.0,
    restarts: int = 1,
    seed: int = 0,
    base: tuple[float, float, torch.Tensor] | None = None,
    value_fn: Callable | None = None,
    value_base: float | None = None,
) -> WorstCase:
    """``max_{‖u‖_p ≤ ρ} L(w0 + c ⊙ u) − L(w0)`` on ``obj`` by projected gradient ascent with restarts.

    ``base``: ``(loss, error, gradient)`` at ``w0`` if already known.
    """
    w0 = obj.w0
    if base is None:
        l0, acc0 = obj.evaluate(w0)
        base = (l0, 1.0 - acc0, obj.grad(w0))
    l0, e0, g0 = base
    results, evals = [], 0
    for r in range(restarts):
        if r == 0 and _direction(c * g0, norm) is not None:
            u0, start = torch.zeros_like(w0), (l0, g0)
        else:
            u0 = random_start(w0.numel(), mask, rho, norm, seed, r, dtype=w0.dtype).to(w0.device)
            start = obj.loss_and_grad(w0 + c * u0)
            evals += 1
        a = ascend(obj, c, rho, u0, start, norm=norm, steps=steps, step_size=step_size)
        evals += a.evaluations
        results.append(a)
    losses = np.array([a.loss for a in results], dtype=np.float64)
    best = int(np.argmax(losses))
    u = results[best].u
    w_star = w0 + c * u
    loss_star, acc_star = obj.evaluate(w_star)
    value = math.nan
    if value_fn is not None:
        value = value_fn(w_star, f" at the worst-case point for ρ = {rho:g}") - value_base
    return WorstCase(
        base_loss=l0,
        base_error=e0,
        restarts=losses - l0,
        best=best,
        loss=loss_star,
        error=(1.0 - acc_star),
        ball_norm=_ball_norm(u, norm) / rho,
        delta_norm=float(torch.linalg.vector_norm(c * u)),
        evaluations=evals + 1,
        value=value,
    )


# ---------------------------------------------------------------------------------- average case
def average_directions(
    dim: int, mask: torch.Tensor, norm: str, average: str, samples: int, seed: int, dtype=torch.float64
) -> torch.Tensor:
    """``ũ_j`` (rows, shape ``(samples, dim)``): the average-case draws at ρ = 1 (module docstring).

    Draw ``j`` comes from the generator seeded by ``(seed + 1, j)``, independent of the restarts' starts.
    """
    z = draw_normal(int(seed) + 1, 0, samples, dim, dtype=torch.float64)
    m = mask.to(torch.float64)
    d = float(m.sum())
    if average == "gaussian":
        u = z * m / (math.sqrt(d) if norm == "l2" else math.sqrt(3.0))
    elif norm == "l2":
        zm = z * m
        u = zm / torch.linalg.vector_norm(zm, dim=1, keepdim=True)
    else:
        v = (2.0 * torch.special.ndtr(z) - 1.0) * m
        u = v / v.abs().amax(dim=1, keepdim=True)
    return u.to(dtype)


# ---------------------------------------------------------------------------------- results
def _mean_sem(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64)
    if x.size < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


@dataclass
class SplitSharpness:
    """Sharpness curves on one split. Arrays are indexed ``[ρ]``, ``[ρ, sub-batch]`` or ``[ρ, sub-batch, restart]``."""

    split: str
    base_loss: float
    base_error: float
    n_used: int  # samples in the sub-batches (all of the split without m)
    worst_restarts: np.ndarray  # (n_rho, K, R) loss rise per restart
    worst_loss: np.ndarray  # (n_rho, K) loss reached at the best restart
    worst_error: np.ndarray  # (n_rho, K) error-rate rise there
    ball_norm: np.ndarray  # (n_rho, K) ‖u*‖_p / ρ
    delta_norm: np.ndarray  # (n_rho, K) ‖δ*‖₂
    evaluations: int
    worst_value: np.ndarray | None = None  # (n_rho, K) value_fn rise at δ*, when a value_fn was given
    average_draws: np.ndarray | None = None  # (n_rho, n) value_fn(w + c ⊙ u_j) − value_fn(w)

    @property
    def per_batch(self) -> np.ndarray:
        """(n_rho, K): each sub-batch's worst case (the best over restarts)."""
        return self.worst_restarts.max(axis=2)

    @property
    def worst(self) -> np.ndarray:
        return self.per_batch.mean(axis=1)

    @property
    def worst_sem(self) -> np.ndarray:
        return np.array([_mean_sem(row)[1] for row in self.per_batch])

    @property
    def restart_spread(self) -> np.ndarray:
        """(n_rho,): max − min over restarts, averaged over sub-batches."""
        r = self.worst_restarts
        return (r.max(axis=2) - r.min(axis=2)).mean(axis=1)

    @property
    def on_sphere(self) -> np.ndarray:
        """(n_rho, K): whether δ* lies on the ball's boundary (``‖u*‖_p ≥ ρ (1 − 1e-5)``)."""
        return self.ball_norm >= 1.0 - _ON_SPHERE_RTOL

    @property
    def average(self) -> np.ndarray | None:
        return None if self.average_draws is None else self.average_draws.mean(axis=1)

    @property
    def average_sem(self) -> np.ndarray | None:
        if self.average_draws is None:
            return None
        return np.array([_mean_sem(row)[1] for row in self.average_draws])

    def to_tree(self) -> dict:
        t = {
            "base_loss": self.base_loss,
            "base_error": self.base_error,
            "n_used": self.n_used,
            "evaluations": self.evaluations,
            "worst": self.worst,
            "worst_sem": self.worst_sem,
            "worst_per_batch": self.per_batch,
            "worst_restarts": self.worst_restarts,
            "restart_spread": self.restart_spread,
            "worst_loss": self.worst_loss,
            "worst_error": self.worst_error,
            "ball_norm": self.ball_norm,
            "delta_norm": self.delta_norm,
            "on_sphere": self.on_sphere,
        }
        if self.worst_value is not None:
            t["worst_value"] = self.worst_value
        if self.average_draws is not None:
            t.update(average=self.average, average_sem=self.average_sem, average_draws=self.average_draws)
        return t

    def to_json(self) -> dict:
        out = {
            "base_loss": self.base_loss,
            "base_error": self.base_error,
            "n_used": self.n_used,
            "worst": self.worst,
            "worst_sem": self.worst_sem,
            "restart_spread": self.restart_spread,
            "worst_loss": self.worst_loss.mean(axis=1),
            "worst_error": self.worst_error.mean(axis=1),
            "ball_norm": self.ball_norm.mean(axis=1),
            "delta_norm": self.delta_norm.mean(axis=1),
            "on_sphere": self.on_sphere.mean(axis=1),
            "evaluations": self.evaluations,
        }
        if self.worst_value is not None:
            out["worst_value"] = self.worst_value.mean(axis=1)
        if self.average_draws is not None:
            out.update(average=self.average, average_sem=self.average_sem)
        return out


@dataclass
class SharpnessResult:
    rho: np.ndarray
    norm: str
    adaptive: bool
    eta: float
    params: str
    steps: int
    step_size: float
    restarts: int
    m: int | None
    average: str
    samples: int
    seed: int
    n_perturbed: int
    curves: dict[str, SplitSharpness] = field(default_factory=dict)

    def _meta(self) -> dict:
        return {
            "rho": self.rho,
            "norm": self.norm,
            "adaptive": np.bool_(self.adaptive),
            "eta": self.eta,
            "params": self.params,
            "steps": self.steps,
            "step_size": self.step_size,
            "restarts": self.restarts,
            "m": 0 if self.m is None else self.m,
            "average_mode": self.average,
            "samples": self.samples,
            "seed": self.seed,
            "n_perturbed": self.n_perturbed,
        }

    def to_tree(self) -> dict:
        tree = dict(self._meta(), splits=",".join(self.curves))
        for name, c in self.curves.items():
            tree[name] = c.to_tree()
        return tree

    def summary(self) -> dict:
        """Headline numbers at the largest ρ, ``<split>_<name>``: base_loss, base_error,
        worst_at_rho_max (and its worst_sem_at_rho_max over sub-batches), worst_error_at_rho_max (the
        error-rate rise at δ*), restart_spread_at_rho_max, on_sphere_at_rho_max (the fraction of
        sub-batches whose δ* lies on the boundary), average_at_rho_max with average_sem_at_rho_max,
        and worst_over_average_at_rho_max."""
        out: dict = {"rho_max": float(self.rho[-1])}
        for name, c in self.curves.items():
            out[f"{name}_base_loss"] = c.base_loss
            out[f"{name}_base_error"] = c.base_error
            out[f"{name}_worst_at_rho_max"] = float(c.worst[-1])
            out[f"{name}_worst_sem_at_rho_max"] = float(c.worst_sem[-1])
            out[f"{name}_worst_error_at_rho_max"] = float(c.worst_error[-1].mean())
            out[f"{name}_restart_spread_at_rho_max"] = float(c.restart_spread[-1])
            out[f"{name}_on_sphere_at_rho_max"] = float(c.on_sphere[-1].mean())
            avg = c.average
            out[f"{name}_average_at_rho_max"] = float(avg[-1]) if avg is not None else math.nan
            sem = c.average_sem
            out[f"{name}_average_sem_at_rho_max"] = float(sem[-1]) if avg is not None and sem is not None else math.nan
            ratio = float(c.worst[-1] / avg[-1]) if avg is not None and avg[-1] > 0 else math.nan
            out[f"{name}_worst_over_average_at_rho_max"] = ratio
        return out

    def to_json(self) -> dict:
        out = {k: v for k, v in self._meta().items()}
        out["m"] = self.m
        out.update(curves_json(self.curves))
        return out


def summary_keys(splits) -> list[str]:
    """The keys of :meth:`SharpnessResult.summary` for these splits (known before computing)."""
    z = np.zeros((1, 1))
    curves = {
        s: SplitSharpness(s, 0.0, 0.0, 0, np.zeros((1, 1, 1)), z, z, z, z, 0, average_draws=np.zeros((1, 2)))
        for s in splits
    }
    res = SharpnessResult(np.ones(1), "l2", True, 0.0, "all", 1, 1.0, 1, None, "surface", 2, 0, 0, curves)
    return list(res.summary())


# ---------------------------------------------------------------------------------- entry point
def sub_batches(n: int, m: int, seed: int) -> list[np.ndarray]:
    """``⌊n/m⌋`` disjoint sub-batches of ``m`` indices from a permutation seeded by ``seed``, each sorted."""
    perm = np.random.default_rng([int(seed) % 2**63, 0x5AB]).permutation(n)
    return [np.sort(perm[k * m : (k + 1) * m]) for k in range(n // m)]


def check_options(*, norm: str, steps, step_size, restarts, eta, average: str, samples, m) -> None:
    """The checks of :func:`sharpness` that need no data."""
    if norm not in NORMS:
        raise FlatscopeError(f"unknown --norm {norm!r}; choose from {', '.join(NORMS)}")
    if average not in AVERAGES:
        raise FlatscopeError(f"unknown --average {average!r}; choose from {', '.join(AVERAGES)}")
    if int(steps) != steps or steps < 1:
        raise FlatscopeError(f"--steps must be a whole number of at least 1, got {steps}")
    if int(restarts) != restarts or restarts < 1:
        raise FlatscopeError(f"--restarts must be a whole number of at least 1, got {restarts}")
    if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
        raise FlatscopeError(f"--step-size must be a positive number (a fraction of ρ), got {step_size}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise FlatscopeError(f"--eta must be a non-negative number, got {eta}")
    if int(samples) != samples or samples < 0 or samples == 1:
        raise FlatscopeError(
            f"--samples must be 0 (no average case) or a whole number of at least 2 (the "
            f"standard error needs two draws), got {samples}"
        )
    if m is not None and (int(m) != m or m < 1):
        raise FlatscopeError(f"--m must be a whole number of at least 1, got {m}")


def sharpness(
    objectives: Objective | Mapping[str, Objective],
    rhos,
    *,
    norm: str = "l2",
    adaptive: bool = True,
    eta: float = 0.0,
    params: str = "all",
    steps: int = 20,
    step_size: float = 1.0,
    restarts: int = 1,
    m: int | None = None,
    average: str = "surface",
    samples: int = 16,
    seed: int = 0,
    value_fn: Callable[[torch.Tensor], float] | None = None,
    progress: Callable[[int], None] | None = None,
) -> SharpnessResult:
    """Worst-case and average-case sharpness at every ρ on every split (module docstring).

    ``objectives``: one :class:`Objective` (split ``"train"``) or ``{split: Objective}`` over the same
    model. ``value_fn(w) -> float``: what the average case averages and what is reported at each
    worst-case point (default: the split's mean loss, and no extra report); with several splits give
    a mapping ``{split: value_fn}``. ``samples = 0`` skips the average case. ``progress(k)`` is called
    after each worst case (``k = 1``) and each average-case draw.
    """
    objs = {"train": objectives} if isinstance(objectives, Objective) else dict(objectives)
    if not objs:
        raise FlatscopeError("no data split to evaluate")
    rho = np.asarray(rhos, dtype=np.float64).reshape(-1)
    if rho.size == 0:
        raise FlatscopeError("no ρ given")
    if not np.all(np.isfinite(rho)) or (rho <= 0).any():
        raise FlatscopeError("ρ must be finite and positive (ρ = 0 has no ball to search)")
    if np.any(np.diff(rho) <= 0):
        raise FlatscopeError("ρ must be strictly increasing")
    check_options(
        norm=norm, steps=steps, step_size=step_size, restarts=restarts, eta=eta, average=average, samples=samples, m=m
    )
    steps, restarts, samples = int(steps), int(restarts), int(samples)
    m = None if m is None else int(m)
    first = next(iter(objs.values()))
    for name, o in objs.items():
        first.layout.check_same(o.layout, what=f"split {name}")
        if o.w0.shape != first.w0.shape or not torch.equal(o.w0.to(first.w0), first.w0):
            raise FlatscopeError(f"split {name}: the objectives must hold the same weights")
        if m is not None:
            if o.n != o.n_total:
                raise FlatscopeError(
                    "--m (m-sharpness) needs the whole split in one process, not a data-parallel shard"
                )
            if m > o.n:
                raise FlatscopeError(f"--m {m} is larger than the {name} split ({o.n} samples)")
    mask = first.layout.mask(params)
    progress = progress or (lambda k: None)
    fns = value_fn if isinstance(value_fn, Mapping) else {name: value_fn for name in objs}
    res = SharpnessResult(
        rho=rho,
        norm=norm,
        adaptive=bool(adaptive),
        eta=float(eta),
        params=params,
        steps=steps,
        step_size=float(step_size),
        restarts=restarts,
        m=m,
        average=average,
        samples=samples,
        seed=int(seed),
        n_perturbed=0,
    )
    for name, obj in objs.items():
        w0 = obj.w0
        c = scale_vector(w0, mask, adaptive, float(eta))
        res.n_perturbed = int((c != 0).sum())
        if res.n_perturbed == 0:
            raise FlatscopeError(
                "no entry can move: every perturbed weight is 0 and --eta is 0 (use --eta > 0 or --no-adaptive)"
            )
        fn = fns.get(name)
        fn = None if fn is None else checked(fn)
        v0 = None if fn is None else fn(w0, " at the checkpoint's weights")
        base_loss, base_acc = obj.evaluate(w0)
        parts = [obj] if m is None else [obj.subset(torch.as_tensor(ix)) for ix in sub_batches(obj.n, m, seed)]
        K = len(parts)
        R = np.empty((rho.size, K, restarts))
        WL, WE, BN, DN = (np.empty((rho.size, K)) for _ in range(4))
        WV = np.full((rho.size, K), np.nan) if fn is not None else None
        evals = 0
        for k, part in enumerate(parts):
            l0, acc0 = part.evaluate(w0)
            g0 = part.grad(w0)
            evals += 2
            for i, r in enumerate(rho):
                wc = worst_case(
                    part,
                    float(r),
                    c=c,
                    mask=mask,
                    norm=norm,
                    steps=steps,
                    step_size=step_size,
                    restarts=restarts,
                    seed=seed,
                    base=(l0, 1.0 - acc0, g0),
                    value_fn=fn if m is None else None,
                    value_base=v0,
                )
                R[i, k] = wc.restarts
                WL[i, k], WE[i, k] = wc.loss, wc.error - wc.base_error
                BN[i, k], DN[i, k] = wc.ball_norm, wc.delta_norm
                if WV is not None and m is None:
                    WV[i, k] = wc.value
                evals += wc.evaluations
                progress(1)
        curve = SplitSharpness(
            name, base_loss, 1.0 - base_acc, sum(p.n for p in parts), R, WL, WE, BN, DN, evals, worst_value=WV
        )
        if samples:
            U = average_directions(w0.numel(), mask, norm, average, samples, seed, dtype=w0.dtype).to(w0.device)
            f = fn if fn is not None else (lambda w, where="", obj=obj: obj.loss(w))
            b = base_loss if fn is None else v0
            A = np.empty((rho.size, samples))
            for j in range(samples):
                cu = c * U[j]
                for i, r in enumerate(rho):
                    A[i, j] = f(w0 + float(r) * cu, f" at ρ = {r:g}, draw {j}") - b
                progress(1)
            curve.average_draws = A
            curve.evaluations += samples * rho.size
        res.curves[name] = curve
    return res
