"""Curvature during training: :class:`CurvatureMonitor`, a tracker for any PyTorch training loop.

::

    from flatscope.monitor import CurvatureMonitor
    mon = CurvatureMonitor(model, "ce", (X_train, y_train), every=50,
                           measures=["lambda_max", "trace", "local_energy:0.05"], log="run.h5")
    for step, (xb, yb) in enumerate(loader):
        ...; opt.step()
        mon.step(step, lr=opt.param_groups[0]["lr"], optimizer=opt)

At each tracked step the monitor builds an :class:`~flatscope.objective.Objective` over a fixed
evaluation set (a seeded random subset of ``samples`` rows of the data, the same rows at every
step) on a private copy of the model, in eval mode (BatchNorm uses its running statistics, dropout
is off), and measures the loss ``L(w)`` of that set at the current weights ``w``. The training
model, its buffers, its optimizer and torch's global random state are never touched (the global
generator is forked around every measurement), so a tracked run follows the untracked trajectory
bit for bit.

Measures (a name, or ``name:ARG``; :data:`MEASURES` is the registry, :func:`register_measure` adds one):

- ``lambda_max`` / ``lambda_max:k``: the top ``k`` (default 1) Hessian eigenvalues ``λ_1 ≥ ... ≥ λ_k``
  by Lanczos (:func:`flatscope.linalg.lanczos`), each with its residual ``||H v − λ v||``; the
  eigenvalue error is at most the residual. Columns ``lambda_max``, ``lambda_max_residual``,
  ``lambda_2`` ... ``lambda_k`` (with ``_residual``), ``lambda_max_hvps`` (products spent).
- ``lambda_min``: the smallest (most negative) eigenvalue, the same way.
- ``trace`` / ``trace:N``: ``tr H`` by Hutch++ with ``N`` products (default 30) and its standard
  error (``trace_stderr``). The probes are seeded the same at every step (common random numbers).
- ``local_energy:σ``: ``δE(σ) = E_z[L(w + σ z ⊙ w)] − L(w)``, multiplicative noise (Pittorino et al.
  2021) with 16 fixed draws, and its standard error; column ``local_energy_<σ>`` with ``.`` written
  ``p`` (``local_energy_0p05``).
- ``grad_norm``: ``||∇L(w)||`` on the evaluation set.
- ``pre_lambda_max``: the preconditioned sharpness ``λ_max(P⁻¹ H)`` of an adaptive optimizer (Cohen et
  al. 2022, *Adaptive gradient methods at the edge of stability*, arXiv:2207.14484), computed as the
  top eigenvalue of the symmetric ``P^{-1/2} H P^{-1/2}``. For Adam/AdamW, whose update is
  ``w ← w − η P⁻¹ m`` with ``m`` the first-moment average, ``P = (1 − β₁ᵗ) diag(√v̂ + ε)`` and
  ``v̂ = v / (1 − β₂ᵗ)`` the bias-corrected second moment from the optimizer's state; any other
  optimizer can supply ``preconditioner=fn(model, optimizer) -> {name: P diagonal}``.

Every row also holds ``step``, ``wall_time_s`` (since the monitor was made), ``cost_s`` (the
measurement's own time), ``hvps`` (Hessian-vector products in the row), ``loss`` and ``acc`` of the
evaluation set, ``lr`` and ``two_over_lr = 2/η`` when a learning rate is given, and ``threshold``:
the stability threshold of the optimizer's update on a quadratic (Cohen et al. 2021, *Gradient
descent on neural networks typically occurs at the edge of stability*, arXiv:2103.00065): ``2/η`` for
gradient descent, ``(2 + 2β)/η`` for heavy-ball momentum ``β`` (``(2 + 2β)/((1 + 2β)η)`` Nesterov), and for Adam the threshold of the
preconditioned sharpness, ``(2 + 2β₁)/((1 − β₁) η)`` (38/η at β₁ = 0.9).

Warm starts. Lanczos starts from the previous call's Ritz vectors (the sum of the ``k`` previous
vectors, so each keeps a component), which on a slowly changing model costs a few products instead
of a cold run from a random vector; ``warm_start=False`` starts every call cold from the same seeded
vector. ``lambda_max_hvps`` records the cost of each call; benchmarks/RESULTS.md compares the two.

Output. With ``log=PATH`` every row is appended to the HDF5 group ``/track`` (one resizable dataset
per column, attrs ``kind="track"``, ``summary``, ``options`` and provenance) through
:func:`flatscope.results.update`: each write is atomic, so a killed run keeps every row written
before it. ``summary`` holds ``<column>_last`` for every column, ``<column>_max`` for the measured
quantities (and ``lambda_min_min``), ``rows``, ``last_step``, ``hvps_total``, ``cost_s_total`` and
``lambda_max_lr_last`` (``λ_max · η``, 2 at the gradient-descent edge of stability), so that
``flatscope audit --fail-if "track.lambda_max_last > 100"`` can check a run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

import h5py
import numpy as np
import torch

from . import __version__
from . import results as store
from .errors import FlatscopeError
from .linalg import lanczos
from .linalg import trace as trace_estimate
from .objective import Objective

GROUP = "track"


# ------------------------------------------------------------------------------------------ context
@dataclass
class Context:
    """What a measure sees at one tracked step."""

    obj: Objective  # over the evaluation set, on a private copy of the model
    model: torch.nn.Module  # the caller's model (read only: parameter names for the optimizer state)
    optimizer: object | None
    lr: float | None
    tol: float
    seed: int
    warm: dict  # measure key -> previous Ritz vectors (kept across steps)
    warm_start: bool
    preconditioner: Callable | None
    hvps: int = 0
    _op: Callable | None = None

    def hvp(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` at the current weights (rows of ``V``), counted in :attr:`hvps`."""
        if self._op is None:
            self._op = self.obj.hvp_operator(self.obj.w0)
        self.hvps += 1 if V.dim() == 1 else V.shape[0]
        return self._op(V)

    def eig(self, key: str, matvec: Callable, k: int, which: str) -> tuple[object, int]:
        """Lanczos on ``matvec``, warm-started from ``warm[key]``; returns (result, products)."""
        dim = self.obj.dim
        prev = self.warm.get(key) if self.warm_start else None
        v0 = None
        if prev is not None and prev.shape[-1] == dim and torch.isfinite(prev).all():
            v0 = prev.sum(0, keepdim=True)
            if float(torch.linalg.norm(v0)) == 0.0:
                v0 = None
        before = self.hvps
        res = lanczos(matvec, dim, k, which, tol=self.tol, seed=self.seed, v0=v0, device=self.obj.device)
        if res.eigenvectors.shape[0] and np.all(np.isfinite(res.eigenvalues)):
            self.warm[key] = res.eigenvectors.detach().clone()
        return res, self.hvps - before


