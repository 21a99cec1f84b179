"""The ``sharpness`` step: worst-case and average-case (adaptive) sharpness over a ρ grid, stored as
``/sharpness`` (:mod:`flatscope.analyses.sharpness`)."""

from __future__ import annotations

from ..errors import FlatscopeError

GROUP = "sharpness"


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
    """The options as :func:`flatscope.analyses.sharpness.sharpness` takes them (checked)."""
    from ..analyses.sharpness import check_options, parse_rhos

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


def compute(run, *, rho_spec, norm, adaptive, eta, steps, step_size, restarts, m, average, samples, params):
    """Run the analysis on ``run``'s splits and store ``/sharpness``; returns ``(result, parsed options, k)``
    (``k``: the sub-batches of the smallest split under m-sharpness)."""
    from ..analyses.sharpness import sharpness

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
        from ..estimate import Estimated, estimate_sharpness

        raise Estimated(
            estimate_sharpness(
                objs,
                n_rho=len(opts["rhos"]),
                steps=opts["steps"],
                restarts=opts["restarts"],
                samples=opts["samples"],
                m=opts["m"],
                seed=run.seed,
            )
        )
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
    return res, opts, k


# ------------------------------------------------------------------------------------------ audit
def _parse(step) -> dict:
    p = step.params
    return parse_options(
        p["rho_spec"],
        p["steps"],
        p["step_size"],
        p["restarts"],
        p["eta"],
        p["samples"],
        p["m"],
        p["norm"],
        p["average"],
    )


def group(step) -> str:
    return GROUP


def validate(step) -> None:
    _parse(step)


def expected(step, target) -> dict:
    o = _parse(step)
    p = step.params
    return {
        "rho": o["rhos"].tolist(),
        "norm": p["norm"],
        "adaptive": bool(p["adaptive"]),
        "eta": o["eta"],
        "steps": o["steps"],
        "step_size": o["step_size"],
        "restarts": o["restarts"],
        "m": o["m"],
        "average": p["average"],
        "samples": o["samples"],
        "params": p["params"],
    }


def normalize(stored: dict) -> dict:
    from ..analyses.sharpness import parse_rhos

    out = dict(stored)
    try:
        out["rho"] = parse_rhos(str(stored.get("rho"))).tolist()
    except FlatscopeError:
        out["rho"] = None
    return out


def complete(g) -> str | None:
    return None


def metric_keys(step) -> list:
    from ..analyses.sharpness import summary_keys

    return summary_keys(step.splits)
