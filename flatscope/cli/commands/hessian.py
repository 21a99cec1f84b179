"""``flatscope hessian``: Hessian eigenvalues, spectral density, trace and per-layer spectra."""

from __future__ import annotations

import click

from ...analyses.hessian import HVP_MODES, hessian_analysis
from ...errors import FlatscopeError
from ...linalg import TRACE_METHODS
from ...safe_files import check_allocation
from ..common import analysis_options, pass_run


@click.command("hessian")
@analysis_options
@click.option(
    "--top",
    type=int,
    default=10,
    show_default=True,
    metavar="K",
    help="How many of the largest eigenvalues to compute (Lanczos).",
)
@click.option(
    "--bottom",
    type=int,
    default=0,
    show_default=True,
    metavar="K",
    help="Also the K smallest (most negative) eigenvalues.",
)
@click.option(
    "--density/--no-density", default=True, show_default=True, help="Spectral density by stochastic Lanczos quadrature."
)
@click.option(
    "--probes",
    type=int,
    default=8,
    show_default=True,
    metavar="N",
    help="Random probes for the density (each runs --steps Lanczos steps).",
)
@click.option(
    "--steps",
    type=int,
    default=80,
    show_default=True,
    metavar="M",
    help="Lanczos steps per density probe (M-point Gauss rule).",
)
@click.option(
    "--sigma",
    type=float,
    default=0.01,
    show_default=True,
    metavar="S",
    help="Gaussian broadening of the density, as a fraction of the spread of the Ritz nodes.",
)
@click.option(
    "--trace-probes",
    type=int,
    default=60,
    show_default=True,
    metavar="N",
    help="Hessian-vector products for the trace estimate (exact when N >= parameter count).",
)
@click.option(
    "--trace-method", type=click.Choice(TRACE_METHODS), default="hutch++", show_default=True, help="Trace estimator."
)
@click.option("--per-layer", is_flag=True, help="Top eigenvalue and trace of every parameter tensor's block.")
@click.option(
    "--save-eigenvectors",
    is_flag=True,
    help="Store the top eigenvectors (k x dim) and the parameter layout (for landscape directions).",
)
@click.option(
    "--tol", type=float, default=1e-5, show_default=True, help="Converged when ||Hv - lambda v|| <= TOL * |lambda_max|."
)
@click.option(
    "--max-iter",
    type=int,
    default=None,
    metavar="N",
    help="Most Hessian-vector products per Lanczos run [default: max(300, 30 K)].",
)
@click.option(
    "--block-size",
    type=int,
    default=1,
    show_default=True,
    metavar="B",
    help="Lanczos block size; use B >= multiplicity to resolve exactly repeated eigenvalues.",
)
@pass_run(shards=True)
def command(
    run,
    top,
    bottom,
    density,
    probes,
    steps,
    sigma,
    trace_probes,
    trace_method,
    per_layer,
    save_eigenvectors,
    tol,
    max_iter,
    block_size,
):
    """Hessian spectrum of the loss at the checkpoint: top/bottom eigenvalues with residuals,
    spectral density, trace, per-layer spectra and flatness summaries.

    Everything comes from exact Hessian-vector products of the mean loss over the whole split.
    Results go to /hessian in the results file, plots beside it.

    \b
    Examples:
      flatscope hessian sample_checkpoints/mlp-sgd.pt
      flatscope hessian sample_checkpoints/mlp-sgd.pt --top 20 --bottom 5
      flatscope hessian sample_checkpoints/cnn-sgd.pt --density --probes 8 --steps 100
      flatscope hessian sample_checkpoints/cnn-sgd.pt --per-layer
      flatscope hessian sample_checkpoints/mlp-sgd.pt --save-eigenvectors --json
    """
    if run.split == "both":
        raise FlatscopeError("flatscope hessian analyses one split at a time: use --split train or --split test")
    obj = run.objective()
    shard = run.param_shard(obj.dim)
    n_local = shard.local_dim if shard is not None else obj.dim  # the vectors this rank holds
    for what, n in (
        (f"--probes {probes} x --steps {steps}", max(probes, 0) * max(steps, 0) * 4 * bool(density)),
        (f"--steps {steps}", max(steps, 0) * n_local),
        (f"--trace-probes {trace_probes}", max(trace_probes, 0) * n_local),
        (
            f"--top {top} / --bottom {bottom} / --block-size {block_size}",
            (max(top, 0) + max(bottom, 0) + max(block_size, 0)) * n_local * 3,
        ),
    ):
        check_allocation(what, n)
    hvp = run.hvp_mode if run.hvp_mode in HVP_MODES else "auto"
    res = hessian_analysis(
        obj,
        top=top,
        bottom=bottom,
        density=density,
        probes=probes,
        steps=steps,
        sigma=sigma,
        trace_probes=trace_probes,
        trace_method=trace_method,
        per_layer=per_layer,
        save_eigenvectors=save_eigenvectors,
        tol=tol,
        max_iter=max_iter,
        block_size=block_size,
        seed=run.seed,
        hvp=hvp,
        progress=run.progress,
        shard=shard,
    )
    if shard is not None and save_eigenvectors and res.top is not None:
        res.top.eigenvectors = shard.gather(res.top.eigenvectors)  # whole rows, to be written (by rank 0)
    if obj.hvp_mode == "fd":
        rel = obj.fd_accuracy(seed=run.seed)
        res.hvp_fd_rel_error = rel
        run.note(
            "--hvp fd: relative difference from an exact product on a probe over "
            f"{obj.hvp_info.get('fd_probe_samples', 0)} samples: "
            + ("not measurable (no exact product for this model)" if rel is None else f"{rel:.2e}")
        )
    for w in res.warnings:
        run.warn(w)
    options = dict(
        top=top,
        bottom=bottom,
        density=density,
        probes=probes,
        steps=steps,
        sigma=sigma,
        trace_probes=trace_probes,
        trace_method=trace_method,
        per_layer=per_layer,
        save_eigenvectors=save_eigenvectors,
        tol=tol,
        max_iter=max_iter,
        block_size=block_size,
        hvp=res.hvp_mode,
        **({"shard_params": True} if shard is not None else {}),
    )
    stored = res.top is not None and len(res.top.eigenvalues) > 0
    if stored:
        run.save("hessian", res.to_tree(), kind="hessian", summary=res.summary(), options=options)
    if res.nonfinite:
        where = f"; the stages before it are stored in {run.out_path}" if stored else ""
        raise FlatscopeError(res.nonfinite + where)
    plots = run.plot("hessian")
    payload = res.to_json()
    payload.update(results=run.out_path, plots=plots, split=run.split)

    def human(console):
        from rich.table import Table

        s = res.summary()
        console.print(
            f"[bold]Hessian[/bold] of the {run.split} loss ({obj.n_total} samples), "
            f"{res.dim:,} parameters, {res.n_matvec} Hessian-vector products ({res.hvp_mode})"
        )
        t = Table("i", "eigenvalue", "residual", "converged", title=f"top {top} (Lanczos, tol {tol:g})")
        for i, (v, r, c) in enumerate(zip(res.top.eigenvalues, res.top.residuals, res.top.converged), 1):
            t.add_row(str(i), f"{v:.6g}", f"{r:.1e}", "yes" if c else "[red]no[/red]")
        console.print(t)
        if res.bottom is not None:
            t = Table("i", "eigenvalue", "residual", "converged", title=f"bottom {bottom}")
            for i, (v, r, c) in enumerate(zip(res.bottom.eigenvalues, res.bottom.residuals, res.bottom.converged), 1):
                t.add_row(str(i), f"{v:.6g}", f"{r:.1e}", "yes" if c else "[red]no[/red]")
            console.print(t)
        lines = [
            ("lambda_max", f"{s['lambda_max']:.6g}"),
            ("lambda_min", f"{s['lambda_min']:.6g}  (from {res.lambda_min[1]})"),
            (f"lambda_max/lambda_{top}", f"{s['lambda_ratio']:.4g}"),
            ("trace", f"{s['trace']:.6g} +- {s['trace_stderr']:.2g}  ({res.traces.method if res.traces else '-'})"),
            ("effective rank", f"{s['effective_rank']:.4g}  (trace / lambda_max)"),
            (
                "negative mass",
                "n/a (needs --density)"
                if res.density is None
                else f"{s['negative_mass']:.3g}  (fraction of eigenvalues < 0: {s['negative_fraction']:.3g} "
                f"± {s['negative_fraction_err']:.2g}, quadrature bias bound included)",
            ),
        ]
        if res.density is not None:
            m, se = res.density.integral(lambda x: x)
            lines.append(
                (
                    "density",
                    f"{res.density.n_probes} probes x {res.density.n_steps} steps, "
                    f"mean {m:.4g} +- {se:.2g}, sigma {res.sigma:.3g}",
                )
            )
        width = max(len(a) for a, _ in lines) + 2
        for label, value in lines:
            console.print(f"{label:<{width}}{value}", highlight=False)
        if res.per_layer is not None:
            pl = res.per_layer
            t = Table("tensor", "size", "top eigenvalue", "trace", title="per layer")
            for i, nm in enumerate(pl["names"]):
                t.add_row(
                    nm,
                    str(int(pl["numel"][i])),
                    f"{pl['lambda_max'][i]:.4g}",
                    f"{pl['trace'][i]:.4g} +- {pl['trace_stderr'][i]:.2g}",
                )
            console.print(t)
        console.print(f"results: {run.out_path}  ({sum(res.seconds.values()):.1f} s)")

    run.emit(payload, human)