# ------------------------------------------------------------------------------------------ measures
class Measure:
    """One tracked quantity. ``arg`` is the text after ``name:`` (None when absent)."""

    name = ""
    doc = ""

    def __init__(self, arg: str | None):
        if arg is not None:
            raise FlatscopeError(f"measure {self.name} takes no argument, got {self.name}:{arg}")

    @property
    def key(self) -> str:
        return self.name

    def check_optimizer(self, optimizer, preconditioner) -> None:
        """Raise FlatscopeError when this measure cannot work with ``optimizer``."""

    def __call__(self, ctx: Context) -> dict:
        raise NotImplementedError


MEASURES: dict[str, type] = {}


def register_measure(cls: type) -> type:
    """Class decorator: make ``cls`` (a :class:`Measure`) available as ``cls.name`` in ``measures=``."""
    MEASURES[cls.name] = cls  # type: ignore[attr-defined]
    return cls


def _int_arg(name: str, arg: str | None, default: int, least: int) -> int:
    if arg is None:
        return default
    try:
        v = int(arg)
    except ValueError:
        raise FlatscopeError(f"measure {name}:{arg}: the argument must be a whole number") from None
    if v < least:
        raise FlatscopeError(f"measure {name}:{arg}: the argument must be at least {least}")
    return v


