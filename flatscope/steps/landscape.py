"""The ``landscape`` step: loss and accuracy on a line or plane through a checkpoint, stored as
``/landscape/<name>`` (:mod:`flatscope.analyses.landscape`), resumable."""

from __future__ import annotations

import json
import os
import re
import time

import numpy as np
import torch

from .. import distributed
from .. import results as store
from ..analyses.landscape import (
    Grid,
    LandscapeResult,
    axis,
    check_center,
    choose_batching,
    default_points_per_call,
    parse_grid,
    parse_range,
    plain_values,
)
from ..analyses.landscape import compute as compute_points
from ..checkpoint import load_checkpoint
from ..directions import (
    Directions,
    interpolation,
    pca_directions,
    random_directions,
    read_hessian_eigenvectors,
    read_landscape_directions,
    trajectory_files,
)
from ..errors import FlatscopeError
from ..models import is_factory_path
from ..parallel import objectives as split_objectives
from ..params import ParamLayout

# Options that must be the same for --resume to continue a run (the rest only steer how it runs).
RESUME_KEYS = (
    "directions",
    "dims",
    "range",
    "grid",
    "norm",
    "bias_bn",
    "orthogonalize",
    "seed",
    "bn",
    "checkpoint_sha256",
    "dtype",
    "loss",
    "data",
    "split",
    "max_samples",
    "batch_size",
)
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def _load_like(run, path: str, layout: ParamLayout, what: str):
    ck = load_checkpoint(
        path,
        model_spec=run.model_spec(),
        allow_import=run.model_name is not None and is_factory_path(run.model_name),
        allow_nonfinite=run.allow_nonfinite,
    )
    layout.check_same(ParamLayout.of(ck.model), what=f"{what} {path}")
    return ck


def _trajectory(run, folder: str | None, layout: ParamLayout) -> tuple[list[torch.Tensor], list[float], str]:
    ck = run.checkpoint
    if folder is None:
        stored = (ck.train or {}).get("trajectory_dir")
        stem = os.path.splitext(run.checkpoint_path)[0] + "-traj"
        folder = stem if os.path.isdir(stem) or not stored else stored
    files = trajectory_files(folder)
    if len(files) < 3:
        raise FlatscopeError(
            f"PCA directions need at least 3 trajectory checkpoints, found {len(files)} in {folder} "
            "(train with a smaller --save-every)"
        )
    ws, epochs = [], []
    for i, p in enumerate(files):
        t = load_checkpoint(
            p,
            model_spec=run.model_spec(),
            allow_import=run.model_name is not None and is_factory_path(run.model_name),
            allow_nonfinite=run.allow_nonfinite,
        )
        if ck.model_spec and t.model_spec and ck.model_spec.get("name") != t.model_spec.get("name"):
            raise FlatscopeError(
                f"trajectory checkpoint {p} is a {t.model_spec.get('name')!r} model, "
                f"the checkpoint a {ck.model_spec.get('name')!r}: another architecture"
            )
        try:
            layout.check_same(ParamLayout.of(t.model), what=f"trajectory checkpoint {p}")
        except FlatscopeError as exc:
            raise FlatscopeError(f"{exc} (another architecture)") from None
        named = {n: q.detach() for n, q in t.model.named_parameters() if q.requires_grad}
        ws.append(layout.flatten(named).to(torch.float64))
        ep = (t.train or {}).get("epoch")
        epochs.append(float(ep) if isinstance(ep, (int, float)) else float(i))
    return ws, epochs, folder


def _default_name(kind: str, k: int, source: str | None) -> str:
    if kind == "file":
        return source or f"slice-{k}d"
    if kind == "interp":
        return "interp" if k == 1 else "interp-2d"
    return f"{kind}-{k}d"


def _group(name: str) -> str:
    return f"landscape/{name}"


def _read_stored(path: str, name: str) -> dict:
    if not os.path.exists(path):
        raise FlatscopeError(f"--resume: {path} does not exist; nothing to resume")
    with store.open_results(path) as f:
        if _group(name) not in f:
            raise FlatscopeError(f"--resume: no landscape {name!r} in {path} to resume")
        g = f[_group(name)]
        out = {
            "options": json.loads(g.attrs.get("options", "{}")),
            "done": np.array(g["done"][()], dtype=bool),
            "vectors": np.asarray(g["directions"]["vectors"][()]),
            "splits": {},
            "wall_time_s": float(g.attrs.get("wall_time_s", 0.0)),
        }
        for s in ("train", "test"):
            if s in g:
                out["splits"][s] = (
                    np.array(g[s]["loss"][()], dtype=np.float64),
                    np.array(g[s]["accuracy"][()], dtype=np.float64),
                )
    return out


