"""``flatscope local-entropy``: the local entropy landscape F(gamma) of a checkpoint by Langevin sampling."""

from __future__ import annotations

import click

from ...options import LOCAL_ENTROPY
from ..common import analysis_options, estimate_option, pass_run
from ..schema import schema_options


@click.command("local-entropy")
@analysis_options
@schema_options(LOCAL_ENTROPY)
@estimate_option
@pass_run
def command(run, **options):
    """Estimate the local entropy F(gamma) around a checkpoint, with <L>, <|w'-w|^2> and grad F.

    Samples q(w'|w) ~ exp(-beta L(w') - beta gamma/2 |w'-w|^2) with SGLD or MALA chains at each
    coupling gamma, from the largest down, and integrates dF/dlog(gamma) = -<(w'-w).grad L(w')>/2
    from gamma_max (where F ~ L(w)) to get F(gamma) = -(1/beta) log E_{N(w, 1/(beta gamma))} exp(-beta L)
    with an error bar (chains + quadrature + tail). Importance sampling from the Gaussian is a
    gradient-free cross-check.

    \b
    Examples:
      flatscope local-entropy ckpt.pt --gamma 1e-3..1e1:8
      flatscope local-entropy ckpt.pt --gamma 0.1 --steps 2000 --chains 4 --beta 1e4
      flatscope local-entropy ckpt.pt --sampler mala --minibatch full --gamma 0.1x..100x:7
      flatscope local-entropy ckpt.pt --json
    """
    from ...steps.local_entropy import compute

    results, groups = compute(run, **options)
    plots = []
    for name in groups.values():
        plots += run.plot(name)

    if len(results) == 1:
        ((split, res),) = results.items()
        payload = dict(res.to_json(), split=split, results=run.out_path, plots=plots)
    else:
        payload = {s: dict(r.to_json(), split=s) for s, r in results.items()}
        payload.update(results=run.out_path, plots=plots)

    def human(console):
        from rich.markup import escape

        for split, res in results.items():
            p = res.per_gamma
            console.print(
                f"[bold]local entropy[/bold] ({split}, {res.sampler}, beta={res.beta:.4g}, "
                f"{res.chains} chains x {res.steps} steps + {res.burn_in} burn-in, n={res.n_params})  "
                f"L(w)={res.center_loss:.5g}  lambda_max={res.lambda_max:.4g}"
            )
            head = (
                f"{'gamma':>9}  {'F(gamma)':>21}  {'<L>_q':>21}  {'<|w-w0|^2>_q':>19}  {'|grad F|':>8}  "
                f"{'R-hat':>5}  {'ESS':>6}"
            )
            if res.sampler == "mala":
                head += f"  {'accept':>6}"
            if res.importance:
                head += f"  {'F by IS':>21} {'IS ESS':>6}"
            if res.minibatch:
                head += "  minibatch bias"
            console.print(escape(head), highlight=False)
            for k, g in enumerate(res.gamma):
                row = (
                    f"{g:9.4g}  {p['local_entropy'][k]:10.5g} ± {p['local_entropy_err'][k]:<8.2g}  "
                    f"{p['mean_loss'][k]:10.5g} ± {p['mean_loss_err'][k]:<8.2g}  "
                    f"{p['mean_sq_dist'][k]:9.4g} ± {p['mean_sq_dist_err'][k]:<7.2g}  {p['grad_norm'][k]:8.3g}  "
                    f"{p['rhat'][k]:5.3f}  {p['ess'][k]:6.0f}"
                )
                if res.sampler == "mala":
                    row += f"  {p['accept_rate'][k]:6.3f}"
                if res.importance:
                    imp = res.importance
                    row += (
                        f"  {imp['local_entropy'][k]:10.5g} ± {imp['local_entropy_err'][k]:<8.2g} {imp['ess'][k]:6.0f}"
                    )
                if res.minibatch:
                    row += "  ! > s.e." if p["minibatch_biased"][k] else "  ok"
                console.print(escape(row), highlight=False)
            console.print(
                f"F(gamma_max) from {res.anchor}; asymptotic tail L + m/2 = {res.center_loss + float(p['tail']):.6g}",
                highlight=False,
            )
            if res.minibatch:
                console.print(
                    f"minibatch {res.minibatch} (half the chains) and {2 * res.minibatch} (the other half): "
                    "errors include the estimated minibatch bias; '!' marks gammas where that bias "
                    "exceeds the standard error",
                    highlight=False,
                )
        console.print(f"results: {run.out_path}", highlight=False)

    run.emit(payload, human)
