"""``flatscope landscape``: 1-D and 2-D loss-landscape slices, resumable."""

from __future__ import annotations

import functools
import math
import os
from typing import TYPE_CHECKING

import click

from ...errors import FlatscopeError
from ...options import LANDSCAPE
from ..common import analysis_options, estimate_option, pass_run
from ..schema import schema_options

if TYPE_CHECKING:
    from ...analyses.landscape import LandscapeResult


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


@click.command("landscape")
@schema_options(LANDSCAPE)
@analysis_options
@_many_checkpoints
@estimate_option
@pass_run
def command(run, extra_checkpoints, **options):
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
    from ...steps.landscape import compute

    result, what, ranges, sizes = compute(run, extra_checkpoints, **options)
    group = f"landscape/{result.name}"
    plots = run.plot(group)
    payload = dict(result.to_json(), results=os.path.abspath(run.out_path), group=f"/{group}", plots=plots)
    run.emit(payload, lambda console: _human(console, result, what, ranges, sizes))


def _human(console, result: LandscapeResult, what: str, ranges, sizes) -> None:
    from rich.table import Table

    rng = ", ".join(f"{'xy'[i]} in [{lo:g}, {hi:g}] ({n} points)" for i, ((lo, hi), n) in enumerate(zip(ranges, sizes)))
    console.print(f"landscape [bold]{result.name}[/bold]: {what}, {rng}, batching {result.options.get('batching')}")
    sm = result.summary()

    def fmt(v, spec=".5g"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

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