def _same(a, b) -> bool:
    return json.dumps(store.to_jsonable(a), sort_keys=True) == json.dumps(store.to_jsonable(b), sort_keys=True)


def compute(
    run,
    extra_checkpoints=(),
    *,
    two_d,
    kind,
    range_text,
    grid_text,
    norm,
    bias_bn,
    orthogonalize,
    hessian_from,
    trajectory,
    directions_from,
    name,
    resume,
    bn,
    batching,
    points_per_call,
    flush_every,
    parallel,
):
    """Compute (or, with ``resume``, finish) the slice and store ``/landscape/<name>`` as it goes.

    Returns ``(result, what, ranges, sizes)``: ``what`` says which directions, for the summary line.
    """
    started = time.time()
    first_warning = len(run.warnings)  # this run's warnings are stored with the slice
    paths = [run.checkpoint_path] + list(extra_checkpoints)
    kind, k = _plan(kind, two_d, paths, directions_from)
    if name is not None and not _NAME.match(name):
        raise FlatscopeError(f"--name {name!r}: use letters, digits and . _ + - only")
    if kind != "random" and (norm != "filter" or bias_bn != "zero" or orthogonalize):
        run.warn("--norm, --bias-bn and --orthogonalize apply to random directions only; ignored")
    if k is not None:  # check the grid before any work
        parse_range(range_text, k, (-1.0, 1.0))
        parse_grid(grid_text, k)

    splits = run.splits()
    objectives = split_objectives(run, parallel)
    first = objectives[splits[0]]
    bn_inputs = None
    if bn == "recompute":
        if not first.has_batchnorm():
            run.warn("--bn recompute: the model has no BatchNorm; nothing to recompute")
            bn = "eval"
        else:
            bn_inputs = run.split_source("train")
    plan = _directions(
        run,
        kind,
        k,
        paths,
        objectives,
        bn,
        bn_inputs,
        hessian_from,
        trajectory,
        directions_from,
        norm=norm,
        bias_bn=bias_bn,
        orthogonalize=orthogonalize,
    )
    dirs, k = plan["dirs"], plan["dirs"].k
    name = name or _default_name(kind, k, plan["stored"]["name"] if plan["stored"] else None)
    ranges, sizes = _ranges(kind, k, range_text, grid_text, plan)
    axes = [axis(lo, hi, n) for (lo, hi), n in zip(ranges, sizes)]
    grid = Grid(axes[0], axes[1] if k == 2 else None)
    options = {
        "name": name,
        "directions": kind,
        "dims": k,
        "range": [list(r) for r in ranges],
        "grid": sizes,
        "norm": norm if kind == "random" else None,
        "bias_bn": bias_bn if kind == "random" else None,
        "orthogonalize": bool(orthogonalize) if kind == "random" else None,
        "seed": run.seed if kind == "random" else None,
        "bn": bn,
        "checkpoints": [os.path.abspath(p) for p in paths],
        "checkpoint_sha256": plan["shas"],
        "hessian_from": os.path.abspath(hessian_from or run.out_path) if kind == "hessian" else None,
        "trajectory": dirs.info.get("trajectory"),
        "trajectory_epochs": plan["epochs"],
        "directions_from": dirs.info.get("source") if kind == "file" else None,
        "dtype": run.dtype_name,
        "loss": run.loss_name,
        "data": run.data_spec(),
        "split": run.split,
        "max_samples": run.max_samples,
        "batch_size": run.batch_size,
        "parallel": parallel,
    }
    result = LandscapeResult(name, dirs, grid, splits, anchors=plan["anchors"], options=options, dtype=run.dtype_name)
    if grid.index_of(*([0.0] * k)) is None:
        run.note(
            "note: the grid has no point at 0, so the checkpoint itself is not on it and the centre check "
            "is skipped (an odd --grid on a symmetric --range puts it at the centre)"
        )

    group, path = _group(name), run.out_path
    previous_wall = 0.0
    per_point_buffers = bn == "recompute" or plan["anchor_buffers"] is not None
    if resume:
        previous_wall, stored = _resume(path, name, result)
        # Continue in the stored chunks and batching mode, so the values equal an uninterrupted run's.
        if stored.get("batching") in ("vmap", "loop"):
            if batching not in ("auto", stored["batching"]):
                raise FlatscopeError(
                    f"--resume: the stored run used --batching {stored['batching']}; continuing "
                    f"with --batching {batching} would not give an uninterrupted run's values "
                    "(drop --batching, or drop --resume to start over)"
                )
            batching = stored["batching"]
        points_per_call = points_per_call or stored.get("points_per_call")
        run.note(f"resuming /{group}: {int(result.done.sum())} of {grid.size} points already done")
    if run.estimate:
        from ..estimate import Estimated, estimate_landscape

        raise Estimated(
            estimate_landscape(
                objectives, points=grid.size - int(result.done.sum()), bn_recompute=bn == "recompute", seed=run.seed
            )
        )
    result.plain = plain_values(objectives, bn=bn, bn_inputs=bn_inputs)
    mode = choose_batching(first, batching, per_point_buffers)
    # Rank 0's choice for all: the auto rule looks at the forward size, and shards may differ by a sample.
    mode, ppc = distributed.broadcast_object((mode, points_per_call or default_points_per_call(first, mode)))
    options["batching"], options["points_per_call"] = mode, ppc
    if not resume and run.is_main:
        with store.update(path) as f:
            store.write_analysis(
                f,
                group,
                result.to_tree(),
                kind="landscape",
                summary=result.summary(),
                options=options,
                provenance=run.provenance(),
            )

    def flush(res: LandscapeResult) -> None:
        if not run.is_main:  # under torchrun only rank 0 writes (with --parallel points it alone has every point)
            return
        with store.update(path) as f:
            g = f[group]
            g["done"][...] = res.done
            for s in res.splits:
                g[s]["loss"][...] = res.loss[s]
                g[s]["accuracy"][...] = res.accuracy[s]
            g.attrs["summary"] = json.dumps(store.to_jsonable(res.summary()))
            g.attrs["options"] = json.dumps(store.to_jsonable(res.options))
            g.attrs["wall_time_s"] = previous_wall + time.time() - started
            g.attrs["warnings"] = json.dumps([str(w) for w in run.warnings[first_warning:]])

    try:
        with run.progress(grid.size - int(result.done.sum()), f"landscape {name}") as advance:
            compute_points(
                result,
                objectives,
                batching=mode,
                points_per_call=options["points_per_call"],
                bn=bn,
                bn_inputs=bn_inputs,
                anchor_buffers=plan["anchor_buffers"],
                progress=advance,
                flush=flush,
                flush_every=flush_every,
                parallel=parallel,
            )
    except KeyboardInterrupt:
        run.warn(
            f"interrupted: {int(result.done.sum())} of {grid.size} points are saved in {path}; "
            "rerun the same command with --resume to finish"
        )
        raise
    warning = check_center(result, run.dtype)
    if warning:
        run.warn(warning)
    flush(result)  # with this run's warnings
    run.note(f"wrote /{group} to {path}")
    what = {
        "random": f"{norm}-normalized random direction{'s' if k == 2 else ''}",
        "interp": "interpolation " + " -> ".join(os.path.basename(p) for p in paths),
        "hessian": f"top-{k} Hessian eigenvector{'s' if k == 2 else ''}",
        "pca": "PCA of the training trajectory",
        "file": f"directions from {directions_from}",
    }[kind]
    return result, what, ranges, sizes


