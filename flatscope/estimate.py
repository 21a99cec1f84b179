"""The cost of an analysis before it runs: its products, wall time and peak memory (``--estimate``).

An estimate is a count and a measurement:

- **Counts** (one function per analysis, from its options alone): Hessian-vector products (HVPs) for
  ``hessian`` (Lanczos, SLQ, trace, per-layer), forward passes over the split (full evaluations) for
  ``local-energy`` and ``landscape``, split gradients and forward passes for ``sharpness``, sampler
  steps (all chains, one minibatch each) and HVPs for ``local-entropy``. Every count is exact but two:
  the Lanczos runs of ``hessian`` stop at a tolerance (:func:`lanczos_products`, a model calibrated on
  Hessians) and local energy's bisection stops at a relative width (an upper bound, see
  :func:`local_energy_counts`).
- **Unit costs** (:func:`measure`): the median time of one product of each kind that the analysis
  uses, on this machine, through the very path the analysis takes (for ``hessian`` the
  :class:`~flatscope.analyses.hessian.HessianOperator`, cached or rebuilt, one vector and a block of
  vectors), and the memory those products take.

Predicted time = sum over stages of count x unit cost (+ a one-off setup, e.g. building the cached
linearization); predicted peak memory = :func:`peak_memory`. ``--estimate`` prints both and exits
without writing anything. The progress bars' ETA uses the same rule (:func:`eta_seconds`).
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

# Lanczos model (lanczos_products): products ~= STEPS_PER_K k + STEPS_BASE + STEPS_PER_BLOCK (b - 1)
# + STEPS_PER_DECADE (log10(1/tol) - 5), then + k for the true residuals. Fitted on the top-k runs of the
# sample checkpoints (mlp-sgd, mlp-esgd, cnn-sgd; k = 1..20, tol 1e-5) and a power-law quadratic
# (lambda_i = 10 / i); the fit and its errors are in docs/estimate.md.
STEPS_PER_K = 2.2
STEPS_BASE = 7.0
STEPS_PER_BLOCK = 6.0
STEPS_PER_DECADE = 2.0
BLOCK = 8  # vectors per block product when measuring (SLQ probes, trace batches)


# ------------------------------------------------------------------------------------------ counts
def lanczos_products(k: int, dim: int, *, tol: float = 1e-5, max_iter: int | None = None, block_size: int = 1) -> int:
    """Predicted products of :func:`flatscope.linalg.lanczos` for the ``k`` extremal eigenpairs.

    A model, not a bound: ``min(steps, max_iter, dim) + k`` with
    ``steps = 2.2 k + 7 + 6 (b - 1) + 2 (log10(1/tol) - 5)`` (``b`` the block size), and ``k`` more
    products for the true residuals. Lanczos converges on the outliers of a spectrum first; Hessians
    of trained networks have more than ``k`` of them for the usual ``k``, and there the model holds
    within 20% (sample checkpoints, k = 2..20; a power-law quadratic). With fewer than ``k`` well
    separated eigenvalues the run can take several times more (docs/estimate.md).
    """
    mi = int(max_iter) if max_iter is not None else max(300, 30 * k)
    steps = STEPS_PER_K * k + STEPS_BASE + STEPS_PER_BLOCK * (max(block_size, 1) - 1)
    steps += STEPS_PER_DECADE * (math.log10(1.0 / tol) - 5.0)
    steps = max(float(k), steps)
    return int(round(min(steps, mi, dim))) + k


def hessian_counts(
    dim: int,
    *,
    top: int = 10,
    bottom: int = 0,
    density: bool = True,
    probes: int = 8,
    steps: int = 80,
    trace_probes: int = 60,
    tol: float = 1e-5,
    max_iter: int | None = None,
    block_size: int = 1,
    per_layer: bool = False,
    numels: list[int] | None = None,
) -> dict[str, int]:
    """HVPs per stage of :func:`flatscope.analyses.hessian.hessian_analysis` (see its options).

    ``top``/``bottom``: :func:`lanczos_products`; ``density``: ``probes x min(steps, dim)`` (exact);
    ``trace``: ``min(trace_probes, dim)`` (exact); ``per_layer``: for each tensor (``numels``), a
    top-1 Lanczos run on its block plus, for a tensor no larger than ``trace_probes``, its ``numel``
    unit vectors (exact trace).
    """
    out = {"top": lanczos_products(top, dim, tol=tol, max_iter=max_iter, block_size=block_size)}
    if bottom:
        out["bottom"] = lanczos_products(bottom, dim, tol=tol, max_iter=max_iter, block_size=block_size)
    if density:
        out["density"] = probes * min(steps, dim)
    out["trace"] = min(trace_probes, dim)
    if per_layer:
        out["per_layer"] = sum(
            lanczos_products(1, n, tol=tol, max_iter=max_iter) + (n if n <= trace_probes else 0) for n in numels or []
        )
    return out


def bisection_steps(sigmas, rtol: float = 1e-3, max_iter: int = 60) -> int:
    """Predicted bisection steps of local energy's target search on the grid ``sigmas`` (a model).

    The search bisects the first grid interval ``[lo, hi]`` whose mean error reaches the target until
    ``hi - lo <= rtol hi``. With the crossing ``s*`` inside, about ``log2((hi - lo) / (rtol s*))``
    steps; the model puts ``s*`` at the interval's middle (``hi / 2`` for the first interval, from 0)
    and takes the largest over the grid's intervals, since which one crosses is not known in advance.
    The true count lies between 0 (the target met on a grid point's edge) and ``max_iter``.
    """
    import numpy as np

    s = [0.0] + [float(x) for x in np.asarray(sigmas, dtype=float).reshape(-1)]
    worst = 0
    for lo, hi in zip(s[:-1], s[1:]):
        mid = 0.5 * (lo + hi)
        if hi - lo > rtol * hi:
            worst = max(worst, math.ceil(math.log2((hi - lo) / (rtol * mid))))
    return min(worst, max_iter)


def local_energy_counts(
    n_sigmas: int,
    samples: int,
    *,
    n_splits: int = 1,
    bn_recompute: bool = False,
    target: bool = False,
    sigmas=None,
    rtol: float = 1e-3,
    max_iter: int = 60,
) -> dict[str, int]:
    """Forward passes over the split of :func:`flatscope.analyses.local_energy.local_energy`.

    Per split: one at ``w`` plus ``n_sigmas x samples`` perturbed points (exact); with ``--bn
    recompute`` each of them first recomputes the BatchNorm statistics by one more pass over the
    training inputs (``recompute`` counts those). With a target error, :func:`bisection_steps`
    ``x samples`` more (``bisection``: a model, at most ``max_iter x samples``).
    """
    grid = n_splits * (1 + n_sigmas * samples)
    out = {"forward": grid}
    if target:
        out["bisection"] = n_splits * samples * bisection_steps(sigmas, rtol, max_iter)
    if bn_recompute:
        out["recompute"] = out["forward"] + out.get("bisection", 0)
    return out


def landscape_counts(points: int, *, n_splits: int = 1, bn_recompute: bool = False) -> dict[str, int]:
    """Forward passes over each split of :func:`flatscope.analyses.landscape.compute`: every grid
    point still to do plus the plain evaluation at the centre, per split (exact); ``recompute``: one
    pass over the training inputs per point (and one at the centre) with ``--bn recompute``."""
    out = {"forward": n_splits * (points + 1)}
    if bn_recompute:
        out["recompute"] = points + 1
    return out


def sharpness_counts(
    n_rho: int,
    *,
    steps: int = 20,
    restarts: int = 1,
    samples: int = 0,
    sub_batches: int = 1,
    n_splits: int = 1,
) -> dict[str, int]:
    """Gradients and forward passes of :func:`flatscope.analyses.sharpness.sharpness` (per split).

    For each sub-batch: one gradient at ``w`` and, for every ρ, ``restarts x steps`` ascent gradients
    plus one at each random restart's start; forward passes: one at ``w``, one per sub-batch at ``w``
    and one at each worst-case point, plus ``samples x n_rho`` for the average case. Exact unless the
    ascent stops early (its step falls below ``1e-12 ρ`` after 40 rejections in a row). Gradients and
    forward passes of a sub-batch cost its share of a full one (``gradient_parts``/``forward_parts``).
    """
    per_part_grads = 1 + n_rho * (restarts * steps + restarts - 1)
    out = {
        "gradient": n_splits * sub_batches * per_part_grads,
        "forward": n_splits * (1 + sub_batches * (1 + n_rho) + samples * n_rho),
    }
    return out


def local_entropy_counts(
    n_gammas: int,
    *,
    steps: int = 1000,
    burn_in: int = 200,
    is_samples: int = 0,
    power_iterations: int = 20,
    local_curvature: bool = True,
    n_splits: int = 1,
) -> dict[str, int]:
    """Sampler steps and HVPs of ``flatscope local-entropy`` (per split): ``n_gammas x (burn_in +
    steps)`` steps (every chain, one minibatch or full-batch gradient each; exact unless a divergence
    restarts a coupling), ``power_iterations`` HVPs for lambda_max (0 when it is given) and 10 per
    coupling for the local curvature, and ``is_samples`` importance-sampling draws per coupling."""
    out = {
        "sampler_step": n_splits * n_gammas * (burn_in + steps),
        "hvp": n_splits * (power_iterations + (10 * n_gammas if local_curvature else 0)),
    }
    if is_samples:
        out["is_forward"] = n_splits * n_gammas * is_samples
    return out


# ------------------------------------------------------------------------------------------ memory
def rss_bytes() -> int:
    """The process' resident memory now (Linux ``/proc/self/statm``; else its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The process' peak resident memory so far (``getrusage``; kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def process_seconds() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere): imports included."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def peak_memory(
    *, base_bytes: int, product_bytes: int, dim: int, vectors: int, vector_bytes: int = 8, cache_bytes: int = 0
) -> int:
    """Predicted peak memory: what the process holds now (model, data, libraries: ``base_bytes``), the
    cached linearization (``cache_bytes``, measured), the transient of one product above it
    (``product_bytes``, measured) and ``vectors`` parameter-sized vectors of ``vector_bytes`` each
    (float64 Lanczos bases, probes; :func:`vectors_held`). One function, so that a finer memory model
    can replace it."""
    return int(base_bytes + cache_bytes + product_bytes + vectors * dim * vector_bytes)


