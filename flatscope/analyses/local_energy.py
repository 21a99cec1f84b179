"""Local energy: how much the loss and the error rate rise under random weight noise of scale σ.

Definition (Pittorino et al. 2021, "Entropic gradient descent algorithms and wide flat minima", arXiv:2006.07897)::

    δE(σ) = E_z[ E(w + σ d(z)) ] − E(w),      z ~ N(0, I)

with ``E`` the mean loss or the error rate (1 − accuracy) over a data split and the direction
``d(z)`` one of

- ``multiplicative`` (the default, the paper's ``w(1 + σz)``): ``d = z ⊙ w``; each weight is
  perturbed in proportion to its own size, so the measure does not change when a layer is rescaled;
- ``additive``: ``d = z``; absolute noise of standard deviation σ on every weight;
- ``filter``: filter-normalized noise as in Li et al. 2018 (*Visualizing the loss landscape of neural
  nets*): for every parameter tensor of 2+ dimensions each output filter / neuron (a slice along
  dim 0: a row of a Linear weight, an output channel of a Conv weight) of ``z`` is rescaled to the
  norm of the same filter of ``w``. A 1-D tensor (a bias, a BatchNorm scale or shift) is one filter:
  the whole of ``z``'s slice is rescaled to the tensor's norm. Li et al. leave biases and BN
  parameters unperturbed instead; ``params="weights"`` gives exactly that.

Because ``E||σ z_f ⊙ w_f||² = σ²||w_f||²``, multiplicative and filter noise have the same scale in
expectation: at a given σ both move each filter by about σ times its norm.

Estimator. ``n`` directions ``d_1..d_n`` are drawn once and used at every σ (common random
numbers): the curve is smooth in σ and differences between two σ are far more precise than the
standard error of either. Draw ``j`` comes from its own generator seeded by ``(seed, j)``, so the
first 64 draws of a 256-draw run are the draws of a 64-draw run, and every split sees the same
draws. Reported per σ: the mean of ``E(w + σ d_j) − E(w)`` over draws and its standard error
(sample standard deviation, ``ddof=1``, over ``√n``). It is an estimate of δE, not of a bound.

BatchNorm. ``bn="eval"`` (default) keeps the checkpoint's running statistics at every perturbed
point. ``bn="recompute"`` re-estimates them at every perturbed point (and at ``w`` itself, so that
``δE → 0`` as ``σ → 0``) from the training inputs (:meth:`Objective.recompute_bn`); this is the
measure of a network that is allowed to re-normalize after the noise, and costs one extra pass over
the training data per point.

Target error. ``target_error=ε`` finds the σ at which the mean ``δE_err`` reaches ``ε``, on the same
draws. On fixed draws the mean error is a deterministic step function of σ that need not be
monotone. The search takes the first grid σ whose mean reaches ε and bisects the interval between
it and the grid point before (or 0), keeping ``mean(lo) < ε ≤ mean(hi)``; it stops when
``hi − lo ≤ rtol·hi`` and reports ``hi``, the smallest σ seen at which ε was reached. The result is an
up-crossing inside the first grid interval that crosses ε (the only one when the curve is monotone
there); the standard error of ``δE_err`` at that σ is reported beside it. When no grid σ reaches ε
the target is NaN with ``reached = False`` and ``lower_bound`` = the largest σ of the grid: σ* lies
above it (on these draws, at the grid points). Means are compared with ε with a relative slack of
1e-9 so that rounding cannot hide an exact hit.

Speed. Points are evaluated either one at a time (``Objective.evaluate``, the *loop*) or ``chunk``
draws at a time in one vmapped call (``Objective.evaluate_many``, *batched*). On CPU the loop is
faster for every sample model (batching adds no parallelism on a CPU core and vmapped convolutions
are slower; see benchmarks/RESULTS.md), so ``batched="auto"`` means: batched on CUDA with
``bn="eval"``, the loop otherwise. ``bn="recompute"`` always loops (each point has its own
statistics). Both paths give the same numbers up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from . import curves_json
from ..errors import FlatscopeError
from ..grids import parse_grid
from ..memory import points_per_call, vector_bytes
from ..objective import Objective, PointEvaluator
from ..params import ParamLayout

NOISES = ("multiplicative", "additive", "filter")
BN_MODES = ("eval", "recompute")
BATCHED = ("auto", "on", "off")
DEFAULT_SIGMA = "0.01..1"
_SLACK = 1e-9

# ---------------------------------------------------------------------------------- σ grammar


def parse_sigmas(spec: str) -> np.ndarray:
    """The ``--sigma`` grid: sorted distinct noise scales σ ≥ 0 (grammar: :mod:`flatscope.grids`).

    >>> parse_sigmas("0.01..1:3").round(3).tolist()
    [0.01, 0.1, 1.0]
    """
    return parse_grid(spec, option="--sigma", symbol="σ")[0]


# ---------------------------------------------------------------------------------- directions
def _draw_seed(seed: int, j: int) -> int:
    return int(np.random.SeedSequence([int(seed) % 2**64, int(j)]).generate_state(1, dtype=np.uint64)[0])


def draw_normal(seed: int, start: int, stop: int, dim: int, dtype=torch.float64) -> torch.Tensor:
    """Rows ``start..stop-1`` of the standard normal draws ``z_j`` (shape ``(stop-start, dim)``, CPU).

    Row ``j`` depends only on ``(seed, j)``: runs with more draws extend runs with fewer.
    """
    out = torch.empty(stop - start, dim, dtype=dtype)
    for r, j in enumerate(range(start, stop)):
        out[r] = torch.randn(dim, generator=torch.Generator().manual_seed(_draw_seed(seed, j)), dtype=dtype)
    return out


def filter_normalize(z: torch.Tensor, w: torch.Tensor, layout: ParamLayout) -> torch.Tensor:
    """Li et al.'s filter normalization of rows of ``z`` (shape ``(m, dim)``) against ``w``.

    For a tensor of 2+ dims each slice along dim 0 (an output filter or neuron) of ``z`` is scaled
    to the norm of the same slice of ``w``; a 1-D (or 0-D) tensor is one filter.
    """
    out = torch.empty_like(z)
    tiny = torch.finfo(z.dtype).tiny
    for sl, shape in zip(layout.slices().values(), layout.shapes):
        if sl.stop == sl.start:
            continue
        rows = shape[0] if len(shape) >= 2 else 1
        zr = z[:, sl].reshape(z.shape[0], rows, -1)
        wr = w[sl].reshape(rows, -1)
        scale = wr.norm(dim=-1, keepdim=True) / zr.norm(dim=-1, keepdim=True).clamp_min(tiny)
        out[:, sl] = (zr * scale).reshape(z.shape[0], -1)
    return out


class Directions:
    """The noise directions ``d_j`` of draw ``j``: deterministic in ``(seed, j)``, masked, cached."""

    CACHE_ELEMENTS = 1 << 24  # keep all n×dim directions in memory below this size, else regenerate

    def __init__(self, w0: torch.Tensor, layout: ParamLayout, noise: str, mask: torch.Tensor, seed: int):
        if noise not in NOISES:
            raise FlatscopeError(f"unknown noise {noise!r}; choose from {', '.join(NOISES)}")
        self.w0, self.layout, self.noise, self.seed = w0, layout, noise, int(seed)
        self.mask = mask.to(device=w0.device)
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def block(self, start: int, stop: int) -> torch.Tensor:
        key = (start, stop)
        if key in self._cache:
            return self._cache[key]
        z = draw_normal(self.seed, start, stop, self.w0.numel(), dtype=self.w0.dtype).to(self.w0.device)
        if self.noise == "multiplicative":
            d = z * self.w0
        elif self.noise == "additive":
            d = z
        else:
            d = filter_normalize(z, self.w0, self.layout)
        d = d * self.mask
        if d.numel() * (len(self._cache) + 1) <= self.CACHE_ELEMENTS:
            self._cache[key] = d
        return d


# ---------------------------------------------------------------------------------- evaluation
class _Evaluator:
    """Loss and error rate at the points ``w0 + σ d_j``: vmapped (``Objective.evaluate_many``), one
    at a time (:class:`flatscope.objective.PointEvaluator`: each point written into one flat buffer
    with a single ``add``, the module called directly; for small models this halves the overhead
    per point, benchmarks/RESULTS.md), or one at a time with BatchNorm statistics recomputed at
    each point.
    """

    def __init__(self, obj: Objective, batched: bool, bn_data: torch.Tensor | None):
        self.obj, self.batched, self.bn_data = obj, batched, bn_data
        self.point = None
        if not batched and bn_data is None:
            self.point = PointEvaluator(obj)
            self.flat = obj.w0.detach().clone()

    def _in_place(self) -> tuple[float, float]:
        """Loss and accuracy at the point held in ``self.flat``."""
        return self.point(self.flat)

    def _one(self, w: torch.Tensor) -> tuple[float, float]:
        bufs = None if self.bn_data is None else self.obj.recompute_bn(w, self.bn_data)
        return self.obj.evaluate(w, bufs)

    def base(self) -> tuple[float, float]:
        if self.point is not None:
            self.flat.copy_(self.obj.w0)
            loss, acc = self._in_place()
        else:
            loss, acc = self._one(self.obj.w0)
        return loss, 1.0 - acc

    @torch.no_grad()
    def points(self, w0: torch.Tensor, D: torch.Tensor, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        """(losses, error rates) at ``w0 + sigma * D[j]`` for every row j of ``D``."""
        if self.batched:
            losses, accs = self.obj.evaluate_many(torch.add(w0, D, alpha=sigma))
            losses, accs = losses.cpu().numpy(), accs.cpu().numpy()
        else:
            vals = []
            for d in D:
                if self.point is not None:
                    torch.add(w0, d, alpha=sigma, out=self.flat)
                    vals.append(self._in_place())
                else:
                    vals.append(self._one(torch.add(w0, d, alpha=sigma)))
            vals = np.array(vals, dtype=np.float64).reshape(-1, 2)
            losses, accs = vals[:, 0], vals[:, 1]
        return losses.astype(np.float64), 1.0 - accs.astype(np.float64)


def _mean_sem(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[-1]
    return x.mean(axis=-1), x.std(axis=-1, ddof=1) / math.sqrt(n)


@dataclass
class TargetSigma:
    """The σ at which the mean δE_err first reaches ``epsilon`` (NaN when not reached)."""

    epsilon: float
    sigma: float
    reached: bool
    lo: float  # bracket: mean(lo) < ε ≤ mean(hi); hi = sigma when reached
    hi: float
    lower_bound: float  # σ* > lower_bound when not reached (= the largest grid σ)
    delta_err_mean: float  # at sigma (NaN when not reached)
    delta_err_sem: float
    iterations: int
    evaluations: int

    def to_tree(self) -> dict:
        return {
            "epsilon": self.epsilon,
            "sigma": self.sigma,
            "reached": np.bool_(self.reached),
            "lo": self.lo,
            "hi": self.hi,
            "lower_bound": self.lower_bound,
            "delta_err_mean": self.delta_err_mean,
            "delta_err_sem": self.delta_err_sem,
            "iterations": self.iterations,
            "evaluations": self.evaluations,
        }

    def to_json(self) -> dict:
        return {
            "epsilon": self.epsilon,
            "sigma": self.sigma if self.reached else None,
            "reached": self.reached,
            "bracket": [self.lo, self.hi] if self.reached else None,
            "lower_bound": None if self.reached else self.lower_bound,
            "delta_err_mean": self.delta_err_mean if self.reached else None,
            "delta_err_sem": self.delta_err_sem if self.reached else None,
            "iterations": self.iterations,
            "evaluations": self.evaluations,
        }


@dataclass
class SplitCurve:
    """δE(σ) on one data split; ``*_draws`` hold ``E(w + σ_i d_j) − E(w)`` at ``[i, j]``."""

    split: str
    base_loss: float
    base_error: float
    delta_loss_draws: np.ndarray
    delta_err_draws: np.ndarray
    target: TargetSigma | None = None

    @property
    def delta_loss_mean(self) -> np.ndarray:
        return _mean_sem(self.delta_loss_draws)[0]

    @property
    def delta_loss_sem(self) -> np.ndarray:
        return _mean_sem(self.delta_loss_draws)[1]

    @property
    def delta_err_mean(self) -> np.ndarray:
        return _mean_sem(self.delta_err_draws)[0]

    @property
    def delta_err_sem(self) -> np.ndarray:
        return _mean_sem(self.delta_err_draws)[1]

    def to_tree(self) -> dict:
        t = {
            "base_loss": self.base_loss,
            "base_error": self.base_error,
            "delta_loss_mean": self.delta_loss_mean,
            "delta_loss_sem": self.delta_loss_sem,
            "delta_err_mean": self.delta_err_mean,
            "delta_err_sem": self.delta_err_sem,
            "delta_loss_draws": self.delta_loss_draws,
            "delta_err_draws": self.delta_err_draws,
        }
        if self.target is not None:
            t["target"] = self.target.to_tree()
        return t

    def to_json(self) -> dict:
        out = {
            "base_loss": self.base_loss,
            "base_error": self.base_error,
            "delta_loss_mean": self.delta_loss_mean,
            "delta_loss_sem": self.delta_loss_sem,
            "delta_err_mean": self.delta_err_mean,
            "delta_err_sem": self.delta_err_sem,
        }
        if self.target is not None:
            out["target_sigma"] = self.target.sigma if self.target.reached else None
            out["target"] = self.target.to_json()
        return out


@dataclass
class LocalEnergyResult:
    sigma: np.ndarray
    samples: int
    noise: str
    params: str
    bn: str
    batched: bool
    chunk: int
    seed: int
    n_perturbed: int  # entries of the flat vector that the noise can move
    curves: dict[str, SplitCurve] = field(default_factory=dict)

    def to_tree(self) -> dict:
        tree = {
            "sigma": self.sigma,
            "samples": self.samples,
            "noise": self.noise,
            "params": self.params,
            "bn": self.bn,
            "mode": "batched" if self.batched else "loop",
            "chunk": self.chunk,
            "seed": self.seed,
            "n_perturbed": self.n_perturbed,
            "splits": ",".join(self.curves),
        }
        for name, c in self.curves.items():
            tree[name] = c.to_tree()
        return tree

    def summary(self) -> dict:
        """Headline numbers, ``<split>_<name>``: base_loss, base_error, delta_loss_at_sigma_max,
        delta_err_at_sigma_max, and target_sigma when a target was asked for."""
        out: dict = {"sigma_max": float(self.sigma[-1]), "samples": self.samples}
        for name, c in self.curves.items():
            out[f"{name}_base_loss"] = c.base_loss
            out[f"{name}_base_error"] = c.base_error
            out[f"{name}_delta_loss_at_sigma_max"] = float(c.delta_loss_mean[-1])
            out[f"{name}_delta_err_at_sigma_max"] = float(c.delta_err_mean[-1])
            if c.target is not None:
                out[f"{name}_target_sigma"] = c.target.sigma
        return out

    def to_json(self) -> dict:
        """One split: its keys at top level; several: one object per split under its name."""
        out = {
            "sigma": self.sigma,
            "samples": self.samples,
            "noise": self.noise,
            "params": self.params,
            "bn": self.bn,
            "mode": "batched" if self.batched else "loop",
            "n_perturbed": self.n_perturbed,
        }
        out.update(curves_json(self.curves))
        return out


def choose_batched(batched: str, device: torch.device, bn: str) -> bool:
    """``on``/``off`` as asked; ``auto``: batched on CUDA with BN in eval mode, the loop otherwise."""
    if batched not in BATCHED:
        raise FlatscopeError(f"unknown --batched {batched!r}; choose from {', '.join(BATCHED)}")
    if bn == "recompute":
        if batched == "on":
            raise FlatscopeError(
                "--batched on cannot be used with --bn recompute: every perturbed point has "
                "its own BatchNorm statistics; use --batched auto or off"
            )
        return False
    if batched == "auto":
        return torch.device(device).type == "cuda"
    return batched == "on"


def _sweep(
    ev: _Evaluator,
    dirs: Directions,
    w0: torch.Tensor,
    sigmas,
    n: int,
    chunk: int,
    progress: Callable[[int], None],
    points: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    L = np.empty((len(sigmas), n))
    E = np.empty((len(sigmas), n))
    starts = list(range(0, n, chunk))
    if points:  # this rank's chunks of draws (round-robin); the others' come by all-gather below
        from .. import distributed

        starts = starts[distributed.rank() :: distributed.world_size()]
    for j0 in starts:
        j1 = min(n, j0 + chunk)
        D = dirs.block(j0, j1)
        for i, s in enumerate(sigmas):
            L[i, j0:j1], E[i, j0:j1] = ev.points(w0, D, float(s))
            progress(j1 - j0)
    if points:
        mine = sum(min(n, j0 + chunk) - j0 for j0 in starts) * len(sigmas)
        for part_starts, part_L, part_E in distributed.all_gather_objects(
            (starts, [L[:, j0 : j0 + chunk] for j0 in starts], [E[:, j0 : j0 + chunk] for j0 in starts])
        ):
            for j0, lv, ev_ in zip(part_starts, part_L, part_E):
                L[:, j0 : j0 + chunk], E[:, j0 : j0 + chunk] = lv, ev_
        progress(n * len(sigmas) - mine)
    return L, E


def _bisect(
    ev: _Evaluator, dirs, w0, sigmas, err_draws, base_err, eps, n, chunk, rtol, max_iter, progress, points: bool = False
) -> TargetSigma:
    reached = np.nonzero(err_draws.mean(axis=1) >= eps * (1 - _SLACK))[0]
    if reached.size == 0:
        return TargetSigma(
            eps,
            float("nan"),
            False,
            float(sigmas[-1]),
            float("inf"),
            float(sigmas[-1]),
            float("nan"),
            float("nan"),
            0,
            0,
        )
    k = int(reached[0])
    lo, hi = (float(sigmas[k - 1]) if k > 0 else 0.0), float(sigmas[k])
    d_hi = err_draws[k]
    it = evals = 0
    while hi - lo > rtol * hi and it < max_iter:
        mid = 0.5 * (lo + hi)
        d = _sweep(ev, dirs, w0, [mid], n, chunk, progress, points)[1][0] - base_err
        if d.mean() >= eps * (1 - _SLACK):
            hi, d_hi = mid, d
        else:
            lo = mid
        it, evals = it + 1, evals + n
    m, s = _mean_sem(d_hi)
    return TargetSigma(eps, hi, True, lo, hi, float("nan"), float(m), float(s), it, evals)


def local_energy(
    objectives: Objective | Mapping[str, Objective],
    sigmas,
    *,
    samples: int = 32,
    noise: str = "multiplicative",
    params: str = "all",
    bn: str = "eval",
    bn_data: torch.Tensor | None = None,
    target_error: float | None = None,
    batched: str | bool = "auto",
    chunk: int = 16,
    seed: int = 0,
    rtol: float = 1e-3,
    max_iter: int = 60,
    progress: Callable[[int], None] | None = None,
    parallel: str = "data",
) -> LocalEnergyResult:
    """δE(σ) for loss and error rate on each split, with common random numbers across σ and splits.

    ``objectives``: one :class:`Objective` (reported as split ``"train"``) or ``{split: Objective}``
    over the same model. ``sigmas``: increasing noise scales (see :func:`parse_sigmas`).
    ``params``: ``all``, ``weights`` or a name regex (``ParamLayout.mask``): the other entries are
    not perturbed. ``bn="recompute"`` needs ``bn_data`` (the training inputs). ``target_error``
    (in (0, 1]) adds the bisected σ at which the mean δE_err reaches it. ``batched``: ``auto``,
    ``on``/``True`` or ``off``/``False`` (see :func:`choose_batched`); ``chunk`` draws go through one
    vmapped call. ``progress(k)`` is called after every ``k`` evaluated points.

    Under torchrun, ``parallel="data"`` takes sharded objectives (every evaluation is all-reduced);
    ``parallel="points"`` takes objectives over the whole split on every rank and deals the chunks
    of ``chunk`` draws round-robin to the ranks; every rank then gets all values (all-gather), so
    the bisection takes the same steps everywhere. The chunks, hence the values, are those of one
    process.
    """
    objs = {"train": objectives} if isinstance(objectives, Objective) else dict(objectives)
    if not objs:
        raise FlatscopeError("no data split to evaluate")
    sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if sig.size == 0:
        raise FlatscopeError("no σ given")
    if not np.all(np.isfinite(sig)) or (sig < 0).any():
        raise FlatscopeError("σ must be finite and non-negative")
    if np.any(np.diff(sig) <= 0):
        raise FlatscopeError("σ must be strictly increasing")
    if int(samples) != samples or samples < 2:
        raise FlatscopeError(
            f"--samples must be a whole number of at least 2 (the standard error needs two draws), got {samples}"
        )
    samples = int(samples)
    if int(chunk) != chunk or chunk < 1:
        raise FlatscopeError(f"--chunk must be at least 1, got {chunk}")
    if noise not in NOISES:
        raise FlatscopeError(f"unknown --noise {noise!r}; choose from {', '.join(NOISES)}")
    if bn not in BN_MODES:
        raise FlatscopeError(f"unknown --bn {bn!r}; choose from {', '.join(BN_MODES)}")
    if parallel not in ("data", "points"):
        raise FlatscopeError(f"unknown --parallel {parallel!r}; choose from data, points")
    points = parallel == "points"
    if points and any(o.n != o.n_total for o in objs.values()):
        raise FlatscopeError("parallel='points' needs objectives over the whole split on every rank, not shards")
    first = next(iter(objs.values()))
    for name, o in objs.items():
        first.layout.check_same(o.layout, what=f"split {name}")
        if o.w0.shape != first.w0.shape or not torch.equal(o.w0.to(first.w0), first.w0):
            raise FlatscopeError(f"split {name}: the objectives must hold the same weights")
    if not rtol > 0:
        raise FlatscopeError(f"rtol must be positive, got {rtol}")
    if target_error is not None:
        if not (0 < target_error <= 1):
            raise FlatscopeError(f"--target-error must be in (0, 1] (a rise of the error rate), got {target_error:g}")
        if not first.classification:
            raise FlatscopeError(
                "--target-error needs class labels: the error rate is undefined for float (regression) targets"
            )
    if bn == "recompute" and bn_data is None:
        raise FlatscopeError("--bn recompute needs the training inputs (bn_data)")
    if isinstance(batched, bool):
        batched = "on" if batched else "off"
    use_batched = choose_batched(batched, first.device, bn)
    mask = first.layout.mask(params)
    progress = progress or (lambda k: None)

    # draws per call within the memory budget: each holds its normal draw, its direction, the point and
    # (filter normalization) one more vector, plus one batch's activations when vmapped; the directions cache
    chunk = points_per_call(
        first,
        int(chunk),
        4 * vector_bytes(first.dim, first.dtype),
        use_batched,
        reserved=min(samples * first.dim, Directions.CACHE_ELEMENTS) * first.w0.element_size(),
    )
    res = LocalEnergyResult(
        sigma=sig,
        samples=samples,
        noise=noise,
        params=params,
        bn=bn,
        batched=use_batched,
        chunk=int(chunk),
        seed=int(seed),
        n_perturbed=0,
    )
    dirs = None
    for name, obj in objs.items():
        w0 = obj.w0
        if dirs is None or dirs.w0.device != w0.device:
            dirs = Directions(w0, obj.layout, noise, mask, seed)
        if noise == "multiplicative":
            res.n_perturbed = int((mask.to(w0.device) & (w0 != 0)).sum())
        else:
            res.n_perturbed = int(mask.sum())
        ev = _Evaluator(obj, use_batched, bn_data if bn == "recompute" else None)
        base_loss, base_err = ev.base()
        L, E = _sweep(ev, dirs, w0, sig, samples, int(chunk), progress, points)
        curve = SplitCurve(name, base_loss, base_err, L - base_loss, E - base_err)
        if target_error is not None:
            curve.target = _bisect(
                ev,
                dirs,
                w0,
                sig,
                curve.delta_err_draws,
                base_err,
                float(target_error),
                samples,
                int(chunk),
                rtol,
                max_iter,
                progress,
                points,
            )
        res.curves[name] = curve
    return res
