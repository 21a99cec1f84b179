"""``flatscope local-entropy``: the local entropy landscape F(gamma) of a checkpoint by Langevin sampling."""

from __future__ import annotations

import math

import click
import torch

from ...analyses.local_entropy import FULL_BATCH_MAX_SAMPLES, default_minibatch, local_entropy, parse_gamma
from ...errors import FlatscopeError
from ...safe_files import check_allocation
from ...samplers import ObjectivePotential, power_lambda_max
from ..common import analysis_options, estimate_option, pass_run


def parse_step(spec: str) -> tuple[float | None, float | None]:
    """``auto`` | ``auto:C`` (eta = C / (lambda_max + gamma)) | ``ETA`` -> (step_size, step_fraction)."""
    s = str(spec).strip().lower()
    if s == "auto":
        return None, None
    if s.startswith("auto:"):
        try:
            c = float(s[5:])
        except ValueError:
            raise FlatscopeError(f"--step-size: {spec!r} is not auto, auto:C or a number") from None
        if not (math.isfinite(c) and c > 0):
            raise FlatscopeError(f"--step-size: the fraction C in auto:C must be positive, got {c}")
        return None, c
    try:
        eta = float(s)
    except ValueError:
        raise FlatscopeError(f"--step-size: {spec!r} is not auto, auto:C or a number") from None
    if not (math.isfinite(eta) and eta > 0):
        raise FlatscopeError(f"--step-size must be positive, got {eta}")
    return eta, None


def parse_minibatch(spec: str) -> int | None:
    s = str(spec).strip().lower()
    if s in ("full", "0", "none"):
        return None
    try:
        m = int(s)
    except ValueError:
        raise FlatscopeError(f"--minibatch: {spec!r} is not a positive integer or 'full'") from None
    if m < 1:
        raise FlatscopeError(f"--minibatch must be at least 1 (or 'full'), got {m}")
    return m


def parse_beta(spec: str) -> float | None:
    s = str(spec).strip().lower()
    if s == "auto":
        return None
    try:
        b = float(s)
    except ValueError:
        raise FlatscopeError(f"--beta: {spec!r} is not a number or 'auto'") from None
    if not (math.isfinite(b) and b > 0):
        raise FlatscopeError(f"--beta must be positive and finite, got {spec}")
    return b


