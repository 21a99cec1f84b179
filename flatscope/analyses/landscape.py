"""Loss-landscape slices: loss and accuracy on a 1-D line or a 2-D grid through a checkpoint.

The slice through flat weights ``w`` along directions ``d1`` (and ``d2``, see
:mod:`flatscope.directions`) holds ``L(w + x d1 [+ y d2])`` at every grid point. Conventions:

- Coordinates: ``x = lo + (hi - lo) i / (n - 1)``; values within ``1e-9 (hi - lo)`` of an integer are
  snapped to it, so a symmetric range with an odd point count holds ``0`` exactly and the centre point
  is ``w`` itself, bit for bit. The centre is also evaluated the plain way
  (:meth:`Objective.evaluate`) and the two are compared (``center_abs_error``).
- 2-D arrays have shape ``(ny, nx)``: ``loss[j, i]`` is the loss at ``(x[i], y[j])`` (matplotlib's
  convention). Points are visited in that row-major order.
- Each point's weights are formed in float64 and rounded once to the model's dtype.
- BatchNorm: the running statistics of the checkpoint are used at every point (eval mode, the
  default), or recomputed at every point over the training inputs (``bn='recompute'``). When
  interpolating between checkpoints in eval mode, float buffers (running means and variances) are
  interpolated like the weights, so each corner reproduces its own checkpoint exactly.
- Batching: a chunk of points per ``Objective.evaluate_many`` call (one ``vmap``-ed forward per data
  batch) or one evaluation per point (``loop``, :class:`PointEvaluator`, which equals
  ``Objective.evaluate`` bit for bit with less overhead). :func:`choose_batching` picks one by a
  rule measured in ``benchmarks/bench_landscape.py``.
- Resumable: :func:`compute` fills a :class:`LandscapeResult` chunk by chunk and calls ``flush``
  (which the CLI makes an atomic HDF5 write) at most every ``flush_every`` seconds and once more on
  the way out, also on Ctrl-C; a resumed run visits only chunks that are not done, in the same
  chunks, so its values equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..directions import Directions
from ..errors import FlatscopeError
from ..memory import points_per_call as fit_points
from ..objective import Objective, PointEvaluator  # noqa: F401  (PointEvaluator: re-exported)

BATCHING = ("auto", "vmap", "loop")
BN_MODES = ("eval", "recompute")
PARALLEL = ("data", "points")  # under torchrun: shard the data, or deal the grid points to the ranks
# The auto rule, measured in benchmarks/bench_landscape.py on a 2-core CPU (benchmarks/RESULTS.md) for
# the digits MLP, CNN and ResNet: see choose_batching. VMAP_MAX_SAMPLES is the largest forward pass
# (samples) at which vmap still won; VMAP_SAMPLES_PER_CALL sets the points per vmapped call.
VMAP_MAX_SAMPLES = 128
VMAP_SAMPLES_PER_CALL = 4096


# ------------------------------------------------------------------------------------------ grid
MAX_GRID_POINTS = 10_000_000


def parse_range(text: str | None, k: int, default: tuple[float, float]) -> list[tuple[float, float]]:
    """``LO:HI`` (both axes in 2-D) or ``LO:HI,LO:HI`` (x then y)."""
    if text is None:
        return [default] * k
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) > k:
        raise FlatscopeError(f"--range {text!r} gives {len(parts)} ranges for a {k}-D slice")
    if not str(text).isascii():
        raise FlatscopeError(f"--range {text!r}: only ASCII numbers are read")
    out = []
    for p in parts:
        lo_hi = p.split(":")
        try:
            lo, hi = (float(v) for v in lo_hi)
        except ValueError:
            raise FlatscopeError(f"--range {text!r}: expected LO:HI (e.g. -1:1) or LO:HI,LO:HI") from None
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise FlatscopeError(f"--range {text!r}: bounds must be finite")
        if lo >= hi:
            raise FlatscopeError(f"--range {p}: the minimum {lo:g} must be less than the maximum {hi:g}")
        out.append((lo, hi))
    return out * k if len(out) == 1 else out


def parse_grid(text: str | None, k: int, default: int = 51) -> list[int]:
    """``N`` (both axes in 2-D) or ``N,M`` (x then y)."""
    if text is None:
        return [default] * k
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) > k:
        raise FlatscopeError(f"--grid {text!r} gives {len(parts)} sizes for a {k}-D slice")
    try:
        if not str(text).isascii():
            raise ValueError
        out = [int(p) for p in parts]
    except ValueError:
        raise FlatscopeError(f"--grid {text!r}: expected an integer N or N,M") from None
    for n in out:
        if n < 2:
            raise FlatscopeError(f"--grid {text}: each axis needs at least 2 points, got {n}")
        if n > 100_000:
            raise FlatscopeError(f"--grid {text}: at most 100000 points per axis")
    out = out * k if len(out) == 1 else out
    if math.prod(out) > MAX_GRID_POINTS:
        raise FlatscopeError(
            f"--grid {text}: {math.prod(out):,} points in all; a landscape holds at most "
            f"{MAX_GRID_POINTS:,} (e.g. 3001 x 3001)"
        )
    return out


def axis(lo: float, hi: float, n: int) -> np.ndarray:
    """``n`` evenly spaced coordinates from ``lo`` to ``hi``, integers (0, 1, ...) hit exactly."""
    x = lo + (hi - lo) * np.arange(n, dtype=np.float64) / (n - 1)
    x[0], x[-1] = lo, hi
    r = np.round(x)
    snap = np.abs(x - r) <= 1e-9 * (hi - lo)
    x[snap] = r[snap]
    return x


@dataclass
class Grid:
    x: np.ndarray
    y: np.ndarray | None = None

    @property
    def k(self) -> int:
        return 1 if self.y is None else 2

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.x),) if self.y is None else (len(self.y), len(self.x))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def coords(self) -> np.ndarray:
        """(size, k) coordinates in row-major order: ``y`` outer, ``x`` inner."""
        if self.y is None:
            return self.x[:, None].copy()
        yy, xx = np.meshgrid(self.y, self.x, indexing="ij")
        return np.stack([xx.ravel(), yy.ravel()], axis=1)

    def index_of(self, *point: float) -> int | None:
        """Flat index of the grid point at exactly ``point``, or None."""
        idx = []
        for ax, p in zip((self.x, self.y), point):
            hit = np.flatnonzero(ax == p)
            if hit.size == 0:
                return None
            idx.append(int(hit[0]))
        return idx[0] if self.y is None else idx[1] * len(self.x) + idx[0]


# ---------------------------------------------------------------------------------------- result
@dataclass
class LandscapeResult:
    name: str
    directions: Directions
    grid: Grid
    splits: list[str]
    loss: dict[str, np.ndarray] = field(default_factory=dict)
    accuracy: dict[str, np.ndarray] = field(default_factory=dict)
    done: np.ndarray | None = None
    plain: dict[str, tuple[float, float]] = field(default_factory=dict)  # at w, evaluated the plain way
    anchors: dict | None = None  # interp: {"labels": [...], "coords": [[x, y]...], split: [loss...]}
    options: dict = field(default_factory=dict)
    dtype: str = "float32"  # the model's dtype: directions are stored in it

    def __post_init__(self):
        if self.done is None:
            self.done = np.zeros(self.grid.shape, dtype=bool)
        for s in self.splits:
            self.loss.setdefault(s, np.full(self.grid.shape, np.nan))
            self.accuracy.setdefault(s, np.full(self.grid.shape, np.nan))

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def center_index(self) -> int | None:
        return self.grid.index_of(*([0.0] * self.grid.k))

    def center_values(self, split: str) -> tuple[float, float] | None:
        i = self.center_index()
        if i is None or not self.done.reshape(-1)[i]:
            return None
        return float(self.loss[split].reshape(-1)[i]), float(self.accuracy[split].reshape(-1)[i])

    def center_abs_error(self) -> float | None:
        errs = []
        for s in self.splits:
            c = self.center_values(s)
            if c is not None and s in self.plain:
                errs.append(abs(c[0] - self.plain[s][0]))
        return max(errs) if errs else None

    def barrier(self, split: str) -> float | None:
        """1-D interpolation: max over grid points in [0, 1] of L(x) - ((1 - x) L(0) + x L(1))."""
        if self.directions.kind != "interp" or self.grid.k != 1:
            return None
        i0, i1 = self.grid.index_of(0.0), self.grid.index_of(1.0)
        if i0 is None or i1 is None or not (self.done[i0] and self.done[i1]):
            return None
        x, L = self.grid.x, self.loss[split]
        inside = (x >= 0) & (x <= 1) & self.done
        return float(np.max(L[inside] - ((1 - x[inside]) * L[i0] + x[inside] * L[i1])))

    def summary(self) -> dict:
        """Headline numbers; names are stable (``flatscope audit`` uses them as ``landscape/<name>.<key>``).

        ``points``, ``points_done``; per split ``s``: ``s_loss_center`` (the grid value at w),
        ``s_loss_min``, ``s_loss_max``, ``s_accuracy_center``, ``s_accuracy_min``; ``center_abs_error``
        (|grid value at w - plain loss at w|, largest over splits); ``s_barrier`` (1-D interpolation);
        ``eigenvalue_1/2`` (hessian); ``explained_variance_1/2`` (pca).
        """
        out: dict = {"points": self.grid.size, "points_done": int(self.done.sum())}
        for s in self.splits:
            L, A = self.loss[s][self.done], self.accuracy[s][self.done]
            c = self.center_values(s)
            out[f"{s}_loss_center"] = c[0] if c else None
            out[f"{s}_loss_min"] = float(np.nanmin(L)) if L.size and not np.isnan(L).all() else None
            out[f"{s}_loss_max"] = float(np.nanmax(L)) if L.size and not np.isnan(L).all() else None
            out[f"{s}_accuracy_center"] = c[1] if c else None
            out[f"{s}_accuracy_min"] = float(np.nanmin(A)) if A.size and not np.isnan(A).all() else None
            b = self.barrier(s)
            if b is not None:
                out[f"{s}_barrier"] = b
        out["center_abs_error"] = self.center_abs_error()
        info = self.directions.info
        for i, v in enumerate(info.get("eigenvalues", [])[:2]):
            out[f"eigenvalue_{i + 1}"] = v
        for i, v in enumerate(info.get("explained_variance_ratio", [])[:2]):
            out[f"explained_variance_{i + 1}"] = v
        return out

    # ------------------------------------------------------------------ storage
    def to_tree(self) -> dict:
        """The HDF5 tree of ``/landscape/<name>`` (see the README for the layout)."""
        d = self.directions
        dirs: dict = {
            "vectors": d.vectors.numpy().astype(np.float64 if self.dtype == "float64" else np.float32),
            "layout": json.dumps(d.layout.to_attrs()),
            "method": d.kind,
        }
        for key, value in d.info.items():
            if key == "path":
                continue
            dirs[key] = value if not isinstance(value, (list, tuple)) else np.asarray(value, dtype=np.float64)
        tree: dict = {"x": self.grid.x, "directions": dirs, "done": self.done}
        if self.grid.y is not None:
            tree["y"] = self.grid.y
        for s in self.splits:
            tree[s] = {"loss": self.loss[s], "accuracy": self.accuracy[s]}
            if s in self.plain:
                tree[s]["plain_loss"], tree[s]["plain_accuracy"] = self.plain[s]
        if "path" in d.info:
            p = np.asarray(d.info["path"], dtype=np.float64)
            tree["path"] = {
                "x": p[:, 0],
                "epoch": np.asarray(self.options.get("trajectory_epochs", np.arange(len(p))), dtype=np.float64),
            }
            if p.shape[1] > 1:
                tree["path"]["y"] = p[:, 1]
        if self.anchors:
            a = self.anchors
            tree["anchors"] = {"labels": json.dumps(a["labels"]), "coords": np.asarray(a["coords"], dtype=np.float64)}
            for s in self.splits:
                if s in a:
                    tree["anchors"][f"{s}_loss"] = np.asarray(a[s], dtype=np.float64)
        return tree

    def to_json(self) -> dict:
        first = self.splits[0]
        out: dict = {
            "name": self.name,
            "directions": self.directions.kind,
            "x": self.grid.x,
            "loss": self.loss[first],
            "accuracy": self.accuracy[first],
        }
        if self.grid.y is not None:
            out["y"] = self.grid.y
        out["splits"] = {
            s: {
                "loss": self.loss[s],
                "accuracy": self.accuracy[s],
                "plain_loss": self.plain.get(s, (None, None))[0],
                "plain_accuracy": self.plain.get(s, (None, None))[1],
            }
            for s in self.splits
        }
        out["complete"] = self.complete
        out["summary"] = self.summary()
        info = {k: v for k, v in self.directions.info.items() if k != "path"}
        out["direction_info"] = info
        if "path" in self.directions.info:
            p = np.asarray(self.directions.info["path"])
            out["path"] = {
                "x": p[:, 0],
                "y": p[:, 1] if p.shape[1] > 1 else None,
                "epoch": self.options.get("trajectory_epochs"),
            }
        if self.anchors:
            out["anchors"] = self.anchors
        return out


# ------------------------------------------------------------------------------------ evaluation
def choose_batching(obj: Objective, requested: str = "auto", per_point_buffers: bool = False) -> str:
    """``vmap`` or ``loop`` for this objective.

    Rule (``auto``): a loop when every point needs its own BatchNorm buffers (``--bn recompute``, or an
    interpolation of BatchNorm models); otherwise ``vmap`` on CUDA; on CPU ``vmap`` when a forward pass
    holds at most ``VMAP_MAX_SAMPLES`` samples (``min(batch_size, N)``), else ``loop``: the vmapped call
    spreads the fixed cost of a call over several points, which pays when a forward pass is cheap, while
    for large forward passes the plain loop is as fast or faster (a vmapped convolution over several
    weight sets is a grouped convolution, slower per point on CPU).
    """
    if requested not in BATCHING:
        raise FlatscopeError(f"unknown --batching {requested!r}; choose from {', '.join(BATCHING)}")
    if per_point_buffers:
        if requested == "vmap":
            raise FlatscopeError(
                "--batching vmap cannot be used when every point has its own BatchNorm statistics "
                "(--bn recompute, or interpolating BatchNorm models); use --batching loop or auto"
            )
        return "loop"
    if requested != "auto":
        return requested
    if obj.device.type == "cuda":
        return "vmap"
    return "vmap" if min(obj.batch_size, obj.n) <= VMAP_MAX_SAMPLES else "loop"


def default_points_per_call(obj: Objective, batching: str) -> int:
    """Points per chunk: about ``VMAP_SAMPLES_PER_CALL`` samples per vmapped call (a power of two in
    [8, 32]); 16 for a loop (there it only sets how often progress is reported)."""
    if batching != "vmap":
        return 16
    target = VMAP_SAMPLES_PER_CALL / max(1, min(obj.batch_size, obj.n))
    return int(min(32, max(8, 2 ** round(math.log2(max(target, 1e-9))))))


def _mix_buffers(anchor_buffers: list[dict], coord: torch.Tensor, dtype: torch.dtype) -> dict:
    """Float buffers combined like the weights: (1 - sum c) b_0 + sum_k c_k b_k; others from b_0."""
    c = coord.to(torch.float64)
    out = {}
    for name, b0 in anchor_buffers[0].items():
        if torch.is_floating_point(b0):
            v = (1.0 - c.sum()) * b0.to(torch.float64)
            for ck, bk in zip(c, anchor_buffers[1:]):
                v = v + ck * bk[name].to(torch.float64)
            out[name] = v.to(dtype)
        else:
            out[name] = b0
    return out


def evaluate_points(
    objectives: dict[str, Objective],
    W: torch.Tensor,
    *,
    batching: str,
    buffers: list[dict] | None = None,
    evaluators: dict[str, PointEvaluator] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Loss and accuracy of every objective at every row of ``W`` (float64).

    ``vmap``: one ``evaluate_many`` call per objective; ``loop``: one evaluation per row, through
    ``evaluators`` (:class:`PointEvaluator`) when given, else ``Objective.evaluate``. ``buffers``: one
    buffer dict per row (then a loop), or None for each objective's own.
    """
    out = {}
    for split, obj in objectives.items():
        Wd = W.to(device=obj.device, dtype=obj.dtype)
        if batching == "vmap" and buffers is None:
            loss, acc = obj.evaluate_many(Wd)
            out[split] = (loss.cpu().numpy().astype(np.float64), acc.cpu().numpy().astype(np.float64))
        else:
            ev = evaluators[split] if evaluators else obj.evaluate
            vals = [ev(Wd[i], None if buffers is None else buffers[i]) for i in range(Wd.shape[0])]
            out[split] = (np.array([v[0] for v in vals]), np.array([v[1] for v in vals]))
    return out