def vectors_held(analysis: str, counts: dict, **opts) -> int:
    """The most parameter-sized float64 vectors the analysis holds at once (its largest stage).

    ``hessian``: the Lanczos basis (one vector per product) plus the start, pending and Ritz blocks;
    the SLQ bases (``probes x steps``, or ``2 x probes`` with ``slq_reorth="none"``); Hutch++'s sketch, its products and the deflated probes (about
    ``2 x trace_probes``). Local energy / landscape / sharpness: a chunk of points or directions and a
    few work vectors. Local entropy: ``6 x chains`` (states, gradients, sums, noise)."""
    if analysis == "hessian":
        top = counts.get("top", 0)
        lan = max(top, counts.get("bottom", 0)) + 3 * (opts.get("top", 1) + opts.get("block_size", 1))
        probes = opts.get("probes", 0)
        slq = (
            counts.get("density", 0)
            if opts.get("slq_reorth", "full") == "full"
            else 2 * probes * bool(counts.get("density"))
        )
        return max(lan, slq + 2 * probes, 2 * counts.get("trace", 0) + 4)
    if analysis == "local_entropy":
        return 6 * opts.get("chains", 4) + opts.get("is_samples", 0) * 2 // 8 + 4
    return opts.get("chunk", 16) + 4


# ------------------------------------------------------------------------------------------ measuring
@dataclass
class UnitCosts:
    """Seconds per product on this machine (None: not measured) and the memory measured with them.

    ``hvp``: one vector; ``hvp_block``: per vector inside a block of ``BLOCK`` vectors (trace);
    ``hvp_probes``: per vector inside a block of as many vectors as SLQ has probes (when not ``BLOCK``);
    ``setup``: paid once: building the cached linearization, and what every first call spent beyond
    its median (torch.func's first transform, kernel selection); ``forward``/``gradient``: one pass /
    one gradient over the whole split; ``sampler_step``: one step of every chain. ``cache_bytes``:
    memory kept by the linearization cache; ``product_bytes``: the transient of one product.
    """

    hvp: float | None = None
    hvp_block: float | None = None
    hvp_probes: float | None = None
    setup: float = 0.0
    forward: float | None = None
    gradient: float | None = None
    sampler_step: float | None = None
    hvp_mode: str | None = None
    cache_bytes: int = 0
    product_bytes: int = 0
    measured_in: float = 0.0
    repeats: int = 0

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _timed(f: Callable, repeats: int, sync: Callable[[], None]) -> tuple[float, float]:
    """``(first, median)``: seconds of a first (warm-up) call of ``f()`` and the median of ``repeats``
    more. A first call pays one-off costs (torch.func's first transform, kernel selection: seconds on a
    busy CPU) that the run pays once too; they go into the estimate's ``setup``."""
    t = time.perf_counter()
    f()
    sync()
    first = time.perf_counter() - t
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return first, med