@click.command("local-entropy")
@analysis_options
@click.option(
    "--gamma",
    "gamma_spec",
    default="0.1x..100x:7",
    show_default=True,
    metavar="GRID",
    help="Couplings gamma (the scope is 1/gamma): A..B:K (K log-spaced values), a,b,c, or one value; "
    "an x suffix means times lambda_max (e.g. 0.1x..100x:7).",
)
@click.option(
    "--beta",
    "beta_spec",
    default="auto",
    show_default=True,
    metavar="auto|FLOAT",
    help="Inverse temperature; auto = the number of samples N of the split (exp(-N L) is the likelihood "
    "under cross-entropy). Entropy-SGD's noise eps=1e-4 is beta = 2/eps^2 = 2e8.",
)
@click.option(
    "--sampler",
    type=click.Choice(["sgld", "mala"]),
    default="sgld",
    show_default=True,
    help="sgld: Langevin (Entropy-SGD's inner loop; full-batch or minibatch gradients, see --minibatch); "
    "mala: full batch, "
    "Metropolis-adjusted (exact; small models).",
)
@click.option(
    "--integrator",
    type=click.Choice(["lm", "euler"]),
    default="lm",
    show_default=True,
    help="SGLD noise: lm = sqrt(2 eta/beta)(xi_t + xi_t+1)/2 (Leimkuhler-Matthews: exact variance on "
    "quadratics, same cost); euler = sqrt(2 eta/beta) xi_t (Welling & Teh, Entropy-SGD).",
)
@click.option("--steps", type=int, default=1000, show_default=True, help="Kept sampling steps per gamma and chain.")
@click.option("--burn-in", type=int, default=200, show_default=True, help="Discarded steps per gamma before --steps.")
@click.option(
    "--thin",
    type=int,
    default=10,
    show_default=True,
    help="Store every THIN-th step in the traces (averages use every kept step).",
)
@click.option(
    "--chains",
    type=int,
    default=8,
    show_default=True,
    help="Independent chains (batched with vmap); standard errors come from their spread.",
)
@click.option(
    "--step-size",
    "step_spec",
    default="auto",
    show_default=True,
    metavar="auto|auto:C|ETA",
    help="Langevin step eta (learning-rate units); auto = C/(lambda_max + gamma) with C = 0.25 for sgld "
    "(0.1 with --integrator euler), adapted in burn-in to acceptance 0.574 for mala.",
)
@click.option(
    "--minibatch",
    "minibatch_spec",
    default=None,
    metavar="M|full",
    help="SGLD minibatch size (drawn with replacement per chain and step); full = full batch [default: "
    f"full for splits of at most {FULL_BATCH_MAX_SAMPLES} samples, else 64]. With a minibatch, half "
    "the chains use M and half 2M: the minibatch bias is estimated from the two and folded into "
    "the errors. MALA always uses the full batch.",
)
@click.option(
    "--is-samples",
    type=int,
    default=256,
    show_default=True,
    help="Importance-sampling draws per gamma for the gradient-free cross-check (0: off).",
)
@click.option(
    "--lambda-max",
    type=float,
    default=None,
    metavar="FLOAT",
    help="Top Hessian eigenvalue for the step rule and x-relative grids (default: 20 power iterations).",
)
@click.option(
    "--warm-start",
    type=click.Choice(["previous", "center"]),
    default="previous",
    show_default=True,
    help="previous: chains continue from the next larger gamma (widened by the extra prior variance); "
    "center: fresh draws from N(w, I/(beta gamma)).",
)
@click.option(
    "--chain-mode",
    type=click.Choice(["auto", "vmap", "loop"]),
    default="auto",
    show_default=True,
    help="How chains share a step: vmap (one batched call) or loop; auto = vmap for >= 8 chains with "
    "small per-chain calls (rows x parameters <= 2e6), loop otherwise (measured faster there).",
)
@estimate_option
@pass_run
def command(
    run,
    gamma_spec,
    beta_spec,
    sampler,
    integrator,
    steps,
    burn_in,
    thin,
    chains,
    step_spec,
    minibatch_spec,
    is_samples,
    lambda_max,
    warm_start,
    chain_mode,
):
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
    grid, relative = parse_gamma(gamma_spec)
    beta = parse_beta(beta_spec)
    step_size, step_fraction = parse_step(step_spec)
    minibatch = parse_minibatch(minibatch_spec) if minibatch_spec is not None else None
    if sampler == "mala":
        if minibatch_spec is not None and parse_minibatch(minibatch_spec) is not None:
            raise FlatscopeError("MALA needs full-batch gradients to be exact; drop --minibatch or use --sampler sgld")
        minibatch = None
    for name, value, low in (
        ("--steps", steps, 1),
        ("--chains", chains, 1),
        ("--thin", thin, 1),
        ("--burn-in", burn_in, 0),
        ("--is-samples", is_samples, 0),
    ):
        if value < low:
            raise FlatscopeError(f"{name} must be at least {low}, got {value}")
    if lambda_max is not None and not (math.isfinite(lambda_max) and lambda_max >= 0):
        raise FlatscopeError(f"--lambda-max must be non-negative, got {lambda_max}")

    results = {}
    for split in run.splits():
        obj = run.objective(split)
        check_allocation(f"--chains {chains}", chains * obj.dim * 6)
        check_allocation(f"--is-samples {is_samples}", is_samples * obj.dim * 2)
        if minibatch_spec is None and sampler == "sgld":
            minibatch = default_minibatch(obj.n)
        if minibatch is not None and minibatch > obj.n:
            raise FlatscopeError(f"--minibatch {minibatch} exceeds the {obj.n} samples of the {split} split")
        lam = lambda_max
        if run.estimate:
            from ...estimate import estimate_local_entropy

            est = estimate_local_entropy(
                obj,
                n_gammas=len(grid),
                steps=steps,
                burn_in=burn_in,
                chains=chains,
                minibatch=minibatch,
                is_samples=is_samples,
                lambda_given=lambda_max is not None,
                n_splits=len(run.splits()),
                seed=run.seed,
            )
            return run.emit_estimate(est)
        if lam is None:
            pot = ObjectivePotential(obj)
            lam = power_lambda_max(
                pot.hvp_at(obj.w0), obj.dim, iters=20, dtype=obj.dtype, device=obj.device, generator=run.generator(1)
            )
        if relative and lam <= 0:
            raise FlatscopeError(
                "--gamma is relative to lambda_max (x suffix) but lambda_max is 0; give absolute values"
            )
        gammas = grid * lam if relative else grid
        gen = (
            run.generator(2)
            if obj.device.type == "cpu"
            else torch.Generator(device=obj.device).manual_seed(run.seed + 2)
        )
        total = len(gammas) * (burn_in + steps)
        with run.progress(total, f"local-entropy {split}") as advance:
            res = local_entropy(
                obj,
                gammas,
                beta=beta,
                sampler=sampler,
                steps=steps,
                burn_in=burn_in,
                thin=thin,
                chains=chains,
                step_size=step_size,
                step_fraction=step_fraction,
                minibatch=minibatch,
                is_samples=is_samples,
                lambda_max=lam,
                warm_start=warm_start,
                chain_mode=chain_mode,
                seed=run.seed,
                device_generator=gen,
                progress=advance,
                integrator=integrator,
            )
        res.lambda_max_source = "given" if lambda_max is not None else "power iteration (20 steps)"
        for w in res.warnings:
            run.warn(f"[{split}] {w}" if len(run.splits()) > 1 else w)
        results[split] = res

    options = {
        "gamma": gamma_spec,
        "beta": beta_spec,
        "sampler": sampler,
        "integrator": integrator,
        "steps": steps,
        "burn_in": burn_in,
        "thin": thin,
        "chains": chains,
        "step_size": step_spec,
        "minibatch": minibatch or "full",
        "is_samples": is_samples,
        "lambda_max": lambda_max,
        "warm_start": warm_start,
        "chain_mode": chain_mode,
    }
    groups = {}
    for split, res in results.items():
        name = "local_entropy" if len(results) == 1 else f"local_entropy/{split}"
        run.save(name, res.to_tree(), kind="local_entropy", summary=res.summary(), options=options)
        groups[split] = name
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
