"""``flatscope landscape``: 1-D and 2-D loss-landscape slices, resumable."""

from __future__ import annotations

import functools
import json
import os
import re
import time

import click
import numpy as np
import torch

from ... import distributed
from ... import results as store
from ...analyses.landscape import (
    BATCHING,
    BN_MODES,
    Grid,
    LandscapeResult,
    axis,
    check_center,
    choose_batching,
    compute,
    default_points_per_call,
    parse_grid,
    parse_range,
    plain_values,
)
from ...checkpoint import load_checkpoint
from ...directions import (
    BIAS_BN,
    NORMALIZATIONS,
    Directions,
    interpolation,
    pca_directions,
    random_directions,
    read_hessian_eigenvectors,
    read_landscape_directions,
    trajectory_files,
)
from ...errors import FlatscopeError
from ...models import is_factory_path
from ...params import ParamLayout
from ..common import analysis_options, estimate_option, pass_run
from ..parallel import objectives as split_objectives
from ..parallel import parallel_option

KINDS = ("random", "interp", "hessian", "pca")
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


def _many_checkpoints(f):
    """Map the command's 1 to 3 ``CHECKPOINTS`` onto the shared ``checkpoint`` plus ``extra_checkpoints``."""

    @functools.wraps(f)
    def wrapper(**kw):
        paths = list(kw.pop("checkpoints"))
        if not 1 <= len(paths) <= 3:
            raise FlatscopeError(
                f"landscape takes 1 to 3 checkpoints (3 give the interpolation plane), got {len(paths)}"
            )
        return f(checkpoint=paths[0], extra_checkpoints=paths[1:], **kw)

    return wrapper


def _checkpoints_argument(cmd: click.Command) -> click.Command:
    """Replace the shared single ``CHECKPOINT`` argument by ``CHECKPOINTS...`` (1 to 3)."""
    for i, p in enumerate(cmd.params):
        if isinstance(p, click.Argument) and p.name == "checkpoint":
            cmd.params[i] = click.Argument(["checkpoints"], nargs=-1, required=True, type=click.Path(dir_okay=True))
    return cmd


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


