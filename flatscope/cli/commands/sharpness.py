"""``flatscope sharpness``: worst-case and average-case (adaptive) sharpness over a ρ grid."""

from __future__ import annotations

import click

from ...analyses.sharpness import (
    AVERAGES,
    DEFAULT_RHO,
    NORMS,
    check_options,
    parse_rhos,
    sharpness,
)
from ...errors import FlatscopeError
from ..common import analysis_options, estimate_option, pass_run


def _number(text, name: str) -> float:
    try:
        return float(str(text).strip())
    except ValueError:
        raise FlatscopeError(f"{name} must be a number, got {text!r}") from None


def _whole(text, name: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise FlatscopeError(f"{name} must be a whole number, got {text!r}") from None


def parse_options(rho_spec, steps, step_size, restarts, eta, samples, m, norm, average) -> dict:
    """The command's options as :func:`flatscope.analyses.sharpness.sharpness` takes them (checked)."""
    out = {
        "rhos": parse_rhos(rho_spec),
        "steps": _whole(steps, "--steps"),
        "step_size": _number(step_size, "--step-size"),
        "restarts": _whole(restarts, "--restarts"),
        "eta": _number(eta, "--eta"),
        "samples": _whole(samples, "--samples"),
        "m": None if m is None else _whole(m, "--m"),
    }
    check_options(
        norm=norm,
        steps=out["steps"],
        step_size=out["step_size"],
        restarts=out["restarts"],
        eta=out["eta"],
        average=average,
        samples=out["samples"],
        m=out["m"],
    )
    return out


@click.command("sharpness")
@click.option(
    "--rho",
    "rho_spec",
    default=DEFAULT_RHO,
    show_default=True,
    metavar="SPEC",
    help="Radii ρ > 0: a..b (10 log-spaced), a..b:N, a..b:N:lin|log, or a comma list, e.g. 0.05,0.1.",
)
@click.option(
    "--norm",
    type=click.Choice(NORMS),
    default="l2",
    show_default=True,
    help="The ball: ‖δ ⊘ c‖₂ ≤ ρ (l2) or ‖δ ⊘ c‖∞ ≤ ρ (linf).",
)
@click.option(
    "--adaptive/--no-adaptive",
    default=True,
    show_default=True,
    help="Scale the ball elementwise by c = |w| + η (adaptive, invariant to layer rescaling) or not (c = 1).",
)
@click.option(
    "--eta",
    default="0",
    show_default=True,
    metavar="ETA",
    help="η in c = |w| + η (adaptive only); 0 as in Andriushchenko et al. 2023, 0.01 is ASAM's ball.",
)
@click.option(
    "--steps",
    default="20",
    show_default=True,
    metavar="N",
    help="Projected gradient-ascent steps per restart (one gradient over the data each).",
)
@click.option(
    "--step-size",
    default="1",
    show_default=True,
    metavar="A",
    help="First ascent step, as a fraction of ρ; halved whenever a step does not raise the loss.",
)
@click.option(
    "--restarts",
    default="1",
    show_default=True,
    metavar="R",
    help="Ascents per ρ: the first from δ = 0, the others from seeded random points of the ball.",
)
@click.option(
    "--m",
    "m",
    default=None,
    metavar="M",
    help="m-sharpness: the mean over disjoint sub-batches of M samples of each one's worst case.",
)
@click.option(
    "--average",
    type=click.Choice(AVERAGES),
    default="surface",
    show_default=True,
    help="Average case over the ball's surface (uniform) or a Gaussian of the same second moment.",
)
@click.option(
    "--samples",
    default="16",
    show_default=True,
    metavar="N",
    help="Average-case draws (0: skip the average case); the same draws at every ρ.",
)
@click.option(
    "--params",
    default="all",
    show_default=True,
    metavar="all|weights|REGEX",
    help="Which parameters may move: all, weights (tensors of 2+ dims), or a regex on names.",
)
@analysis_options
@estimate_option
@pass_run
def command(run, rho_spec, norm, adaptive, eta, steps, step_size, restarts, m, average, samples, params):
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
    opts = parse_options(rho_spec, steps, step_size, restarts, eta, samples, m, norm, average)
    objs = {s: run.objective(s) for s in run.splits()}
    first = next(iter(objs.values()))
    first.layout.mask(params)  # fail on a bad regex before any work
    k = 1
    if opts["m"] is not None:
        for name, o in objs.items():
            if opts["m"] > o.n:
                raise FlatscopeError(f"--m {opts['m']} is larger than the {name} split ({o.n} samples)")
        k = min(o.n // opts["m"] for o in objs.values())
    if run.estimate:
        from ...estimate import estimate_sharpness

        est = estimate_sharpness(
            objs,
            n_rho=len(opts["rhos"]),
            steps=opts["steps"],
            restarts=opts["restarts"],
            samples=opts["samples"],
            m=opts["m"],
            seed=run.seed,
        )
        return run.emit_estimate(est)
    total = sum(len(opts["rhos"]) * ((o.n // opts["m"]) if opts["m"] else 1) + opts["samples"] for o in objs.values())
    # --metric pkg.module:fn: the average case averages the metric, and its change is reported at each
    # worst-case point (Objective.evaluate returns the metric in place of accuracy)
    value_fn = {s: (lambda w, o=o: o.evaluate(w)[1]) for s, o in objs.items()} if run.metric is not None else None
    with run.progress(total, "sharpness") as advance:
        res = sharpness(
            objs,
            opts["rhos"],
            norm=norm,
            adaptive=adaptive,
            eta=opts["eta"],
            params=params,
            steps=opts["steps"],
            step_size=opts["step_size"],
            restarts=opts["restarts"],
            m=opts["m"],
            average=average,
            samples=opts["samples"],
            seed=run.seed,
            value_fn=value_fn,
            progress=advance,
        )
    options = {
        "rho": rho_spec,
        "norm": norm,
        "adaptive": adaptive,
        "eta": opts["eta"],
        "steps": opts["steps"],
        "step_size": opts["step_size"],
        "restarts": opts["restarts"],
        "m": opts["m"],
        "average": average,
        "samples": opts["samples"],
        "params": params,
    }
    run.save("sharpness", res.to_tree(), kind="sharpness", summary=res.summary(), options=options)
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
