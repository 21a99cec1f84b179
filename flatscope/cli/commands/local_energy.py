"""``flatscope local-energy``: δE(σ) perturbation curves with error bars."""

from __future__ import annotations

import click

from ...analyses.local_energy import (
    BATCHED,
    BN_MODES,
    DEFAULT_SIGMA,
    NOISES,
    choose_batched,
    local_energy,
    parse_sigmas,
)
from ...errors import FlatscopeError
from ...safe_files import check_allocation
from ..common import analysis_options, estimate_option, pass_run
from ..parallel import objectives, parallel_option


@click.command("local-energy")
@click.option(
    "--sigma",
    "sigma_spec",
    default=DEFAULT_SIGMA,
    show_default=True,
    metavar="SPEC",
    help="Noise scales: a..b (10 log-spaced), a..b:N, a..b:N:lin|log, or a comma list "
    "(items may be ranges), e.g. 0.05,0.1,0.2.",
)
@click.option(
    "--samples",
    default="32",
    show_default=True,
    metavar="N",
    help="Noise draws per σ (at least 2); the same draws are used at every σ and on every split.",
)
@click.option(
    "--noise",
    type=click.Choice(NOISES),
    default="multiplicative",
    show_default=True,
    help="w + σ z⊙w (multiplicative), w + σ z (additive), or filter-normalized z (Li et al.; "
    "1-D tensors count as one filter).",
)
@click.option(
    "--params",
    default="all",
    show_default=True,
    metavar="all|weights|REGEX",
    help="Which parameters get noise: all, weights (tensors of 2+ dims: no biases, no BN), "
    "or a regex on parameter names.",
)
@click.option(
    "--bn",
    type=click.Choice(BN_MODES),
    default="eval",
    show_default=True,
    help="BatchNorm: keep the running statistics (eval), or recompute them on the training "
    "inputs at every perturbed point (recompute).",
)
@click.option(
    "--target-error",
    "--target",
    "target_error",
    default=None,
    metavar="EPS",
    help="Also find the σ at which the mean error rate has risen by EPS (in (0, 1]), by bisection on the same draws; "
    "with --metric, the σ at which the metric has fallen by EPS (the error is 1 - metric).",
)
@click.option(
    "--batched",
    type=click.Choice(BATCHED),
    default="auto",
    show_default=True,
    help="Evaluate draws in one vmapped call (on) or one at a time (off); auto: batched on "
    "CUDA, one at a time on CPU (faster there, see benchmarks/RESULTS.md).",
)
@click.option(
    "--chunk",
    default="16",
    show_default=True,
    metavar="N",
    help="Draws per vmapped call when batched (memory grows with N); under --parallel points "
    "the unit dealt to the ranks.",
)
@parallel_option("noise draws")
@analysis_options
@estimate_option
@pass_run
def command(run, sigma_spec, samples, noise, params, bn, target_error, batched, chunk, parallel):
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
    sigmas = parse_sigmas(sigma_spec)
    n = _whole(samples, "--samples", 2)
    chunk_n = _whole(chunk, "--chunk", 1)
    check_allocation(f"--samples {n} at {len(sigmas)} σ", n * len(sigmas) * 8)
    eps = None
    if target_error is not None:
        try:
            eps = float(target_error)
        except ValueError:
            raise FlatscopeError(f"--target-error {target_error!r} is not a number") from None
        if not (0 < eps <= 1):
            raise FlatscopeError(f"--target-error must be in (0, 1] (a rise of the error rate), got {target_error}")
    choose_batched(batched, run.device, bn)  # fail on --batched on with --bn recompute before any work
    objs = objectives(run, parallel)
    first = next(iter(objs.values()))
    first.layout.mask(params)  # fail on a bad regex before any work
    bn_data = None
    if bn == "recompute":
        if first.has_batchnorm():
            bn_data = run.split_source("train")
        else:
            run.warn("the model has no BatchNorm layers; --bn recompute changes nothing")
            bn = "eval"
    if run.estimate:
        from ...estimate import estimate_local_energy

        est = estimate_local_energy(
            objs, sigmas=sigmas, samples=n, bn_recompute=bn == "recompute", target=eps is not None, seed=run.seed
        )
        return run.emit_estimate(est)
    total = len(sigmas) * n * len(objs) + (12 * n * len(objs) if eps is not None else 0)
    with run.progress(total, "local energy") as advance:
        res = local_energy(
            objs,
            sigmas,
            samples=n,
            noise=noise,
            params=params,
            bn=bn,
            bn_data=bn_data,
            target_error=eps,
            batched=batched,
            chunk=chunk_n,
            seed=run.seed,
            progress=advance,
            parallel=parallel,
        )
    for split, c in res.curves.items():
        if c.target is not None and not c.target.reached:
            run.warn(
                f"{split}: the error rate never rose by {eps:g} up to σ = {c.target.lower_bound:.4g}; "
                "target_sigma is null (widen --sigma)"
            )
    options = {
        "sigma": sigma_spec,
        "samples": n,
        "noise": noise,
        "params": params,
        "bn": bn,
        "target_error": eps,
        "batched": batched,
        "chunk": chunk_n,
        "parallel": parallel,
    }
    run.save("local_energy", res.to_tree(), kind="local_energy", summary=res.summary(), options=options)
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


def _whole(text: str, name: str, least: int) -> int:
    try:
        if not str(text).strip().isascii():
            raise ValueError
        value = int(str(text).strip())
    except ValueError:
        raise FlatscopeError(f"{name} must be a whole number, got {text!r}") from None
    if value < least:
        extra = " (the standard error needs two draws)" if name == "--samples" else ""
        raise FlatscopeError(f"{name} must be at least {least}{extra}, got {value}")
    return value
