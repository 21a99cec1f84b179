"""``flatscope plot``: re-render plots from results files."""

from __future__ import annotations

import click

from ...plotting import render_files
from ..common import Run, common_options


@click.command("plot")
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("--plot-format", type=click.Choice(["png", "svg", "pdf"]), default="png", show_default=True)
@click.option(
    "--outdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for overlay plots of several files (default: the first file's folder).",
)
@common_options
def command(results, plot_format, outdir, **common):
    """Re-render every plot from results files, without recomputing anything.

    One file: its plots are written beside it. Several files: analyses of the same name are
    overlaid, one curve per checkpoint (overlay.<analysis>.*).

    \b
    Example:
      flatscope plot runs/mlp-sgd.flatscope.h5
      flatscope plot runs/mlp-sgd.flatscope.h5 runs/mlp-esgd.flatscope.h5 --outdir report/
    """
    run = Run(**common)
    run.setup()
    paths = [str(p) for p in render_files(list(results), fmt=plot_format, outdir=outdir)]
    for p in paths:
        run.note(f"wrote {p}")
    run.emit({"plots": paths}, lambda console: console.print(f"{len(paths)} plot(s) written"))
