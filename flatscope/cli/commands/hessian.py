"""``flatscope hessian``: Hessian eigenvalues, spectral density, trace and per-layer spectra."""

from __future__ import annotations

import click

from ...options import HESSIAN
from ..common import analysis_options, estimate_option, pass_run
from ..schema import schema_options


@click.command("hessian")
@analysis_options
@schema_options(HESSIAN)
@estimate_option
@pass_run(shards=True)
def command(run, **params):
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
    from ...steps.hessian import compute

    res, obj = compute(run, **params)
    top, bottom, tol = params["top"], params["bottom"], params["tol"]
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