@click.command("landscape")
@click.option(
    "--2d/--1d",
    "two_d",
    default=None,
    help="A 2-D plane or a 1-D line. Default: 1-D, except PCA and three checkpoints (2-D).",
)
@click.option(
    "--directions",
    "kind",
    type=click.Choice(KINDS),
    default=None,
    help="random (default), interp (implied by 2-3 checkpoints), hessian (top eigenvectors of the "
    "train loss: stored or computed), pca (of the training trajectory).",
)
@click.option(
    "--range",
    "range_text",
    default=None,
    metavar="LO:HI[,LO:HI]",
    help="Coordinates along x (and y). Default -1:1; interp -0.5:1.5; pca 1.25x the path's extent; "
    "--directions-from the stored slice's.",
)
@click.option(
    "--grid",
    "grid_text",
    default=None,
    metavar="N[,M]",
    help="Points along x (and y), at least 2. Default 51 (or the stored slice's). Use an odd N "
    "with a symmetric range so that 0 (the checkpoint) is a grid point.",
)
@click.option(
    "--norm",
    type=click.Choice(NORMALIZATIONS),
    default="filter",
    show_default=True,
    help="Random directions: rescale each filter (Li et al. 2018) or layer to w's norm, or not at all.",
)
@click.option(
    "--bias-bn",
    type=click.Choice(BIAS_BN),
    default="zero",
    show_default=True,
    help="Random directions: zero 1-D parameters (biases, BatchNorm affine) or include them.",
)
@click.option(
    "--orthogonalize", is_flag=True, help="Random 2-D: make the second direction exactly orthogonal to the first."
)
@click.option(
    "--hessian-from",
    default=None,
    metavar="RESULTS.h5",
    help="File with /hessian/eigenvectors from `flatscope hessian --save-eigenvectors` [default: the "
    "results file if it holds them, else they are computed now by Lanczos].",
)
@click.option(
    "--trajectory",
    default=None,
    metavar="DIR",
    help="PCA: folder of checkpoints from `flatscope train --save-every K` (default: <checkpoint>-traj/).",
)
@click.option(
    "--directions-from",
    default=None,
    metavar="RESULTS.h5[:NAME]",
    help="Reuse the directions of a stored landscape (its parameter layout must match).",
)
@click.option(
    "--name",
    default=None,
    metavar="NAME",
    help="Group /landscape/NAME (default random-1d, random-2d, interp, interp-2d, hessian-2d, pca-2d, ...).",
)
@click.option("--resume", is_flag=True, help="Finish an interrupted run of the same command; finished points are kept.")
@click.option(
    "--bn",
    type=click.Choice(BN_MODES),
    default="eval",
    show_default=True,
    help="BatchNorm: the checkpoint's running statistics, or recompute them at every point on the train inputs.",
)
@click.option(
    "--batching",
    type=click.Choice(BATCHING),
    default="auto",
    show_default=True,
    help="Several points per vmapped call, or one point per call; auto follows the rule in the README.",
)
@click.option(
    "--points-per-call",
    type=click.IntRange(min=1),
    default=None,
    metavar="M",
    help="Points per chunk: one vmapped call, or a loop over them (default: about 4096 samples "
    "per vmapped call, 8 to 32 points; 16 for a loop).",
)
@click.option(
    "--flush-every",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Write finished points to the results file at most this often (and on exit or Ctrl-C).",
)
@parallel_option("grid points")
@analysis_options
@_many_checkpoints
@estimate_option
@pass_run
def command(
    run,
    extra_checkpoints,
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
    """Loss and accuracy on a line or plane through a checkpoint, along random (filter-normalized),
    Hessian, PCA or interpolation directions. Resumable: rerun with --resume after Ctrl-C or a kill.

    \b
    Examples:
      flatscope landscape ckpt.pt                                 # 1-D, random direction, -1..1, 51 points
      flatscope landscape ckpt.pt --2d --range -1:1 --grid 51     # 2-D surface
      flatscope landscape ckpt.pt --2d --range -1:1,-0.5:0.5 --grid 51,26
      flatscope landscape a.pt b.pt --range -0.5:1.5 --grid 101   # interpolation a -> b
      flatscope landscape a.pt b.pt c.pt                          # the plane through three checkpoints
      flatscope landscape ckpt.pt --2d --directions hessian       # top-2 Hessian eigenvectors
      flatscope landscape runs/mlp-sgd.pt --directions pca --trajectory runs/mlp-sgd-traj/
      flatscope landscape other.pt --directions-from results.h5   # same directions, another checkpoint
      flatscope landscape ckpt.pt --2d --resume                   # finish an interrupted run
      torchrun --nproc-per-node 4 -m flatscope landscape ckpt.pt --2d --grid 101 --parallel points
    """
    started = time.time()
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
        from ...estimate import estimate_landscape

        est = estimate_landscape(
            objectives, points=grid.size - int(result.done.sum()), bn_recompute=bn == "recompute", seed=run.seed
        )
        return run.emit_estimate(est)
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

    try:
        with run.progress(grid.size - int(result.done.sum()), f"landscape {name}") as advance:
            compute(
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
    flush(result)
    run.note(f"wrote /{group} to {path}")
    warning = check_center(result, run.dtype)
    if warning:
        run.warn(warning)
    plots = run.plot(group)
    payload = dict(result.to_json(), results=os.path.abspath(path), group=f"/{group}", plots=plots)
    what = {
        "random": f"{norm}-normalized random direction{'s' if k == 2 else ''}",
        "interp": "interpolation " + " -> ".join(os.path.basename(p) for p in paths),
        "hessian": f"top-{k} Hessian eigenvector{'s' if k == 2 else ''}",
        "pca": "PCA of the training trajectory",
        "file": f"directions from {directions_from}",
    }[kind]
    run.emit(payload, lambda console: _human(console, result, what, ranges, sizes))


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
    out = {
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
    from ...analyses.hessian import top_eigenvectors

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


def _human(console, result: LandscapeResult, what: str, ranges, sizes) -> None:
    from rich.table import Table

    rng = ", ".join(f"{'xy'[i]} in [{lo:g}, {hi:g}] ({n} points)" for i, ((lo, hi), n) in enumerate(zip(ranges, sizes)))
    console.print(f"landscape [bold]{result.name}[/bold]: {what}, {rng}, batching {result.options.get('batching')}")
    sm = result.summary()

    def fmt(v, spec=".5g"):
        return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)

    t = Table("split", "loss at w", "plain loss", "min loss", "max loss", "acc at w", "min acc")
    for s in result.splits:
        t.add_row(
            s,
            fmt(sm[f"{s}_loss_center"]),
            fmt(result.plain[s][0]),
            fmt(sm[f"{s}_loss_min"]),
            fmt(sm[f"{s}_loss_max"]),
            fmt(sm[f"{s}_accuracy_center"], ".4f"),
            fmt(sm[f"{s}_accuracy_min"], ".4f"),
        )
    console.print(t)
    for s in result.splits:
        if f"{s}_barrier" in sm:
            console.print(f"{s} loss barrier between the checkpoints: {sm[f'{s}_barrier']:.5g}")
    info = result.directions.info
    if "explained_variance_ratio" in info:
        console.print(
            "explained variance: "
            + ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(info["explained_variance_ratio"]))
        )
    if "eigenvalues" in info:
        console.print("eigenvalues: " + ", ".join(f"{v:.5g}" for v in info["eigenvalues"]))


_checkpoints_argument(command)
