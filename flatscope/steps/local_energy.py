"""The ``local_energy`` step: δE(σ) of the loss and the error rate under weight noise, stored as
``/local_energy`` (:mod:`flatscope.analyses.local_energy`)."""

from __future__ import annotations

import math

from ..errors import FlatscopeError

GROUP = "local_energy"


def whole(text, name: str, least: int) -> int:
    """A whole number of at least ``least`` given as text (``--samples``, ``--chunk``)."""
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


def target_epsilon(text) -> float | None:
    if text is None:
        return None
    try:
        eps = float(text)
    except ValueError:
        raise FlatscopeError(f"--target-error {text!r} is not a number") from None
    if not (0 < eps <= 1):
        raise FlatscopeError(f"--target-error must be in (0, 1] (a rise of the error rate), got {text}")
    return eps


def check(params: dict) -> dict:
    """The σ grid, draw count, chunk and target, parsed (no data needed)."""
    from ..analyses.local_energy import parse_sigmas

    return {
        "sigmas": parse_sigmas(params["sigma_spec"]),
        "samples": whole(params["samples"], "--samples", 2),
        "chunk": whole(params["chunk"], "--chunk", 1),
        "target_error": target_epsilon(params["target_error"]),
    }


def compute(run, *, sigma_spec, samples, noise, params, bn, target_error, batched, chunk, parallel):
    """Run the analysis on ``run``'s splits and store ``/local_energy``; returns ``(result, objectives, bn)``."""
    from ..analyses.local_energy import choose_batched, local_energy
    from ..parallel import objectives as split_objectives
    from ..safe_files import check_allocation

    parsed = check(dict(sigma_spec=sigma_spec, samples=samples, chunk=chunk, target_error=target_error))
    sigmas, n, chunk_n, eps = parsed["sigmas"], parsed["samples"], parsed["chunk"], parsed["target_error"]
    check_allocation(f"--samples {n} at {len(sigmas)} σ", n * len(sigmas) * 8)
    choose_batched(batched, run.device, bn)  # fail on --batched on with --bn recompute before any work
    objs = split_objectives(run, parallel)
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
        from ..estimate import Estimated, estimate_local_energy

        raise Estimated(
            estimate_local_energy(
                objs, sigmas=sigmas, samples=n, bn_recompute=bn == "recompute", target=eps is not None, seed=run.seed
            )
        )
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
    run.save(GROUP, res.to_tree(), kind="local_energy", summary=res.summary(), options=options)
    return res, objs, bn


# ------------------------------------------------------------------------------------------ audit
def group(step) -> str:
    return GROUP


def validate(step) -> None:
    check(step.params)


def expected(step, target) -> dict:
    p = step.params
    parsed = check(p)
    bn = p["bn"]
    if bn == "recompute" and not target.has_batchnorm:
        bn = "eval"  # compute() does the same (with a warning)
    return {
        "sigma": parsed["sigmas"].tolist(),
        "samples": parsed["samples"],
        "noise": p["noise"],
        "params": p["params"],
        "bn": bn,
        "target_error": parsed["target_error"],
    }


def normalize(stored: dict) -> dict:
    from ..analyses.local_energy import parse_sigmas

    out = dict(stored)
    try:
        out["sigma"] = parse_sigmas(stored.get("sigma")).tolist()  # type: ignore[arg-type]  # None: refused
    except FlatscopeError:
        out["sigma"] = None
    return out


def complete(g) -> str | None:
    return None


def metric_keys(step) -> list:
    import numpy as np

    from ..analyses.local_energy import LocalEnergyResult, SplitCurve, TargetSigma

    curves = {}
    for s in step.splits:
        c = SplitCurve(s, 0.0, 0.0, np.zeros((1, 2)), np.zeros((1, 2)))
        if step.params["target_error"] is not None:
            c.target = TargetSigma(0.0, math.nan, False, 0.0, 0.0, 0.0, math.nan, math.nan, 0, 0)
        curves[s] = c
    res = LocalEnergyResult(
        sigma=np.array([1.0]),
        samples=2,
        noise="",
        params="",
        bn="",
        batched=False,
        chunk=1,
        seed=0,
        n_perturbed=0,
        curves=curves,
    )
    return list(res.summary())