def _device_tools(device: torch.device):
    if device.type == "cuda":
        return (lambda: torch.cuda.synchronize(device)), (lambda: torch.cuda.memory_allocated(device))
    return (lambda: None), rss_bytes


def measure(
    obj,
    needs=("hvp",),
    *,
    hvp: str = "auto",
    repeats: int = 2,
    chains: int = 4,
    minibatch: int | None = None,
    seed: int = 0,
    probes: int | None = None,
) -> UnitCosts:
    """Measure the unit costs ``needs`` (``hvp``, ``forward``, ``gradient``, ``sampler_step``) of ``obj``.

    HVPs go through :class:`~flatscope.analyses.hessian.HessianOperator` in mode ``hvp`` (``auto``,
    ``cached``, ``double-backward``; ``fd`` when the objective uses it), as ``hessian`` does: the
    time to build its cache is ``setup``, then one vector and a block of :data:`BLOCK` vectors are
    timed (and a block of ``probes`` vectors, SLQ's, when that is another size). ``sampler_step``: one SGLD step's gradient of ``chains`` chains on a minibatch of
    ``minibatch`` samples (full batch: None) through
    :class:`~flatscope.samplers.ObjectivePotential`. Each is the median of ``repeats`` calls after a
    warm-up. Memory: on CUDA the allocator's counters; on CPU the process' resident memory before
    and after building the cache, and the rise of its peak during the products (a lower bound when
    an earlier step already peaked higher).
    """
    sync, mem_now = _device_tools(obj.device)
    t_all = time.perf_counter()
    uc = UnitCosts(repeats=repeats)
    gen = torch.Generator().manual_seed(seed)
    if "hvp" in needs:
        from .analyses.hessian import HessianOperator

        t = time.perf_counter()
        op = HessianOperator(obj, mode=hvp)  # resolves the HVP mode: a first exact product on two samples
        uc.setup += time.perf_counter() - t
        uc.hvp_mode = op.mode
        v = torch.randn(obj.dim, generator=gen, dtype=torch.float64).to(obj.device, obj.dtype)
        V = torch.randn(BLOCK, obj.dim, generator=gen, dtype=torch.float64).to(obj.device, obj.dtype)
        before = mem_now()
        if obj.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(obj.device)
        peak0 = peak_rss_bytes()
        t = time.perf_counter()
        op(v)  # the first product builds the cache (cached mode)
        sync()
        first = time.perf_counter() - t
        uc.cache_bytes = max(0, mem_now() - before) if op.mode == "cached" else 0
        _, uc.hvp = _timed(lambda: op(v), repeats, sync)
        uc.setup += max(0.0, first - uc.hvp)  # the cache's build (cached mode) and one-off costs
        first_block, block = _timed(lambda: op(V), max(1, repeats // 2), sync)
        uc.hvp_block = block / BLOCK
        uc.setup += max(0.0, first_block - block)
        if probes is not None and probes != BLOCK:
            P = torch.randn(probes, obj.dim, generator=gen, dtype=torch.float64).to(obj.device, obj.dtype)
            _, t_p = _timed(lambda: op(P), 1, sync)
            uc.hvp_probes = t_p / probes
        if obj.device.type == "cuda":
            uc.product_bytes = max(0, torch.cuda.max_memory_allocated(obj.device) - before - uc.cache_bytes)
        else:
            uc.product_bytes = max(0, peak_rss_bytes() - max(peak0, before + uc.cache_bytes))
        op.release()
    if "forward" in needs:
        first, uc.forward = _timed(lambda: obj.evaluate(), repeats, sync)
        uc.setup += max(0.0, first - uc.forward)
    if "gradient" in needs:
        first, uc.gradient = _timed(lambda: obj.loss_and_grad(), repeats, sync)
        uc.setup += max(0.0, first - uc.gradient)
    if "sampler_step" in needs:
        from .samplers import ObjectivePotential

        pot = ObjectivePotential(obj)
        W = obj.w0.unsqueeze(0).repeat(chains, 1)
        g = torch.Generator(device=obj.device).manual_seed(seed) if obj.device.type == "cuda" else gen
        if minibatch is None:
            first, uc.sampler_step = _timed(lambda: pot.loss_grad(W), repeats, sync)
        else:
            first, uc.sampler_step = _timed(lambda: pot.minibatch_loss_grad(W, minibatch, g), repeats, sync)
        uc.setup += max(0.0, first - uc.sampler_step)
    uc.measured_in = time.perf_counter() - t_all
    return uc


# ------------------------------------------------------------------------------------------ the estimate
# which unit cost each counted item takes, and whether its count is exact
UNITS = {
    "top": ("hvp", False),
    "bottom": ("hvp", False),
    "density": ("hvp_probes", True),
    "trace": ("hvp_block", True),
    "per_layer": ("hvp", False),
    "forward": ("forward", True),
    "recompute": ("forward", True),
    "bisection": ("forward", False),
    "gradient": ("gradient", True),
    "sampler_step": ("sampler_step", True),
    "hvp": ("hvp", True),
    "is_forward": ("forward", True),
}


class Estimated(Exception):
    """Raised by an analysis step under ``--estimate`` once its cost is predicted: the command prints
    :attr:`estimate` and exits 0; nothing was computed or written."""

    def __init__(self, estimate: "Estimate"):
        super().__init__(estimate.analysis)
        self.estimate = estimate


@dataclass
class Estimate:
    """A predicted run: per stage its count, the unit it is counted in, whether the count is exact,
    and its seconds; the totals; the predicted peak memory; the unit costs measured."""

    analysis: str
    stages: list = field(default_factory=list)  # dicts: stage, unit, count, exact, seconds
    seconds: float = 0.0
    elapsed: float = 0.0  # seconds this process spent before measuring (imports, checkpoint, data, objective)
    peak_bytes: int = 0
    units: UnitCosts = field(default_factory=UnitCosts)
    dim: int = 0
    notes: list = field(default_factory=list)

    def totals(self) -> dict[str, int]:
        """Products per unit kind: ``hvp`` (one vector or in blocks), ``forward``, ``gradient``, ..."""
        out: dict[str, int] = {}
        for s in self.stages:
            kind = "hvp" if s["unit"].startswith("hvp") else s["unit"]
            out[kind] = out.get(kind, 0) + s["count"]
        return out

    def to_json(self) -> dict:
        return {
            "estimate": True,
            "analysis": self.analysis,
            "dim": self.dim,
            "products": self.totals(),
            "stages": self.stages,
            "seconds": self.seconds,
            "wall_seconds": self.elapsed + self.seconds,
            "peak_memory_bytes": self.peak_bytes,
            "units": self.units.to_json(),
            "notes": list(self.notes),
        }


def build(
    analysis: str,
    counts: dict[str, int],
    units: UnitCosts,
    *,
    dim: int,
    vectors: int,
    device: torch.device | str = "cpu",
    scale: dict | None = None,
) -> Estimate:
    """Combine ``counts`` (stage -> count) with ``units`` into an :class:`Estimate`. ``scale`` multiplies
    a stage's unit cost (e.g. a sub-batch's share of a full gradient). Memory is device memory on CUDA,
    the process' resident memory on CPU."""
    est = Estimate(analysis, units=units, dim=dim)
    scale = scale or {}
    total = units.setup
    for stage, n in counts.items():
        unit, exact = UNITS[stage]
        cost = getattr(units, unit)
        if cost is None and unit == "hvp_probes":
            cost, unit = units.hvp_block, "hvp_block"
        if cost is None and unit == "hvp_block":
            cost, unit = units.hvp, "hvp"
        sec = None if cost is None else n * cost * scale.get(stage, 1.0)
        est.stages.append({"stage": stage, "unit": unit, "count": int(n), "exact": exact, "seconds": sec})
        total += sec or 0.0
    est.seconds = total
    est.peak_bytes = peak_memory(
        base_bytes=_device_tools(torch.device(device))[1](),
        product_bytes=units.product_bytes,
        cache_bytes=units.cache_bytes,
        dim=dim,
        vectors=vectors,
    )
    return est


def eta_seconds(remaining: float, done: float, elapsed: float, unit_seconds: float | None) -> float | None:
    """Seconds left in a stage: ``remaining x`` the observed seconds per item once one is done, else the
    measured unit cost (None when neither is known). The progress bars show this."""
    if done > 0 and elapsed > 0:
        return remaining * elapsed / done
    if unit_seconds is not None:
        return remaining * unit_seconds
    return None


# ------------------------------------------------------------------------------------------ per analysis
def estimate_hessian(obj, *, hvp: str = "auto", seed: int = 0, **opts) -> Estimate:
    """The estimate of :func:`flatscope.analyses.hessian.hessian_analysis` on ``obj`` with ``opts``
    (its keyword options: top, bottom, density, probes, steps, trace_probes, tol, max_iter,
    block_size, per_layer); the options are checked as the analysis checks them."""
    from .analyses.hessian import _check

    o: dict = dict(top=10, bottom=0, density=True, probes=8, steps=80, trace_probes=60, tol=1e-5, max_iter=None)
    o.update(block_size=1, per_layer=False, sigma=0.01)
    o.update({k: v for k, v in opts.items() if k in o})
    _check(obj, o["top"], o["bottom"], o["probes"], o["steps"], o["trace_probes"], o["tol"], o["max_iter"],
           o["block_size"], o["sigma"])  # fmt: skip
    o.pop("sigma")
    counts = hessian_counts(obj.dim, numels=list(obj.layout.numels), **o)
    units = measure(obj, ("hvp",), hvp=hvp, seed=seed, probes=min(o["probes"], 64) if o["density"] else None)
    vectors = vectors_held("hessian", counts, slq_reorth=opts.get("slq_reorth", "full"), **o)
    est = build("hessian", counts, units, dim=obj.dim, vectors=vectors, device=obj.device)
    est.notes.append(
        "Lanczos counts (top/bottom/per_layer) follow a model fitted on Hessians with more than k outlying "
        "eigenvalues (within 20% there); the other counts are exact"
    )
    return est


def estimate_local_energy(objs: dict, *, sigmas, samples: int, bn_recompute: bool = False, target: bool = False,
                          seed: int = 0) -> Estimate:  # fmt: skip
    """The estimate of :func:`flatscope.analyses.local_energy.local_energy` over the splits ``objs``."""
    first = next(iter(objs.values()))
    counts = local_energy_counts(
        len(sigmas), samples, n_splits=len(objs), bn_recompute=bn_recompute, target=target, sigmas=sigmas
    )
    units = measure(first, ("forward",), seed=seed)
    est = build("local_energy", counts, units, dim=first.dim, vectors=vectors_held("local_energy", counts),
                device=first.device)  # fmt: skip
    if target:
        est.notes.append(
            "the bisection count is modelled (the crossing interval is not known in advance; at most 60 steps)"
        )
    return est


def estimate_landscape(objs: dict, *, points: int, bn_recompute: bool = False, seed: int = 0) -> Estimate:
    """The estimate of :func:`flatscope.analyses.landscape.compute`: ``points`` grid points still to do."""
    first = next(iter(objs.values()))
    counts = landscape_counts(points, n_splits=len(objs), bn_recompute=bn_recompute)
    units = measure(first, ("forward",), seed=seed)
    return build("landscape", counts, units, dim=first.dim, vectors=vectors_held("landscape", counts),
                 device=first.device)  # fmt: skip


def estimate_sharpness(objs: dict, *, n_rho: int, steps: int, restarts: int, samples: int, m: int | None,
                       seed: int = 0) -> Estimate:  # fmt: skip
    """The estimate of :func:`flatscope.analyses.sharpness.sharpness`; with sub-batches of ``m`` samples
    a gradient costs ``m / n`` of a full one."""
    first = next(iter(objs.values()))
    k = 1 if m is None else max(1, first.n // m)
    counts = sharpness_counts(n_rho, steps=steps, restarts=restarts, samples=samples, sub_batches=k,
                              n_splits=len(objs))  # fmt: skip
    units = measure(first, ("forward", "gradient"), seed=seed)
    share = 1.0 if m is None else min(1.0, m / first.n)
    return build("sharpness", counts, units, dim=first.dim, vectors=vectors_held("sharpness", counts),
                 device=first.device, scale={"gradient": share})  # fmt: skip


def estimate_local_entropy(obj, *, n_gammas: int, steps: int, burn_in: int, chains: int, minibatch: int | None,
                           is_samples: int, lambda_given: bool, n_splits: int = 1, seed: int = 0) -> Estimate:  # fmt: skip
    """The estimate of ``flatscope local-entropy``: sampler steps (``chains`` chains, minibatch
    ``minibatch``) and the HVPs of the step-size rule."""
    counts = local_entropy_counts(n_gammas, steps=steps, burn_in=burn_in, is_samples=is_samples,
                                  power_iterations=0 if lambda_given else 20, n_splits=n_splits)  # fmt: skip
    units = measure(obj, ("hvp", "sampler_step") + (("forward",) if is_samples else ()), hvp="double-backward",
                    chains=chains, minibatch=minibatch, seed=seed)  # fmt: skip
    return build("local_entropy", counts, units, dim=obj.dim,
                 vectors=vectors_held("local_entropy", counts, chains=chains, is_samples=is_samples),
                 device=obj.device)  # fmt: skip