# ------------------------------------------------------------------------------------------- helpers
def _plan(
    kind: str | None, two_d: bool | None, paths: list[str], directions_from: str | None
) -> tuple[str, int | None]:
    """The kind of directions and the dimension (None: read from --directions-from)."""
    if directions_from is not None:
        if kind is not None or len(paths) > 1:
            raise FlatscopeError("--directions-from replaces --directions and extra checkpoints; give one checkpoint")
        return "file", None
    if len(paths) > 1:
        if kind not in (None, "interp"):
            raise FlatscopeError(f"{len(paths)} checkpoints mean interpolation; drop --directions {kind}")
        if two_d is not None and (2 if two_d else 1) != len(paths) - 1:
            raise FlatscopeError("interpolation: two checkpoints give a line (--1d), three a plane (--2d)")
        return "interp", len(paths) - 1
    kind = kind or "random"
    if kind == "interp":
        raise FlatscopeError("--directions interp needs 2 checkpoints (a line) or 3 (a plane)")
    if kind == "pca":
        return kind, 1 if two_d is False else 2
    return kind, 2 if two_d else 1


def _directions(
    run,
    kind,
    k,
    paths,
    objectives,
    bn,
    bn_inputs,
    hessian_from,
    trajectory,
    directions_from,
    *,
    norm,
    bias_bn,
    orthogonalize,
) -> dict:
    """The directions and what comes with them: stored axes, interpolation anchors, trajectory epochs."""
    first = next(iter(objectives.values()))
    layout = first.layout
    out: dict = {
        "stored": None,
        "anchors": None,
        "anchor_buffers": None,
        "epochs": None,
        "shas": [run.checkpoint.sha256],
        "default_range": (-1.0, 1.0),
    }
    if kind == "random":
        dirs = random_directions(
            first.w0, layout, k, run.generator(0), norm=norm, bias_bn=bias_bn, orthogonalize=orthogonalize
        )
    elif kind == "interp":
        others = [_load_like(run, p, layout, "checkpoint") for p in paths[1:]]
        out["shas"] += [c.sha256 for c in others]
        other_objs = [{s: run.objective(s, model=c.model, shard=False) for s in objectives} for c in others]
        dirs = interpolation(first.w0, [next(iter(o.values())).w0 for o in other_objs], layout)
        out["default_range"] = (-0.5, 1.5)
        if first.has_batchnorm() and bn == "eval":
            out["anchor_buffers"] = [first.buffers] + [next(iter(o.values())).buffers for o in other_objs]
        own = [plain_values(o, bn=bn, bn_inputs=bn_inputs) for o in [objectives] + other_objs]
        corners = [[0.0] * k] + [[1.0 if j == i else 0.0 for j in range(k)] for i in range(k)]
        out["anchors"] = {"labels": [os.path.splitext(os.path.basename(p))[0] for p in paths], "coords": corners}
        out["anchors"].update({s: [v[s][0] for v in own] for s in objectives})
    elif kind == "hessian":
        dirs = _hessian_directions(run, layout, k, hessian_from)
    elif kind == "pca":
        ws, out["epochs"], folder = _trajectory(run, trajectory, layout)
        dirs = pca_directions(ws, first.w0, layout, k)
        dirs.info["trajectory"] = os.path.abspath(folder)
    else:
        dirs, out["stored"] = read_landscape_directions(directions_from, layout)
    out["dirs"] = dirs.rounded(run.dtype)
    return out


