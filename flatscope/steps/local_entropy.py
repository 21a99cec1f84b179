"""The ``local_entropy`` step: the local entropy F(γ) by Langevin sampling, stored as ``/local_entropy``
(one split) or ``/local_entropy/<split>`` (:mod:`flatscope.analyses.local_entropy`)."""

from __future__ import annotations

import math

from ..errors import FlatscopeError


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


def check(params: dict) -> dict:
    """The γ grid, β, step size and minibatch, parsed (no data needed)."""
    from ..analyses.local_entropy import parse_gamma

    spec = params.get("minibatch_spec")
    return {
        "gamma": parse_gamma(str(params["gamma_spec"])),
        "beta": parse_beta(str(params["beta_spec"])),
        "step": parse_step(str(params["step_spec"])),
        "minibatch": parse_minibatch(spec) if spec is not None else None,
    }


def compute(
    run,
    *,
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
    """Sample each split of ``run`` and store its group; returns ``{split: result}`` and ``{split: group}``."""
    import torch

    from ..analyses.local_entropy import default_minibatch, local_entropy, parse_gamma
    from ..safe_files import check_allocation
    from ..samplers import ObjectivePotential, power_lambda_max

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
            from ..estimate import Estimated, estimate_local_entropy

            raise Estimated(
                estimate_local_entropy(
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
            )
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
    return results, groups


# ------------------------------------------------------------------------------------------ audit
def group(step) -> str:
    from .hessian import one_split

    return one_split(step, "local_entropy")


def validate(step) -> None:
    check(step.params)


def normalize(opts: dict) -> dict:
    """Stored (or wanted) options in a comparable form: the γ grid, β and step size parsed."""
    from ..analyses.local_entropy import parse_gamma

    out = dict(opts)
    try:
        grid, relative = parse_gamma(str(opts.get("gamma")))
        out["gamma"] = [grid.tolist(), relative]
        out["beta"] = parse_beta(str(opts.get("beta")))
        out["step_size"] = list(parse_step(str(opts.get("step_size"))))
    except FlatscopeError:
        out["gamma"] = None
    return out


def expected(step, target) -> dict:
    from ..analyses.local_entropy import default_minibatch

    p = dict(step.params)
    spec = p.pop("minibatch_spec")
    if p["sampler"] == "mala":
        minibatch = None
    elif spec is not None:
        minibatch = parse_minibatch(spec)
    else:  # compute()'s default depends on the split's size
        minibatch = default_minibatch(len(target.run.split_source(step.splits[0])))
    want = {
        "gamma": p.pop("gamma_spec"),
        "beta": p.pop("beta_spec"),
        "step_size": p.pop("step_spec"),
        "minibatch": minibatch or "full",
        **p,
    }
    return normalize(want)


def complete(g) -> str | None:
    return None


def metric_keys(step) -> list:
    import numpy as np

    from ..analyses.local_entropy import LocalEntropyResult

    names = ("local_entropy", "local_entropy_err", "mean_loss", "mean_sq_dist", "grad_norm", "rhat", "ess")
    one = {k: np.zeros(1) for k in names + ("accept_rate",)}
    res = LocalEntropyResult(
        gamma=np.ones(1),
        beta=1.0,
        n_params=1,
        center_loss=0.0,
        center_grad_norm=0.0,
        lambda_max=0.0,
        lambda_max_source="",
        sampler="",
        chains=1,
        steps=1,
        burn_in=0,
        thin=1,
        minibatch=None,
        warm_start="",
        integrator="",
        per_gamma=one,
        vectors={},
        traces={},
        importance=None,
    )
    return list(res.summary())