def _eig_row(prefix: str, res, hvps: int, names: list[str]) -> dict:
    row = {}
    for i, name in enumerate(names):
        ok = i < len(res.eigenvalues)
        row[name] = float(res.eigenvalues[i]) if ok else math.nan
        row[f"{name}_residual"] = float(res.residuals[i]) if ok else math.nan
    row[f"{prefix}_converged"] = float(res.all_converged)
    row[f"{prefix}_hvps"] = float(hvps)
    return row


@register_measure
class LambdaMax(Measure):
    name = "lambda_max"
    doc = "top Hessian eigenvalue(s) by warm-started Lanczos (lambda_max:k for the top k)"

    def __init__(self, arg):
        self.k = _int_arg(self.name, arg, 1, 1)

    def __call__(self, ctx):
        res, n = ctx.eig(self.key, ctx.hvp, min(self.k, ctx.obj.dim), "largest")
        names = ["lambda_max"] + [f"lambda_{i}" for i in range(2, self.k + 1)]
        return _eig_row("lambda_max", res, n, names)


@register_measure
class LambdaMin(Measure):
    name = "lambda_min"
    doc = "smallest (most negative) Hessian eigenvalue by warm-started Lanczos"

    def __call__(self, ctx):
        res, n = ctx.eig(self.key, ctx.hvp, 1, "smallest")
        return _eig_row("lambda_min", res, n, ["lambda_min"])


@register_measure
class Trace(Measure):
    name = "trace"
    doc = "tr H by Hutch++ (trace:N products, default 30), with its standard error"

    def __init__(self, arg):
        self.n = _int_arg(self.name, arg, 30, 2)

    def __call__(self, ctx):
        before = ctx.hvps
        res = trace_estimate(ctx.hvp, ctx.obj.dim, self.n, seed=ctx.seed, device=ctx.obj.device)
        return {"trace": float(res.trace), "trace_stderr": float(res.stderr), "trace_hvps": float(ctx.hvps - before)}


@register_measure
class LocalEnergy(Measure):
    name = "local_energy"
    doc = "local_energy:SIGMA, the loss rise under multiplicative weight noise of scale SIGMA (16 draws)"
    samples = 16

    def __init__(self, arg):
        if arg is None:
            raise FlatscopeError(
                "measure local_energy needs its noise scale: local_energy:SIGMA, e.g. local_energy:0.05"
            )
        try:
            self.sigma = float(arg)
        except ValueError:
            raise FlatscopeError(f"measure local_energy:{arg}: SIGMA must be a number") from None
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise FlatscopeError(f"measure local_energy:{arg}: SIGMA must be positive")
        self.arg = arg

    @property
    def key(self) -> str:
        return "local_energy_" + f"{self.sigma:g}".replace(".", "p").replace("-", "m").replace("+", "")

    def __call__(self, ctx):
        from .analyses.local_energy import local_energy

        res = local_energy(ctx.obj, [self.sigma], samples=self.samples, seed=ctx.seed, batched="off")
        c = res.curves["train"]
        return {self.key: float(c.delta_loss_mean[0]), f"{self.key}_stderr": float(c.delta_loss_sem[0])}


@register_measure
class GradNorm(Measure):
    name = "grad_norm"
    doc = "norm of the gradient of the evaluation-set loss"

    def __call__(self, ctx):
        _, g = ctx.obj.loss_and_grad()
        return {"grad_norm": float(torch.linalg.vector_norm(g.to(torch.float64)))}