def _has_eigenvectors(path: str, k: int) -> bool:
    import h5py

    if not os.path.exists(path) or not h5py.is_hdf5(path):
        return False
    with h5py.File(path, "r") as f:
        return "hessian/eigenvectors" in f and f["hessian/eigenvectors"].shape[0] >= k


def _hessian_directions(run, layout, k: int, hessian_from: str | None):
    """Stored eigenvectors (``--hessian-from``, or the results file when it holds enough), else the
    top-k eigenvectors of the training loss computed now by Lanczos (``flatscope.analyses.hessian``)."""
    if hessian_from is not None or _has_eigenvectors(run.out_path, k):
        return read_hessian_eigenvectors(hessian_from or run.out_path, layout, k)
    from ..analyses.hessian import top_eigenvectors

    run.note(f"computing the top-{k} Hessian eigenvectors of the train loss (Lanczos)")
    res = top_eigenvectors(run.objective("train"), k, seed=run.seed)
    if not bool(np.all(res.converged)):
        run.warn(f"Lanczos did not converge for every eigenvector (residuals {np.asarray(res.residuals).tolist()})")
    return Directions(
        res.eigenvectors.detach().cpu().to(torch.float64),
        layout,
        "hessian",
        {
            "source": "computed (Lanczos, train loss)",
            "eigenvalues": np.asarray(res.eigenvalues, dtype=float).tolist(),
            "residuals": np.asarray(res.residuals, dtype=float).tolist(),
        },
    )