def plain_values(
    objectives: dict[str, Objective], *, bn: str = "eval", bn_inputs: torch.Tensor | None = None
) -> dict[str, tuple[float, float]]:
    """(loss, accuracy) at each objective's own weights, evaluated the plain way."""
    first = next(iter(objectives.values()))
    bufs = first.recompute_bn(first.w0, bn_inputs) if bn == "recompute" else None
    return {s: obj.evaluate(None, bufs) for s, obj in objectives.items()}


def compute(
    result: LandscapeResult,
    objectives: dict[str, Objective],
    *,
    batching: str = "auto",
    points_per_call: int | None = None,
    bn: str = "eval",
    bn_inputs: torch.Tensor | None = None,
    anchor_buffers: list[dict] | None = None,
    progress: Callable[[int], None] | None = None,
    flush: Callable[[LandscapeResult], None] | None = None,
    flush_every: float = 10.0,
    parallel: str = "data",
) -> LandscapeResult:
    """Fill the points of ``result`` that are not done yet; returns ``result``.

    ``objectives`` maps split to :class:`Objective` (all of the same model; the first one's ``w0`` is the
    origin). Points are visited in fixed chunks of ``points_per_call`` consecutive flat indices (one
    vmapped call per chunk, or a loop over its points), so a resumed run evaluates the very same chunks. ``flush(result)`` is called at most
    every ``flush_every`` seconds and on the way out (even on KeyboardInterrupt) if anything is new.
    ``result.plain`` is filled with the plain evaluation at the origin.

    ``parallel="points"`` (under torchrun, with objectives that are *not* sharded): the pending chunks
    are dealt round-robin to the ranks (:func:`flatscope.distributed.map_rounds`) and gathered to
    rank 0 after every round; only rank 0's ``result`` is complete, and only rank 0 should flush.
    The chunks are those of one process, so the values are too.
    """
    if bn not in BN_MODES:
        raise FlatscopeError(f"unknown --bn {bn!r}; choose from {', '.join(BN_MODES)}")
    if parallel not in PARALLEL:
        raise FlatscopeError(f"unknown --parallel {parallel!r}; choose from {', '.join(PARALLEL)}")
    if parallel == "points" and any(o.n != o.n_total for o in objectives.values()):
        raise FlatscopeError("parallel='points' needs objectives over the whole split on every rank, not shards")
    first = next(iter(objectives.values()))
    if bn == "recompute" and bn_inputs is None:
        raise FlatscopeError("--bn recompute needs the training inputs")
    per_point = bn == "recompute" or anchor_buffers is not None
    mode = choose_batching(first, batching, per_point)
    m = points_per_call or default_points_per_call(first, mode)
    if m < 1:
        raise FlatscopeError(f"--points-per-call must be at least 1, got {m}")
    # as many points per call as fit the memory budget: each is a float64 row and its copy in the model's
    # dtype, plus one batch's activations per objective when vmapped (the values do not depend on it)
    m = fit_points(first, m, first.dim * (8 + first.w0.element_size()), mode == "vmap")
    result.options["batching"], result.options["points_per_call"] = mode, m
    origin = first.w0.to(torch.float64)
    d = result.directions  # a float64 copy on the objective's device, made once
    dirs = Directions(
        d.vectors.to(origin.device, torch.float64),
        d.layout,
        d.kind,
        d.info,
        None if d.endpoints is None else d.endpoints.to(origin.device, torch.float64),
    )
    coords = torch.as_tensor(result.grid.coords())
    done = result.done.reshape(-1)
    flat_loss = {s: result.loss[s].reshape(-1) for s in result.splits}
    flat_acc = {s: result.accuracy[s].reshape(-1) for s in result.splits}
    if not result.plain:
        result.plain = plain_values(objectives, bn=bn, bn_inputs=bn_inputs)
    evaluators = {s: PointEvaluator(o) for s, o in objectives.items()} if mode == "loop" else None
    chunks = [start + np.flatnonzero(~done[start : start + m]) for start in range(0, result.grid.size, m)]
    chunks = [idx for idx in chunks if idx.size]

    def evaluate(idx: np.ndarray) -> dict:
        C = coords[torch.from_numpy(idx)]
        W = dirs.points(origin, C)
        buffers = None
        if bn == "recompute":
            Wd = W.to(first.dtype)
            buffers = [first.recompute_bn(Wd[i], bn_inputs) for i in range(W.shape[0])]
        elif anchor_buffers is not None:
            buffers = [_mix_buffers(anchor_buffers, C[i], first.dtype) for i in range(W.shape[0])]
        return evaluate_points(objectives, W, batching=mode, buffers=buffers, evaluators=evaluators)

    if parallel == "points":
        from .. import distributed

        finished = ((chunks[i], vals) for i, vals in distributed.map_rounds(chunks, evaluate))
    else:
        finished = ((idx, evaluate(idx)) for idx in chunks)
    pending, last = False, time.monotonic()
    try:
        for idx, vals in finished:
            for s, (lv, av) in vals.items():
                flat_loss[s][idx], flat_acc[s][idx] = lv, av
            done[idx] = True
            pending = True
            if flush is not None and time.monotonic() - last >= flush_every:
                flush(result)
                pending, last = False, time.monotonic()
            if progress is not None:
                progress(int(idx.size))
    finally:
        if pending and flush is not None:
            flush(result)
    return result


def check_center(result: LandscapeResult, dtype: torch.dtype) -> str | None:
    """A warning if the grid's value at w differs from the plain loss by more than rounding allows."""
    err = result.center_abs_error()
    if err is None:
        return None
    ref = max(abs(v[0]) for v in result.plain.values())
    tol = (1e-4 if dtype == torch.float32 else 1e-10) * max(1.0, ref)
    if err > tol:
        return (
            f"the grid's loss at w differs from the plain loss by {err:.3g} (tolerance {tol:.1g}); "
            "the evaluation is not deterministic for this model"
        )
    return None