def adam_preconditioner(model: torch.nn.Module, optimizer) -> dict[str, torch.Tensor] | None:
    """``{name: diagonal of P}`` of Adam/AdamW: ``P = (1 − β₁ᵗ)(√(v / (1 − β₂ᵗ)) + ε)``.

    None before the optimizer's first step (no state yet). Raises FlatscopeError for an optimizer
    whose parameter groups carry no ``betas`` or whose state has no ``exp_avg_sq``.
    """
    if not has_second_moments(optimizer):
        raise FlatscopeError(_no_second_moments(optimizer))
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        st = optimizer.state.get(p, {})
        if "exp_avg_sq" not in st or id(p) not in group_of:
            return None
        g = group_of[id(p)]
        b1, b2 = g["betas"]
        t = float(st["step"])
        v_hat = st["exp_avg_sq"].detach().to(torch.float64) / (1 - b2**t)
        out[name] = (1 - b1**t) * (v_hat.sqrt() + g["eps"])
    return out


def has_second_moments(optimizer) -> bool:
    groups = getattr(optimizer, "param_groups", None)
    return bool(groups) and all("betas" in g and "eps" in g for g in groups or ())


def _no_second_moments(optimizer) -> str:
    return (
        f"measure pre_lambda_max needs an optimizer with second-moment state (Adam, AdamW) or a "
        f"preconditioner= function; {type(optimizer).__name__} has none"
    )


@register_measure
class PreLambdaMax(Measure):
    name = "pre_lambda_max"
    doc = "preconditioned sharpness lambda_max(P^-1 H) of Adam/AdamW (Cohen et al. 2022)"

    def check_optimizer(self, optimizer, preconditioner):
        if preconditioner is None and optimizer is not None and not has_second_moments(optimizer):
            raise FlatscopeError(_no_second_moments(optimizer))

    def __call__(self, ctx):
        if ctx.preconditioner is None and ctx.optimizer is None:
            raise FlatscopeError("measure pre_lambda_max needs the optimizer: pass optimizer= to step()")
        self.check_optimizer(ctx.optimizer, ctx.preconditioner)
        fn = ctx.preconditioner or adam_preconditioner
        P = fn(ctx.model, ctx.optimizer)
        if P is None:
            return {
                "pre_lambda_max": math.nan,
                "pre_lambda_max_residual": math.nan,
                "pre_lambda_max_converged": 0.0,
                "pre_lambda_max_hvps": 0.0,
            }
        layout = ctx.obj.layout
        missing = [n for n in layout.names if n not in P]
        if missing:
            raise FlatscopeError(f"the preconditioner gives no diagonal for parameter {missing[0]}")
        d = layout.flatten({n: P[n].to(torch.float64).reshape(s) for n, s in zip(layout.names, layout.shapes)})
        if not (torch.isfinite(d).all() and (d > 0).all()):
            raise FlatscopeError("the preconditioner's diagonal must be finite and positive")
        s = d.rsqrt().to(ctx.obj.device)

        def mv(V):
            return ctx.hvp((V * s).to(ctx.obj.dtype)).to(torch.float64) * s

        res, n = ctx.eig(self.key, mv, 1, "largest")
        return _eig_row("pre_lambda_max", res, n, ["pre_lambda_max"])


def parse_measures(measures: Iterable[str] | str) -> list[Measure]:
    """``["lambda_max", "trace:30", "local_energy:0.05"]`` (or one comma-separated string) to measures."""
    if isinstance(measures, str):
        measures = [m for m in measures.split(",")]
    out: list[Measure] = []
    for text in measures:
        text = str(text).strip()
        name, sep, arg = text.partition(":")
        if name not in MEASURES:
            hint = "; sharpness:RHO is not available yet" if name == "sharpness" else ""
            raise FlatscopeError(f"unknown measure {text!r}; choose from {', '.join(MEASURES)}{hint}")
        m = MEASURES[name](arg if sep else None)
        if m.key in {o.key for o in out}:
            raise FlatscopeError(f"measure {text!r} is given twice")
        out.append(m)
    if not out:
        raise FlatscopeError("no measure to track")
    return out