def _ranges(kind: str, k: int, range_text, grid_text, plan: dict) -> tuple[list, list]:
    """Per-axis (lo, hi) and point counts: the user's, else the stored slice's, the path's, or the default."""
    stored = plan["stored"]
    stored_axes = [stored["x"], stored["y"]][:k] if stored and stored["x"] is not None else None
    if range_text is None and kind == "pca":
        path = np.asarray(plan["dirs"].info["path"])
        ext = [1.25 * float(np.abs(path[:, i]).max()) for i in range(k)]
        ranges = [(-a, a) if a > 0 else (-1.0, 1.0) for a in ext]
    elif range_text is None and stored_axes:
        ranges = [(float(ax[0]), float(ax[-1])) for ax in stored_axes]
    else:
        ranges = parse_range(range_text, k, plan["default_range"])
    sizes = [len(ax) for ax in stored_axes] if grid_text is None and stored_axes else parse_grid(grid_text, k)
    return ranges, sizes


def _resume(path: str, name: str, result: LandscapeResult) -> tuple[float, dict]:
    """Load the finished points of an interrupted run into ``result`` after checking it is the same run."""
    old = distributed.on_main(lambda: _read_stored(path, name))  # rank 0 reads, every rank continues alike
    options = result.options
    for key in RESUME_KEYS:
        if not _same(old["options"].get(key), options.get(key)):
            raise FlatscopeError(
                f"--resume: option {key!r} was {store.to_jsonable(old['options'].get(key))} in the "
                f"stored run but is {store.to_jsonable(options.get(key))} now; rerun the same command "
                "with --resume, or drop --resume to start over"
            )
    vectors = result.directions.vectors.numpy()
    if old["vectors"].shape != vectors.shape or not np.array_equal(old["vectors"].astype(np.float64), vectors):
        raise FlatscopeError(
            f"--resume: the directions stored in /{_group(name)} differ from this command's; "
            "drop --resume to start over"
        )
    if old["done"].shape != result.grid.shape:
        raise FlatscopeError(
            f"--resume: the stored grid has shape {list(old['done'].shape)}, this one {list(result.grid.shape)}"
        )
    result.done = old["done"]
    for s in result.splits:
        result.loss[s], result.accuracy[s] = old["splits"][s]
    return old["wall_time_s"], old["options"]


# ------------------------------------------------------------------------------------------ audit
# result-determining options the cache finds under another name: the dimension, and the group's name
KEYED_AS = {"2d": "dims", "name": "group"}


def validate(step) -> None:
    """The range and grid of the step's slice (no data needed)."""
    kind, k = _step_plan(step)
    parse_range(step.params["range_text"], k, (-1.0, 1.0))
    parse_grid(step.params["grid_text"], k)


def _step_plan(step) -> tuple[str, int]:
    if step.extra_checkpoints:
        return "interp", len(step.extra_checkpoints)
    return "random", 2 if step.params.get("two_d") else 1


def group(step) -> str:
    kind, k = _step_plan(step)
    name = step.params.get("name") or _default_name(kind, k, None)
    if not _NAME.match(name):
        raise FlatscopeError(f"landscape name {name!r}: use letters, digits and . _ + - only")
    return _group(name)


def expected(step, target) -> dict:
    p = step.params
    kind, k = _step_plan(step)
    random = kind == "random"
    bn = p["bn"]
    if bn == "recompute" and not target.has_batchnorm:
        bn = "eval"
    run = target.run
    return {
        "directions": kind,
        "dims": k,
        "range": [list(r) for r in parse_range(p["range_text"], k, (-1.0, 1.0) if random else (-0.5, 1.5))],
        "grid": parse_grid(p["grid_text"], k),
        "norm": p["norm"] if random else None,
        "bias_bn": p["bias_bn"] if random else None,
        "orthogonalize": bool(p["orthogonalize"]) if random else None,
        "seed": run.seed if random else None,
        "bn": bn,
        "checkpoint_sha256": [target.sha256] + list(step.extra_sha256),
        "dtype": run.dtype_name,
        "loss": run.loss_name,
        "data": target.data_spec,
    }


def normalize(stored: dict) -> dict:
    return stored


def complete(g) -> str | None:
    if "done" not in g or not bool(np.all(g["done"][()])):
        return "the stored slice is not finished"
    return None


def metric_keys(step) -> list:
    kind, k = _step_plan(step)
    dirs = Directions(torch.zeros(k, 1, dtype=torch.float64), ParamLayout(("w",), ((1,),)), kind, {})
    x = np.array([-1.0, 0.0, 1.0])
    res = LandscapeResult("x", dirs, Grid(x, x if k == 2 else None), list(step.splits))
    return list(res.summary())
