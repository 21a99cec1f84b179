"""The Hessian of the whole-split mean loss: extremal eigenpairs, spectral density, trace, per-layer
spectra and flatness summaries, all from Hessian-vector products.

``H = d^2 L / dw^2`` at the checkpoint's weights ``w0``, for ``L(w)`` the mean loss over the split
(:class:`flatscope.objective.Objective`: eval mode, batches weighted by size, exact over the split).
Nothing is sampled except the stochastic probes of the trace and the density, whose errors are
reported.

Quantities (``summary()`` names, thresholdable by ``flatscope audit`` as ``hessian.<name>``):

- ``lambda_max``: the largest eigenvalue (top Lanczos Ritz value).
- ``lambda_min``: the smallest (most negative) eigenvalue: the bottom Lanczos Ritz value when
  ``bottom >= 1``; otherwise the smallest SLQ node, which lies in ``[lambda_min, lambda_max]`` and
  so only bounds it from above (``lambda_min_source`` says which); NaN without either.
- ``lambda_k``: the k-th largest eigenvalue, ``k`` = number of top eigenvalues asked for.
- ``lambda_ratio``: ``lambda_max / lambda_k``, how dominant the top direction is among the top k.
- ``trace``, ``trace_stderr``: ``tr H`` by Hutch++ (or Hutchinson) with its standard error (exact
  when the probe budget reaches the dimension).
- ``effective_rank``: ``tr H / lambda_max``, the number of directions as curved as the sharpest
  that would carry the whole trace (the "intrinsic dimension" of a PSD matrix, Tropp 2015; it lies
  in ``[1, n]`` for a PSD Hessian and is smaller for sharper, lower-rank curvature).
- ``negative_mass``: ``int_{t<0} |t| phi(t) dt / int |t| phi(t) dt`` for the spectral density ``phi``
  (SLQ Gauss rules, un-broadened): the share of the absolute curvature that is negative; 0 at a
  minimum, up to 1 at a maximum. ``negative_fraction``: the fraction of eigenvalues that are
  negative. The Gauss rules' own count ``sum_{node<0} w`` is biased by the quadrature (a node near 0
  carries a whole neighbourhood of the near-zero bulk to one side: 0.300 against an exact 0.334 on a
  1,461-parameter Hessian, in float32 and float64 alike), so it comes instead from Gauss-Radau rules
  with a node fixed at 0, which bound each probe's count exactly
  (:meth:`flatscope.linalg.SLQResult.count_bracket`): the estimate is the mean midpoint of those
  brackets, ``negative_fraction_stderr`` its standard error over probes and
  ``negative_fraction_bias_bound`` the mean half-width (the largest quadrature bias left; it
  shrinks with ``--steps``); ``negative_fraction_err`` is their sum.
- ``converged``: whether every requested Ritz pair met ``||Hv - lambda v|| <= tol * |lambda_max|``.
- ``n_matvec``: Hessian-vector products spent in total.

Hessian-vector products (:class:`HessianOperator`) are the objective's own: by default
:meth:`Objective.hvp_operator` builds every batch's linearization once and each product is one
more backward pass through it (reverse-over-reverse with a cache), measured faster than rebuilding
it for every product (benchmarks/RESULTS.md). The cache holds one graph per batch and is kept only
when their measured bytes fit the objective's memory budget (:func:`plan_memory`);
``hvp="double-backward"`` keeps only one batch in memory at a time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import FlatscopeError
from ..linalg import EigResult, SLQResult, TraceResult, lanczos, slq, trace
from ..memory import (
    WORK_VECTORS,
    MemoryBudget,
    basis_dtype,
    format_size,
    lanczos_bytes,
    lanczos_default_basis,
    plan_lanczos,
    vector_bytes,
)
from ..objective import Objective

if TYPE_CHECKING:
    from ..sharding import ParamShard

HVP_MODES = ("auto", "cached", "double-backward")


class HessianOperator:
    """``V -> H V`` for the Hessian of ``obj``'s split loss at ``w`` (default ``obj.w0``), counting
    products; a thin wrapper over the objective's own products.

    Call with a tensor of shape ``(dim,)`` or ``(b, dim)``. ``n_matvec`` counts the vectors
    multiplied so far. ``restrict(sl)`` gives the operator of the diagonal block ``H[sl, sl]``
    (products embed the block vector in zeros and keep the block of the result).

    ``mode``: ``cached`` (:meth:`Objective.hvp_operator`: each batch's linearization built once and
    reused, one backward pass per product), ``double-backward`` (rebuilt for every product, one
    batch in memory at a time), or ``auto`` = ``cached`` when every batch's linearization fits the
    objective's memory budget beside ``reserved`` bytes (the caller's vectors;
    :meth:`Objective.cache_fits`), else ``double-backward``. A budget too small for one batch is
    refused here, before any product.
    """

    def __init__(self, obj: Objective, w: torch.Tensor | None = None, mode: str = "auto", reserved: float = 0.0):
        if mode not in HVP_MODES:
            raise FlatscopeError(f"unknown HVP mode {mode!r}; choose from {', '.join(HVP_MODES)}")
        self.obj = obj
        self.w = (obj.w0 if w is None else obj._check_w(w)).detach()
        self.reserved = float(reserved)
        if obj.resolve_hvp_mode() == "fd":
            self.mode = "fd"
        else:
            obj.require_batch()
            if mode == "auto":
                mode = "cached" if obj.cache_fits(self.reserved) else "double-backward"
            self.mode = mode
        self.n_matvec = 0
        self.seconds = 0.0  # spent in products after the first (which may build the cache)
        self._timed = 0
        self._cached = None

    @property
    def dim(self) -> int:
        return self.obj.dim

    @property
    def seconds_per_product(self) -> float | None:
        """Mean seconds per vector over the products timed so far (the ETA of the next stages)."""
        return self.seconds / self._timed if self._timed else None

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        first = self.n_matvec == 0
        if self.mode == "fd":
            out = self.obj.hvp(V, self.w)
        else:
            if self._cached is None:
                self._cached = self.obj.hvp_operator(self.w, self.reserved, cache=self.mode == "cached")
            out = self._cached(V)
        b = 1 if V.dim() == 1 else V.shape[0]
        self.n_matvec += b
        if not first:
            self.seconds += time.perf_counter() - t0
            self._timed += b
        return out

    def restrict(self, sl: slice) -> Callable[[torch.Tensor], torch.Tensor]:
        n = sl.stop - sl.start

        def mv(Vb: torch.Tensor) -> torch.Tensor:
            V = torch.zeros(Vb.shape[0], self.dim, dtype=self.obj.dtype, device=self.obj.device)
            V[:, sl] = Vb.to(self.obj.device, self.obj.dtype)
            return self(V)[:, sl]

        mv.dim = n  # type: ignore[attr-defined]
        return mv

    def release(self) -> None:
        """Drop the cached linearizations (frees their memory)."""
        self._cached = None


def top_eigenvectors(
    obj: Objective, k: int = 2, *, tol: float = 1e-5, max_iter: int | None = None, seed: int = 0, hvp: str = "auto"
) -> EigResult:
    """The ``k`` largest Hessian eigenpairs of ``obj`` at ``obj.w0`` (e.g. landscape directions).

    ``res.eigenvectors`` is a ``(k, obj.dim)`` float64 tensor on ``obj.device`` with unit rows, in
    ``obj.layout`` order (``obj.layout.unflatten(res.eigenvectors[0])`` gives named tensors).
    """
    plan, op = plan_memory(
        obj, top=k, max_iter=max_iter, density=False, trace_probes=0, hvp=hvp, vector_dtype=torch.float64
    )
    try:
        return lanczos(
            op,
            obj.dim,
            k,
            "largest",
            tol=tol,
            max_iter=max_iter,
            max_basis=plan.max_basis,
            seed=seed,
            device=obj.device,
        )
    finally:
        op.release()


@dataclass
class MemoryPlan:
    """How the Hessian analysis cuts its work to fit the memory budget; it never changes a result.

    Bytes: ``budget`` (the objective's device), ``basis_budget`` (the vectors' device), ``batch_bytes``
    (one batch's linearization, measured), ``vector_bytes`` (one vector in ``basis_dtype``). ``cached``:
    whether the per-batch linearizations are kept; ``max_basis``/``max_basis_bottom``: where the Lanczos
    bases restart; ``probe_batch``: SLQ probes run side by side; ``trace_batch``: trace probes
    multiplied side by side."""

    budget: float
    basis_budget: float
    batch_bytes: int
    vector_bytes: int
    basis_dtype: str
    basis_device: str
    cached: bool
    max_basis: int
    max_basis_bottom: int
    probe_batch: int
    trace_batch: int = 8

    def to_dict(self) -> dict:
        return {k: (None if v == math.inf else v) for k, v in self.__dict__.items()}


def plan_memory(
    obj: Objective,
    *,
    top: int,
    bottom: int = 0,
    block_size: int = 1,
    max_iter: int | None = None,
    max_basis: int | None = None,
    density: bool = True,
    probes: int = 8,
    steps: int = 80,
    slq_reorth: str = "full",
    trace_probes: int = 60,
    trace_method: str = "hutch++",
    trace_batch: int = 8,
    hvp: str = "auto",
    vector_dtype: torch.dtype | None = None,
) -> tuple[MemoryPlan, HessianOperator]:
    """Size every stage of :func:`hessian_analysis` to the objective's memory budget, before any work.

    The peak of a stage is one batch's pass (and the linearization cache when it fits) plus its
    vectors: Lanczos ``(m + b + k + c b) n`` (:func:`flatscope.memory.lanczos_bytes`), Hutch++
    ``(r + c b) n`` (the sketch, orthonormalized in place, ``r = trace_probes // 3``, and
    ``b`` probes side by side, as many as fit up to ``trace_batch``), SLQ ``p (steps + c) n`` for ``p``
    probes side by side, ``n`` entries of the basis dtype each. The cache is kept when it fits beside
    the largest of the default Lanczos basis and the smallest other stage; then each Lanczos basis is
    its default lowered to what fits, and ``p`` as many probes as fit. A stage whose least form does
    not fit (``k + 2 b`` Lanczos vectors, the Hutch++ sketch, one probe) is refused with what it needs.
    """
    n = obj.dim
    bdt = vector_dtype or basis_dtype(obj.dtype)
    bdev = obj.basis_device
    vec = vector_bytes(n, bdt)
    same = bdev == obj.device
    vb: MemoryBudget = obj.memory_on(bdev)
    b = min(block_size, n)
    mb_top = min(n, max_basis if max_basis is not None else lanczos_default_basis(top, n, max_iter))
    mb_bot = min(n, max_basis if max_basis is not None else lanczos_default_basis(max(bottom, 1), n, max_iter))
    r = trace_probes // 3 if trace_method == "hutch++" and 6 <= trace_probes < n else 0
    tb = min(trace_batch, trace_probes)
    need_trace = (r + WORK_VECTORS * tb) * vec
    probe_vectors = (min(steps, n) if slq_reorth == "full" else min(2, n)) + WORK_VECTORS
    need_probe = probe_vectors * vec
    prefer = max(
        lanczos_bytes(mb_top, top, b, vec),
        lanczos_bytes(mb_bot, bottom, b, vec) if bottom else 0,
        need_trace,
        need_probe if density else 0,
    )
    op = HessianOperator(obj, mode=hvp, reserved=prefer if same else 0.0)
    one = obj.batch_bytes() if obj.memory.limit != math.inf and op.mode != "fd" else 0
    if op.mode == "fd" and obj.memory.limit != math.inf:
        one = 4 * obj.batch_bytes(linearization=False)  # two gradients of the widened objective
    n_batches = sum(1 for c in obj._batch_counts() if c)
    held = one * (n_batches + 1) if op.mode == "cached" else 2 * one
    res_b = held if same else 0
    beside = f", beside {format_size(res_b)} for the Hessian-vector products" if res_b else ""

    def lanczos_plan(k: int, mb: int, name: str) -> int:
        if max_basis is not None:
            least = min(n, k + 2 * b)
            if max_basis < least:
                raise FlatscopeError(f"--max-basis {max_basis} is below {least} (K + 2 x --block-size)")
            vb.require(
                res_b + lanczos_bytes(min(n, max_basis), k, b, vec),
                f"{name} with --max-basis {max_basis} ({min(n, max_basis)} vectors of {format_size(vec)}{beside})",
                hint="lower --max-basis or raise --memory-budget",
            )
            return min(n, max_basis)
        return plan_lanczos(vb, n, k, b, vec, res_b, max_iter, name, beside)

    m_top = lanczos_plan(top, mb_top, f"--top {top}")
    m_bot = lanczos_plan(bottom, mb_bot, f"--bottom {bottom}") if bottom else 0
    vb.require(
        res_b + (r + WORK_VECTORS) * vec,
        f"--trace-probes {trace_probes} ({trace_method}: {r + WORK_VECTORS} vectors of {format_size(vec)}{beside})",
        hint="use fewer --trace-probes or --trace-method hutchinson, or raise --memory-budget",
    )
    tb = vb.count(WORK_VECTORS * vec, res_b + r * vec, most=tb)  # probes side by side: as many as fit
    p = 0
    if density:
        vb.require(
            res_b + need_probe,
            f"--steps {steps} (one SLQ probe: {probe_vectors} vectors of {format_size(vec)}{beside})",
            hint="use fewer --steps, --slq-reorth none (2 vectors a probe) or raise --memory-budget"
            if slq_reorth == "full"
            else "raise --memory-budget",
        )
        p = vb.count(need_probe, res_b, most=probes)
    plan = MemoryPlan(
        budget=obj.memory.limit,
        basis_budget=vb.limit,
        batch_bytes=int(one),
        vector_bytes=int(vec),
        basis_dtype=str(bdt).replace("torch.", ""),
        basis_device=str(bdev),
        cached=op.mode == "cached",
        max_basis=int(m_top),
        max_basis_bottom=int(m_bot),
        probe_batch=int(p),
        trace_batch=int(tb),
    )
    return plan, op


@dataclass
class HessianResult:
    dim: int
    n_samples: int
    k: int
    top: EigResult | None
    bottom: EigResult | None = None
    density: SLQResult | None = None
    slq_reorth: str = "full"
    sigma: float = float("nan")
    grid: np.ndarray | None = None
    values: np.ndarray | None = None
    traces: TraceResult | None = None
    per_layer: dict | None = None
    layout: dict | None = None
    save_eigenvectors: bool = False
    hvp_mode: str = ""
    hvp_fd_rel_error: float | None = None  # --hvp fd: measured relative error on a probe (None: no exact HVP)
    hvp_fd_accuracy: str | None = None  # --hvp fd where no number can be given, why (under FSDP)
    n_matvec: int = 0
    seconds: dict = field(default_factory=dict)
    nonfinite: str | None = None
    warnings: list = field(default_factory=list)
    memory: dict | None = None  # MemoryPlan.to_dict(): how the work was cut to the memory budget

    # ------------------------------------------------------------------ flatness numbers
    def _eig(self, r: EigResult | None, attr: str) -> np.ndarray:
        return np.asarray(getattr(r, attr)) if r is not None else np.zeros(0)

    @property
    def lambda_min(self) -> tuple[float, str]:
        if self.bottom is not None and len(self.bottom.eigenvalues):
            return float(self.bottom.eigenvalues[0]), "lanczos"
        if self.density is not None and self.density.n_probes:
            x = self.density.nodes[self.density.weights > 0]
            return float(np.min(x)), "slq"
        return float("nan"), "none"

    def negative(self) -> tuple[float, dict]:
        """(negative mass, :meth:`SLQResult.fraction_below` at 0), NaN without a density."""
        nan = float("nan")
        if self.density is None or not self.density.n_probes:
            return nan, {"estimate": nan, "stderr": nan, "bias_bound": nan, "err": nan}
        d = self.density
        neg_abs = d.probe_integrals(lambda x: np.where(x < 0, -x, 0.0)).mean()
        tot_abs = d.probe_integrals(np.abs).mean()
        return (float(neg_abs / tot_abs) if tot_abs > 0 else nan), d.fraction_below(0.0)

    def summary(self) -> dict:
        ev = self._eig(self.top, "eigenvalues")
        lmax = float(ev[0]) if len(ev) else float("nan")
        lk = float(ev[self.k - 1]) if len(ev) >= self.k else float("nan")
        tr = self.traces.trace if self.traces is not None else float("nan")
        se = self.traces.stderr if self.traces is not None else float("nan")
        neg_mass, neg_frac = self.negative()
        conv = [self.top] + ([self.bottom] if self.bottom is not None else [])
        converged = all(r is not None and len(r.converged) and bool(np.all(r.converged)) for r in conv)
        return {
            "lambda_max": lmax,
            "lambda_min": self.lambda_min[0],
            "lambda_k": lk,
            "lambda_ratio": lmax / lk if len(ev) >= self.k and lk != 0 else float("nan"),
            "trace": tr,
            "trace_stderr": se,
            "effective_rank": tr / lmax if lmax and np.isfinite(lmax) and lmax > 0 else float("nan"),
            "negative_mass": neg_mass,
            "negative_fraction": neg_frac["estimate"],
            "negative_fraction_err": neg_frac["err"],
            "negative_fraction_stderr": neg_frac["stderr"],
            "negative_fraction_bias_bound": neg_frac["bias_bound"],
            "converged": converged,
            "n_matvec": int(self.n_matvec),
            "dim": int(self.dim),
            **({"hvp_fd_rel_error": self.hvp_fd_rel_error} if self.hvp_fd_rel_error is not None else {}),
        }

    # ------------------------------------------------------------------ serialisation
    def to_tree(self) -> dict:
        t: dict = {}
        if self.top is not None:
            t.update(
                eigenvalues=self.top.eigenvalues,
                residuals=self.top.residuals,
                converged=self.top.converged.astype(bool),
                status=self.top.status,
                n_matvec_top=np.int64(self.top.n_matvec),
            )
            if self.save_eigenvectors:
                V = self.top.eigenvectors.detach().cpu().to(torch.float64)  # stored float64, unit rows
                t["eigenvectors"] = (V / torch.linalg.norm(V, dim=1, keepdim=True)).numpy()
                t["layout"] = json.dumps(self.layout)
        if self.bottom is not None:
            t.update(
                bottom_eigenvalues=self.bottom.eigenvalues,
                bottom_residuals=self.bottom.residuals,
                bottom_converged=self.bottom.converged.astype(bool),
                bottom_status=self.bottom.status,
                n_matvec_bottom=np.int64(self.bottom.n_matvec),
            )
        if self.density is not None:
            t["density"] = {
                "grid": self.grid,
                "values": self.values,
                "nodes": self.density.nodes,
                "weights": self.density.weights,
                "sigma": np.float64(self.sigma),
                "n_matvec": np.int64(self.density.n_matvec),
                "reorthogonalized": self.slq_reorth == "full",
            }
        if self.traces is not None:
            t.update(
                trace=np.float64(self.traces.trace),
                trace_stderr=np.float64(self.traces.stderr),
                trace_method=self.traces.method,
                n_matvec_trace=np.int64(self.traces.n_matvec),
            )
            if self.traces.method != "exact":
                t["trace_samples"] = self.traces.samples
        if self.per_layer is not None:
            pl = dict(self.per_layer)
            pl["names"] = json.dumps(pl["names"])
            t["per_layer"] = pl
        s = self.summary()
        t["lambda_min_source"] = self.lambda_min[1]
        t.update(
            n_matvec=np.int64(self.n_matvec),
            dim=np.int64(self.dim),
            n_samples=np.int64(self.n_samples),
            effective_rank=np.float64(s["effective_rank"]),
            negative_mass=np.float64(s["negative_mass"]),
            negative_fraction=np.float64(s["negative_fraction"]),
            negative_fraction_err=np.float64(s["negative_fraction_err"]),
            hvp=self.hvp_mode,
        )
        if self.hvp_fd_accuracy:
            t["hvp_fd_accuracy"] = self.hvp_fd_accuracy
        if self.nonfinite:
            t["nonfinite"] = self.nonfinite
        return t

    def to_json(self) -> dict:
        out = dict(self.summary())
        out["lambda_min_source"] = self.lambda_min[1]
        if self.top is not None:
            out.update(
                eigenvalues=self.top.eigenvalues.tolist(),
                residuals=self.top.residuals.tolist(),
                eigen_converged=self.top.converged.tolist(),
                eigen_status=self.top.status,
            )
        if self.bottom is not None:
            out.update(
                bottom_eigenvalues=self.bottom.eigenvalues.tolist(),
                bottom_residuals=self.bottom.residuals.tolist(),
                bottom_converged=self.bottom.converged.tolist(),
                bottom_status=self.bottom.status,
            )
        if self.traces is not None:
            out["trace_method"] = self.traces.method
        if self.density is not None:
            m, se = self.density.integral(lambda x: x)
            out["density"] = {
                "n_probes": self.density.n_probes,
                "n_steps": self.density.n_steps,
                "reorthogonalized": self.slq_reorth == "full",
                "sigma": self.sigma,
                "mean": m,
                "mean_stderr": se,
            }
        if self.per_layer is not None:
            pl = self.per_layer
            out["per_layer"] = [
                {
                    "name": n,
                    "numel": int(pl["numel"][i]),
                    "lambda_max": float(pl["lambda_max"][i]),
                    "residual": float(pl["residuals"][i]),
                    "converged": bool(pl["converged"][i]),
                    "trace": float(pl["trace"][i]),
                    "trace_stderr": float(pl["trace_stderr"][i]),
                }
                for i, n in enumerate(pl["names"])
            ]
        out["hvp"] = self.hvp_mode
        if self.hvp_fd_accuracy:
            out["hvp_fd_accuracy"] = self.hvp_fd_accuracy
        if self.memory is not None:
            out["memory"] = dict(self.memory)
        out["seconds"] = self.seconds
        out["nonfinite"] = self.nonfinite
        out["warnings"] = list(self.warnings)
        return out


def _check(
    obj: Objective,
    top: int,
    bottom: int,
    probes: int,
    steps: int,
    trace_probes: int,
    tol: float,
    max_iter: int | None,
    block_size: int,
    sigma: float,
) -> None:
    n = obj.dim
    if top < 1:
        raise FlatscopeError(f"--top must be at least 1, got {top}")
    if top > n:
        raise FlatscopeError(f"--top {top} is larger than the number of parameters ({n})")
    if bottom < 0:
        raise FlatscopeError(f"--bottom must be 0 or more, got {bottom}")
    if bottom > n:
        raise FlatscopeError(f"--bottom {bottom} is larger than the number of parameters ({n})")
    if probes < 1:
        raise FlatscopeError(f"--probes must be at least 1, got {probes}")
    if steps < 1:
        raise FlatscopeError(f"--steps must be at least 1, got {steps}")
    if trace_probes < 2:
        raise FlatscopeError(f"--trace-probes must be at least 2, got {trace_probes}")
    if not (tol > 0 and math.isfinite(tol)):
        raise FlatscopeError(f"--tol must be a positive number, got {tol}")
    if max_iter is not None and max_iter < max(top, bottom):
        raise FlatscopeError(
            f"--max-iter {max_iter} is below the number of eigenvalues asked for "
            f"({max(top, bottom)}); Lanczos needs at least one product per eigenvalue"
        )
    if block_size < 1:
        raise FlatscopeError(f"--block-size must be at least 1, got {block_size}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise FlatscopeError(f"--sigma must be a positive number, got {sigma}")


def hessian_analysis(
    obj: Objective,
    *,
    top: int = 10,
    bottom: int = 0,
    density: bool = True,
    probes: int = 8,
    steps: int = 80,
    slq_reorth: str = "full",
    sigma: float = 0.01,
    n_grid: int = 1024,
    trace_probes: int = 60,
    trace_method: str = "hutch++",
    per_layer: bool = False,
    save_eigenvectors: bool = False,
    tol: float = 1e-5,
    max_iter: int | None = None,
    block_size: int = 1,
    max_basis: int | None = None,
    seed: int = 0,
    hvp: str = "auto",
    progress: Callable | None = None,
    shard: "ParamShard | None" = None,
) -> HessianResult:
    """Run the Hessian analysis of ``obj`` at ``obj.w0``.

    Stages, each seeded from ``seed`` and each on its own products: top-``top`` eigenpairs
    (:func:`flatscope.linalg.lanczos`), bottom-``bottom`` eigenpairs (most negative end), the
    spectral density (:func:`flatscope.linalg.slq`, ``probes`` x ``steps`` products, fully
    reorthogonalized unless ``slq_reorth="none"`` (2 vectors per probe instead of ``steps``), Gaussian width
    ``sigma`` times the spread of the Ritz nodes, on ``n_grid`` points), the trace
    (:func:`flatscope.linalg.trace`, ``trace_probes`` products, with per-tensor block traces), and
    with ``per_layer`` the top eigenvalue of every parameter tensor's diagonal block ``H[b, b]``
    and its trace: from the trace run's products by the diagonal estimator, or exactly (``numel``
    products, standard error 0) for a tensor no larger than ``trace_probes``.

    A non-finite product stops the analysis: the stages finished before it are kept, the failing
    stage keeps what it had, and ``nonfinite`` says where. A Lanczos run that does not reach
    ``tol`` within ``max_iter`` products adds a line to ``warnings`` and keeps its Ritz pairs.
    ``progress(total, description)`` is a context manager yielding ``advance(n)`` (``Run.progress``).

    Memory (:func:`plan_memory`): the objective's memory budget decides whether linearizations are
    cached, where each Lanczos basis restarts (``max_basis`` overrides it), how many SLQ probes run
    side by side; vectors are float32 for float32 and lower-precision models (float64 for float64)
    and live on ``obj.basis_device``. A stage that cannot fit is refused before any product.

    ``shard`` (:class:`flatscope.sharding.ParamShard`, ``--shard-params``): every vector of the
    linear algebra is this rank's slice of the parameters, the eigenvectors too; ``per_layer`` is
    refused (its blocks would need whole vectors).
    """
    _check(obj, top, bottom, probes, steps, trace_probes, tol, max_iter, block_size, sigma)
    if shard is not None and per_layer:
        raise FlatscopeError("--per-layer does not run with --shard-params (per-tensor blocks need whole vectors)")
    plan, op = plan_memory(
        obj,
        top=top,
        bottom=bottom,
        block_size=block_size,
        max_iter=max_iter,
        max_basis=max_basis,
        density=density,
        probes=probes,
        steps=steps,
        slq_reorth=slq_reorth,
        trace_probes=trace_probes,
        trace_method=trace_method,
        hvp=hvp,
    )
    bdt, bdev = basis_dtype(obj.dtype), obj.basis_device
    mv = shard.operator(op, obj) if shard is not None else op
    space = shard.space if shard is not None else None
    layout = obj.layout
    res = HessianResult(
        dim=obj.dim,
        n_samples=obj.n_total,
        k=top,
        top=None,
        layout=layout.to_attrs(),
        save_eigenvectors=save_eigenvectors,
        hvp_mode=op.mode,
        memory=plan.to_dict(),
        slq_reorth=slq_reorth,
    )
    dev = bdev

    def stage(total: int, desc: str):
        if progress is None:
            import contextlib

            return contextlib.nullcontext(lambda n=1: None)
        if op.seconds_per_product is None:
            return progress(total, desc)
        return progress(total, desc, unit_seconds=op.seconds_per_product)  # ETA before the stage's first product

    def tracked(advance):
        last = [0]

        def cb(n: int) -> None:
            advance(n - last[0])
            last[0] = n

        return cb

    def eig_stage(k: int, which: str, name: str) -> EigResult:
        mi = max_iter if max_iter is not None else max(300, 30 * k)
        t0 = time.perf_counter()
        with stage(min(mi, obj.dim + block_size), f"Lanczos ({name})") as adv:
            r = lanczos(
                mv,
                obj.dim,
                k,
                which,
                tol=tol,
                max_iter=max_iter,
                block_size=block_size,
                max_basis=plan.max_basis if which == "largest" else plan.max_basis_bottom,
                seed=seed,
                dtype=bdt,
                device=dev,
                callback=tracked(adv),
                space=space,
            )
        res.seconds[name] = time.perf_counter() - t0
        res.n_matvec += r.n_matvec
        if r.nonfinite_at is not None:
            res.nonfinite = f"non-finite Hessian-vector product at Lanczos iteration {r.nonfinite_at} ({name})"
        elif not r.all_converged:
            bad = int(np.sum(~r.converged))
            res.warnings.append(
                f"{name}: {bad} of {len(r.converged)} Ritz pairs did not converge to tol {tol:g} "
                f"in {r.n_matvec} products (max residual {np.max(r.residuals) / r.scale:.2e} x |lambda_max|); "
                "raise --max-iter or --tol"
            )
        return r

    try:
        res.top = eig_stage(top, "largest", "top eigenvalues")
        if res.nonfinite is None and bottom > 0:
            res.bottom = eig_stage(bottom, "smallest", "bottom eigenvalues")
        if res.nonfinite is None and density:
            t0 = time.perf_counter()
            with stage(probes * min(steps, obj.dim), "density (SLQ)") as adv:
                d = slq(
                    mv,
                    obj.dim,
                    probes,
                    steps,
                    seed=seed + 1,
                    dtype=bdt,
                    device=dev,
                    probe_batch=plan.probe_batch,
                    callback=tracked(adv),
                    space=space,
                    reorth=slq_reorth == "full",
                )
            res.seconds["density"] = time.perf_counter() - t0
            res.n_matvec += d.n_matvec
            if d.nonfinite_at is not None:
                res.nonfinite = f"non-finite Hessian-vector product at SLQ product {d.nonfinite_at} (density)"
            if d.n_probes:
                res.density = d
                res.sigma = d.default_sigma(sigma)
                res.grid, res.values = d.density(res.sigma, n_grid)
        if res.nonfinite is None:
            t0 = time.perf_counter()
            blocks = list(layout.slices().values())
            with stage(min(trace_probes, obj.dim), f"trace ({trace_method})") as adv:
                tr = trace(
                    mv,
                    obj.dim,
                    trace_probes,
                    method=trace_method,
                    seed=seed + 2,
                    blocks=blocks,
                    batch=plan.trace_batch,
                    dtype=bdt,
                    device=dev,
                    callback=tracked(adv),
                    space=space,
                )
            res.seconds["trace"] = time.perf_counter() - t0
            res.n_matvec += tr.n_matvec
            if tr.nonfinite_at is not None:
                res.nonfinite = f"non-finite Hessian-vector product at trace product {tr.nonfinite_at}"
            else:
                res.traces = tr
        if res.nonfinite is None and per_layer:
            res.per_layer = _per_layer(op, obj, res, tol, max_iter, seed, trace_probes, stage, tracked, plan)
    finally:
        op.release()
    if "rows" in obj.hvp_info and res.memory is not None:  # how blocks of vectors went: vmap or loop
        res.memory["rows"] = obj.hvp_info["rows"]
    return res


def _per_layer(
    op: HessianOperator,
    obj: Objective,
    res: HessianResult,
    tol,
    max_iter,
    seed,
    trace_probes,
    stage,
    tracked,
    plan: MemoryPlan,
) -> dict:
    names = list(obj.layout.names)
    slices = obj.layout.slices()
    n = len(names)
    out = {
        "names": names,
        "numel": np.array([slices[nm].stop - slices[nm].start for nm in names], dtype=np.int64),
        "lambda_max": np.full(n, np.nan),
        "residuals": np.full(n, np.nan),
        "converged": np.zeros(n, dtype=bool),
        "n_matvec": np.zeros(n, dtype=np.int64),
        "trace": np.asarray(res.traces.block_traces, dtype=np.float64),
        "trace_stderr": np.asarray(res.traces.block_stderr, dtype=np.float64),
    }
    t0 = time.perf_counter()
    with stage(n, "per-layer Lanczos") as adv:
        for i, nm in enumerate(names):
            sl = slices[nm]
            r = lanczos(
                op.restrict(sl),
                sl.stop - sl.start,
                1,
                "largest",
                tol=tol,
                max_iter=max_iter,
                max_basis=plan.max_basis,
                seed=seed + 3 + i,
                dtype=basis_dtype(obj.dtype),
                device=obj.basis_device,
            )
            res.n_matvec += r.n_matvec
            out["n_matvec"][i] = r.n_matvec
            if r.nonfinite_at is None and sl.stop - sl.start <= trace_probes:
                # a block no larger than the trace budget: its trace exactly, from its unit vectors
                t = trace(
                    op.restrict(sl),
                    sl.stop - sl.start,
                    trace_probes,
                    dtype=basis_dtype(obj.dtype),
                    device=obj.basis_device,
                )
                res.n_matvec += t.n_matvec
                out["n_matvec"][i] += t.n_matvec
                if t.nonfinite_at is None:
                    out["trace"][i], out["trace_stderr"][i] = t.trace, 0.0
                else:
                    r.nonfinite_at = t.nonfinite_at
            if len(r.eigenvalues):
                out["lambda_max"][i], out["residuals"][i] = r.eigenvalues[0], r.residuals[0]
                out["converged"][i] = bool(r.converged[0])
            adv(1)
            if r.nonfinite_at is not None:
                res.nonfinite = (
                    f"non-finite Hessian-vector product at Lanczos iteration {r.nonfinite_at} (per-layer {nm})"
                )
                break
            if not r.all_converged:
                res.warnings.append(
                    f"per-layer {nm}: top eigenvalue did not converge to tol {tol:g} in {r.n_matvec} products"
                )
    res.seconds["per_layer"] = time.perf_counter() - t0
    return out