# ------------------------------------------------------------------------------------------ thresholds
def stability_threshold(lr: float | None, optimizer=None, preconditioned: bool = False) -> float:
    """The sharpness at which the optimizer's step is unstable on a quadratic (Cohen et al. 2021, 2022).

    ``2/η`` for gradient descent; ``(2 + 2β)/η`` for SGD with heavy-ball momentum ``β`` and
    ``(2 + 2β)/((1 + 2β) η)`` with Nesterov momentum (torch's ``SGD`` conventions); for Adam/AdamW
    with ``preconditioned=True`` ``(2 + 2β₁)/((1 − β₁) η)`` (its first-moment average is heavy-ball
    momentum β₁ with step ``(1 − β₁) η`` in the preconditioned coordinates). NaN without a learning rate.
    """
    if lr is None or not lr > 0:
        return math.nan
    groups = getattr(optimizer, "param_groups", None) or [{}]
    g = groups[0]
    if preconditioned and "betas" in g:
        b1 = float(g["betas"][0])
        return (2 + 2 * b1) / ((1 - b1) * lr)
    beta = float(g.get("momentum", 0.0) or 0.0) if "betas" not in g else 0.0
    if beta and g.get("nesterov"):
        return (2 + 2 * beta) / ((1 + 2 * beta) * lr)
    return (2 + 2 * beta) / lr


# ------------------------------------------------------------------------------------------ schedule
def dense_early(every: int, dense_every: int = 1, dense_until: int = 0) -> Callable[[int], bool]:
    """A schedule: every ``dense_every`` steps before ``dense_until``, then every ``every`` steps."""
    for name, v in (("every", every), ("dense_every", dense_every)):
        if int(v) != v or v < 1:
            raise FlatscopeError(f"{name} must be a whole number of at least 1, got {v}")

    def due(step: int) -> bool:
        return step % dense_every == 0 if step < dense_until else step % every == 0

    return due


def _schedule(every, schedule) -> Callable[[int], bool]:
    if schedule is not None:
        if callable(schedule):
            return schedule
        steps = {int(s) for s in schedule}
        if not steps or min(steps) < 0:
            raise FlatscopeError("schedule must hold non-negative step numbers")
        return steps.__contains__
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every <= 0:
        raise FlatscopeError(f"every must be a whole number of steps of at least 1, got {every!r}")
    every = int(every)
    return lambda step: step % every == 0


# ------------------------------------------------------------------------------------------ HDF5 rows
def append_row(
    path: str,
    row: Mapping[str, float],
    *,
    summary_extra: dict | None = None,
    options: dict | None = None,
    provenance: dict | None = None,
    group: str = GROUP,
    fresh: bool = False,
) -> None:
    """Append one row to ``group`` of ``path`` atomically (:func:`flatscope.results.update`).

    Columns are 1-D resizable float64 datasets (``step`` int64); a column that first appears in a
    later row is back-filled with NaN, and a column a row lacks gets NaN. ``fresh=True`` replaces
    an existing group (the first row of a new run).
    """
    with store.update(path) as f:
        if fresh and group in f:
            del f[group]
        if group in f and f[group].attrs.get("kind") != "track":
            raise FlatscopeError(f"{path}: /{group} holds a {f[group].attrs.get('kind')!r} result, not a track")
        g = f.require_group(group)
        n = int(g["step"].shape[0]) if "step" in g else 0
        for k in row:
            if k not in g:
                dt = np.int64 if k == "step" else np.float64
                g.create_dataset(
                    k, data=np.full(n, np.nan if dt is np.float64 else 0, dtype=dt), maxshape=(None,), chunks=True
                )
        for k, ds in g.items():
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
                continue
            ds.resize((n + 1,))
            ds[n] = row.get(k, np.nan)
        g.attrs["kind"] = "track"
        g.attrs["summary"] = json.dumps(store.to_jsonable(dict(track_summary(g), **(summary_extra or {}))))
        g.attrs["options"] = json.dumps(store.to_jsonable(options or {}))
        for k, v in (provenance or {}).items():
            if v is not None:
                g.attrs[k] = store._attr_value(v)


