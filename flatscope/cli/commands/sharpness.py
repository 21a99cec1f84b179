"""``flatscope sharpness``: worst-case and average-case (adaptive) sharpness over a ρ grid."""

from __future__ import annotations

import click

from ...options import SHARPNESS
from ..common import analysis_options, estimate_option, pass_run
from ..schema import schema_options


@click.command("sharpness")
@schema_options(SHARPNESS)
@analysis_options
@estimate_option
@pass_run
def command(run, **options):
    """Worst-case sharpness max_{δ ∈ B(ρ)} L(w + δ) − L(w) and average-case sharpness, over a ρ grid.

    B(ρ) is the ℓ2 or ℓ∞ ball of radius ρ, scaled elementwise by |w| + η (adaptive, the default:
    Andriushchenko et al. 2023, ASAM) or not. The worst case is found by projected gradient ascent
    with restarts (a lower bound on the true maximum); the average case averages the loss over the
    ball's surface. Lower is flatter. Results go to /sharpness, with a plot against ρ.

    \b
    Examples:
      flatscope sharpness ckpt.pt --rho 0.01..1:5                 # worst case, l2, adaptive
      flatscope sharpness ckpt.pt --rho 0.005 --norm linf --steps 20 --restarts 4
      flatscope sharpness ckpt.pt --rho 0.05 --no-adaptive --average gaussian --samples 64
      flatscope sharpness ckpt.pt --rho 0.5 --m 128               # m-sharpness over sub-batches of 128
      flatscope sharpness ckpt.pt --rho 1 --eta 0.01 --params weights --json
    """
    from ...steps.sharpness import compute

    res, opts, k = compute(run, **options)
    adaptive, norm, average = options["adaptive"], options["norm"], options["average"]
    plots = run.plot("sharpness")
    payload = res.to_json()
    payload["results"] = run.out_path
    payload["plots"] = plots

    def human(console):
        from rich.table import Table

        ball = f"{'adaptive' if adaptive else 'standard'} {norm} ball" + (f" (η = {opts['eta']:g})" if adaptive else "")
        how = f"{opts['steps']} steps × {opts['restarts']} restart(s)"
        if opts["m"]:
            how += f", m = {opts['m']} ({k} sub-batch{'es' if k > 1 else ''} of the smallest split)"
        console.print(
            f"sharpness, {ball} over {res.n_perturbed:,} entries, {how}; average case: "
            + (f"{opts['samples']} draws ({average})" if opts["samples"] else "skipped")
        )
        for split, c in res.curves.items():
            head = f"[bold]{split}[/bold]: base loss {c.base_loss:.5g}"
            if c.base_error == c.base_error:
                head += f", base error {c.base_error:.4f}"
            console.print(head)
            cols = ["ρ", "worst", "± sem" if opts["m"] else "spread", "δ error", "‖u‖/ρ", "‖δ‖₂"]
            if opts["samples"]:
                cols += ["average", "± sem"]
            t = Table(*cols)
            for i, r in enumerate(res.rho):
                row = [
                    f"{r:.3g}",
                    f"{c.worst[i]:.3g}",
                    f"{c.worst_sem[i]:.2g}"
                    if opts["m"]
                    else (f"{c.restart_spread[i]:.2g}" if opts["restarts"] > 1 else "-"),
                    f"{c.worst_error[i].mean():.4f}",
                    f"{c.ball_norm[i].mean():.3f}",
                    f"{c.delta_norm[i].mean():.3g}",
                ]
                if opts["samples"]:
                    row += [f"{c.average[i]:.3g}", f"{c.average_sem[i]:.2g}"]
                t.add_row(*row)
            console.print(t)

    run.emit(payload, human)
