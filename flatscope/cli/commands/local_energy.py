"""``flatscope local-energy``: δE(σ) perturbation curves with error bars."""

from __future__ import annotations

import click

from ...options import LOCAL_ENERGY
from ..common import analysis_options, estimate_option, pass_run
from ..schema import schema_options


@click.command("local-energy")
@schema_options(LOCAL_ENERGY)
@analysis_options
@estimate_option
@pass_run
def command(run, **options):
    """Local energy δE(σ) = E_z[E(w + σ z⊙w)] − E(w) of the loss and the error rate.

    The mean rise of the loss and of the error rate (1 − accuracy) under Gaussian weight noise of
    relative scale σ (Pittorino et al. 2021), with standard errors over the draws. Flat minima rise
    slowly. Results go to /local_energy in the results file, with a plot of δE against σ.

    \b
    Examples:
      flatscope local-energy ckpt.pt --sigma 0.01..0.5                 # 10 log-spaced σ
      flatscope local-energy ckpt.pt --sigma 0.01..0.5:20:lin --samples 64 --split both
      flatscope local-energy ckpt.pt --sigma 0.05,0.1,0.2 --noise additive
      flatscope local-energy ckpt.pt --target-error 0.01   # σ where the error rises by 1 point
      flatscope local-energy ckpt.pt --params weights --noise filter --json
      torchrun --nproc-per-node 4 -m flatscope local-energy ckpt.pt --samples 64 --parallel points
    """
    from ...steps.local_energy import compute

    res, objs, bn = compute(run, **options)
    first = next(iter(objs.values()))
    n, noise, params = res.samples, options["noise"], options["params"]
    plots = run.plot("local_energy")
    payload = res.to_json()
    payload["results"] = run.out_path
    payload["plots"] = plots

    def human(console):
        from rich.table import Table

        console.print(
            f"local energy, {noise} noise on parameters {params!r} ({res.n_perturbed:,} entries), "
            f"{n} draws per σ, BN {bn}, {'batched' if res.batched else 'loop'}"
        )
        classification = first.classification
        for split, c in res.curves.items():
            head = f"[bold]{split}[/bold]: base loss {c.base_loss:.5g}"
            if classification:
                head += f", base error {c.base_error:.4f}"
            console.print(head)
            cols = ["σ", "δ loss", "± sem"] + (["δ error", "± sem"] if classification else [])
            t = Table(*cols)
            for i, s in enumerate(res.sigma):
                row = [f"{s:.4g}", f"{c.delta_loss_mean[i]:.4g}", f"{c.delta_loss_sem[i]:.2g}"]
                if classification:
                    row += [f"{c.delta_err_mean[i]:.4f}", f"{c.delta_err_sem[i]:.4f}"]
                t.add_row(*row)
            console.print(t)
            tg = c.target
            if tg is not None:
                if tg.reached:
                    console.print(
                        f"target: δ error reaches {tg.epsilon:g} at σ = {tg.sigma:.4g} "
                        f"(bracket {tg.lo:.4g}..{tg.hi:.4g}; δ error there {tg.delta_err_mean:.4f} "
                        f"± {tg.delta_err_sem:.4f})"
                    )
                else:
                    console.print(f"target: not reached; σ* > {tg.lower_bound:.4g}")

    run.emit(payload, human)