_NOT_SUMMARIZED = ("step", "wall_time_s")
# Bookkeeping columns: their last value is summarized, their maximum is not.
_NO_MAX = ("acc", "test_acc", "loss", "test_loss", "lr", "two_over_lr", "threshold", "cost_s", "hvps")
_NO_MAX_SUFFIX = ("_residual", "_converged", "_hvps", "_stderr")


def track_summary(g) -> dict:
    """``rows``, ``last_step``, and ``<column>_last`` / ``<column>_max`` of every column of a track group."""
    cols = {
        k: np.asarray(ds[()], dtype=np.float64) for k, ds in g.items() if isinstance(ds, h5py.Dataset) and ds.ndim == 1
    }
    steps = cols.get("step", np.zeros(0))
    out: dict = {"rows": int(steps.size), "last_step": int(steps[-1]) if steps.size else None}
    for k, v in cols.items():
        if k in _NOT_SUMMARIZED or v.size == 0:
            continue
        out[f"{k}_last"] = float(v[-1])
        if k in _NO_MAX or k.endswith(_NO_MAX_SUFFIX):
            continue
        fin = v[np.isfinite(v)]
        out[f"{k}_max"] = float(fin.max()) if fin.size else math.nan
        if k.startswith("lambda_min"):
            out[f"{k}_min"] = float(fin.min()) if fin.size else math.nan
    if "hvps" in cols and cols["hvps"].size:
        out["hvps_total"] = float(np.nansum(cols["hvps"]))
    if "cost_s" in cols and cols["cost_s"].size:
        out["cost_s_total"] = float(np.nansum(cols["cost_s"]))
    if "lambda_max" in cols and "lr" in cols and cols["lr"].size:
        out["lambda_max_lr_last"] = float(cols["lambda_max"][-1] * cols["lr"][-1])
    return out


def read_track(path: str, group: str = GROUP) -> dict[str, np.ndarray]:
    """The columns of a stored track as arrays."""
    with store.open_results(path) as f:
        if group not in f or f[group].attrs.get("kind") != "track":
            raise FlatscopeError(f"{path} holds no /{group} track")
        return {k: ds[()] for k, ds in f[group].items() if isinstance(ds, h5py.Dataset)}


# ------------------------------------------------------------------------------------------ monitor
def _as_data(data, samples: int | None, seed: int):
    """A seeded subset of ``samples`` items of the data, as a :class:`~flatscope.sources.Source`:
    ``(inputs, targets)``, a flatscope Dataset (its training split), a map-style Dataset or a Source."""
    from .data import Dataset, subsample_source
    from .sources import as_source

    if data is None:
        return None
    if isinstance(data, Dataset):
        src = data.source("train")
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        src = as_source(data[0], data[1], name="data")
    else:
        try:
            src = as_source(data, name="data")
        except FlatscopeError:
            raise FlatscopeError("data must be (inputs, targets) tensors, a Dataset or a flatscope Dataset") from None
    return subsample_source(src, samples, seed)


@dataclass
class MonitorOptions:
    measures: list[str]
    every: int | None
    samples: int | None
    batch_size: int | None
    seed: int
    tol: float
    warm_start: bool
    loss: str | None
    n_eval: int = 0
    n_test: int = 0
    extra: dict = field(default_factory=dict)


class CurvatureMonitor:
    """Track Hessian curvature (and flatness) of ``model`` at scheduled training steps.

    Arguments:
        model: the network being trained (never modified; measured on a copy in eval mode).
        loss: ``"ce"``, ``"lm"``, ``"bce"``, ``"mse"``, a :class:`flatscope.losses.Loss` or a function
            ``fn(outputs, targets) -> mean loss``.
        data: the evaluation data, ``(inputs, targets)`` or a flatscope Dataset (its training split);
            a seeded subset of ``samples`` rows (all when ``None``) is fixed at construction.
        every: measure at steps ``0, every, 2 every, ...`` (ignored when ``schedule`` is given).
        schedule: a predicate ``step -> bool`` (e.g. :func:`dense_early`) or an iterable of steps.
        measures: see the module docstring.
        log: an HDF5 results file; every row is appended to ``/track`` atomically.
        test: optional second ``(inputs, targets)`` whose loss and accuracy each row records
            (``test_loss``, ``test_acc``), subsampled like ``data``.
        tol: relative residual tolerance of Lanczos (``||Hv − λv|| ≤ tol · |λ_max|``).
        warm_start: start Lanczos from the previous call's Ritz vectors.
        objective: a factory ``model -> Objective`` that replaces ``loss``/``data`` (custom losses).
        optimizer: checked at construction against the measures (e.g. ``pre_lambda_max``).
        preconditioner: ``fn(model, optimizer) -> {param name: diagonal of P}`` for ``pre_lambda_max``.
        provenance, options: extra attrs for the stored group (``flatscope train`` passes its own).
        resume: keep an existing ``/track`` in ``log`` and append to it (default: replace it).

    :meth:`step` measures when the schedule says so and returns the row (a dict), else None.
    ``rows`` keeps every row in memory too.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: str | None = "ce",
        data=None,
        *,
        every: int = 50,
        schedule=None,
        measures: Iterable[str] | str = ("lambda_max",),
        log: str | None = None,
        samples: int | None = 512,
        batch_size: int | None = None,
        test=None,
        seed: int = 0,
        tol: float = 1e-4,
        warm_start: bool = True,
        device=None,
        dtype: torch.dtype | None = None,
        objective: Callable[[torch.nn.Module], Objective] | None = None,
        optimizer=None,
        preconditioner: Callable | None = None,
        provenance: dict | None = None,
        options: dict | None = None,
        resume: bool = False,
    ):
        self.due = _schedule(every, schedule)
        self.measures = parse_measures(measures)
        if samples is not None and (int(samples) != samples or samples < 1):
            raise FlatscopeError(f"samples must be at least 1, got {samples}")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise FlatscopeError(f"tol must be positive, got {tol}")
        if log is not None:
            if not str(log).endswith((".h5", ".hdf5")) and not os.path.exists(log):
                raise FlatscopeError(f"log {log} must be an HDF5 results file (.h5 or .hdf5)")
            store.check_output_path(log)
        for m in self.measures:
            m.check_optimizer(optimizer, preconditioner)
        if objective is None:
            from .losses import make_loss

            loss = make_loss(loss)  # type: ignore[assignment]  # a name, a Loss, or fn(outputs, targets)
            if data is None:
                raise FlatscopeError("give the evaluation data (data=) or an objective factory (objective=)")
        p = next(iter(model.parameters()), None)
        self.device = (
            torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
        )
        self.dtype = dtype or (p.dtype if p is not None and p.is_floating_point() else torch.float32)
        self.model = model
        self.loss = loss
        self.batch_size = batch_size
        self.seed = int(seed)
        self.tol = float(tol)
        self.warm_start = bool(warm_start)
        self.preconditioner = preconditioner
        self.eval_data = _as_data(data, samples, self.seed) if objective is None else None
        self.test_data = _as_data(test, samples, self.seed) if test is not None else None
        self._factory = objective
        self.log = log
        self.rows: list[dict] = []
        self.warm: dict = {}
        self.started = time.time()
        self._fresh = not resume
        self.provenance = dict(provenance or {})
        self.options = MonitorOptions(
            [m.key if not isinstance(m, LocalEnergy) else f"local_energy:{m.arg}" for m in self.measures],
            int(every) if schedule is None else None,
            samples,
            batch_size,
            self.seed,
            self.tol,
            self.warm_start,
            getattr(loss, "name", loss) if objective is None else None,
            0 if self.eval_data is None else len(self.eval_data),
            0 if self.test_data is None else len(self.test_data),
            dict(options or {}),
        )

    def _objective(self, model: torch.nn.Module, data=None) -> Objective:
        if data is None and self._factory is not None:
            return self._factory(model)
        src = data if data is not None else self.eval_data
        return Objective(
            model, data=src, loss=self.loss, batch_size=self.batch_size, device=self.device, dtype=self.dtype
        )

    def step(
        self,
        step: int,
        *,
        lr: float | None = None,
        optimizer=None,
        model: torch.nn.Module | None = None,
        force: bool = False,
        **extra: float,
    ) -> dict | None:
        """Measure at ``step`` if the schedule says so (or ``force``); returns the row or None.

        ``lr`` gives ``two_over_lr`` and ``threshold``; ``optimizer`` is read (never changed) for the
        momentum, Adam's state and ``pre_lambda_max``; ``model`` measures another module than the
        one given at construction (e.g. the centre of replicated SGD); ``extra`` numbers (the
        minibatch loss, ...) are stored as columns of the row.
        """
        if not force and not self.due(int(step)):
            return None
        return self.measure(int(step), lr=lr, optimizer=optimizer, model=model, **extra)

    def measure(
        self,
        step: int,
        *,
        lr: float | None = None,
        optimizer=None,
        model: torch.nn.Module | None = None,
        **extra: float,
    ) -> dict:
        """Measure now, record the row (and append it to ``log``), and return it."""
        model = self.model if model is None else model
        t0 = time.perf_counter()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the global RNG is left as it was
            obj = self._objective(model)
            ctx = Context(
                obj, model, optimizer, lr, self.tol, self.seed, self.warm, self.warm_start, self.preconditioner
            )
            row: dict = {"step": int(step)}
            loss, acc = obj.evaluate()
            row["loss"], row["acc"] = float(loss), float(acc)
            if self.test_data is not None:
                row["test_loss"], row["test_acc"] = map(float, self._objective(model, self.test_data).evaluate())
            if lr is not None:
                row["lr"] = float(lr)
                row["two_over_lr"] = 2.0 / float(lr) if lr > 0 else math.nan
                pre = any(isinstance(m, PreLambdaMax) for m in self.measures)
                row["threshold"] = stability_threshold(float(lr), optimizer, preconditioned=pre)
            for k, v in extra.items():
                row[k] = float(v)
            for m in self.measures:
                row.update(m(ctx))
            row["hvps"] = float(ctx.hvps)
        row["cost_s"] = time.perf_counter() - t0
        row["wall_time_s"] = time.time() - self.started
        self.rows.append(row)
        if self.log is not None:
            self._write(row)
        return row

    def _write(self, row: dict) -> None:
        opts = self.options
        options = {
            "measures": opts.measures,
            "every": opts.every,
            "samples": opts.samples,
            "n_eval": opts.n_eval,
            "n_test": opts.n_test,
            "batch_size": opts.batch_size,
            "seed": opts.seed,
            "tol": opts.tol,
            "warm_start": opts.warm_start,
            "loss": opts.loss,
            **opts.extra,
        }
        prov = {
            "flatscope_version": __version__,
            "torch_version": str(torch.__version__),
            "seed": self.seed,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "wall_time_s": time.time() - self.started,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        prov.update({k: v for k, v in self.provenance.items() if k not in ("wall_time_s", "timestamp")})
        append_row(str(self.log), row, options=options, provenance=prov, fresh=self._fresh)
        self._fresh = False

    def columns(self) -> dict[str, np.ndarray]:
        """The rows so far as ``{column: array}`` (NaN where a row lacks a column)."""
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        return {k: np.asarray([r.get(k, math.nan) for r in self.rows], dtype=np.float64) for k in keys}
