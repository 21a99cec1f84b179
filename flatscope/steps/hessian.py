"""The ``hessian`` step: top/bottom eigenvalues, spectral density, trace and per-layer spectra, stored as
``/hessian`` (:mod:`flatscope.analyses.hessian`)."""

from __future__ import annotations

from ..errors import FlatscopeError

GROUP = "hessian"


def compute(run, **params):
    """Run the analysis on ``run``'s split and store ``/hessian``; returns ``(result, objective)``."""
    from ..analyses.hessian import HVP_MODES, hessian_analysis
    from ..safe_files import check_allocation

    p = params
    if run.split == "both":
        raise FlatscopeError("flatscope hessian analyses one split at a time: use --split train or --split test")
    if run.shard_params and run.hvp_mode == "fd":
        obj = _fsdp_objective(run, p)
        shard = obj.shard
    else:
        obj = run.objective()
        shard = run.param_shard(obj.dim)
    n_local = shard.local_dim if shard is not None else obj.dim  # the vectors this rank holds
    top, bottom, steps, block = p["top"], p["bottom"], p["steps"], p["block_size"]
    for what, n in (
        (f"--probes {p['probes']} x --steps {steps}", max(p["probes"], 0) * max(steps, 0) * 4 * bool(p["density"])),
        (f"--steps {steps}", (max(steps, 0) if p["slq_reorth"] == "full" else 2) * n_local),
        (f"--trace-probes {p['trace_probes']}", max(p["trace_probes"], 0) * n_local),
        (
            f"--top {top} / --bottom {bottom} / --block-size {block}",
            (max(top, 0) + max(bottom, 0) + max(block, 0)) * n_local * 3,
        ),
    ):
        check_allocation(what, n)
    hvp = run.hvp_mode if run.hvp_mode in HVP_MODES else "auto"
    if run.estimate:
        from ..estimate import Estimated, estimate_hessian

        keys = ("top", "bottom", "density", "probes", "steps", "slq_reorth", "trace_probes", "tol", "max_iter")
        keys += ("block_size",)
        est = estimate_hessian(
            obj, hvp=hvp, seed=run.seed, per_layer=p["per_layer"], sigma=p["sigma"], **{k: p[k] for k in keys}
        )
        raise Estimated(est)
    res = hessian_analysis(obj, **p, seed=run.seed, hvp=hvp, progress=run.progress, shard=shard)
    if shard is not None and p["save_eigenvectors"] and res.top is not None:
        res.top.eigenvectors = shard.gather(res.top.eigenvectors)  # whole rows, to be written (by rank 0)
    if getattr(obj, "fsdp", False):
        res.hvp_fd_accuracy = "not measurable under FSDP"
        run.note(
            "--hvp fd accuracy: not measurable under FSDP (no exact Hessian-vector product through a sharded model)"
        )
    elif obj.hvp_mode == "fd":
        rel = obj.fd_accuracy(seed=run.seed)
        res.hvp_fd_rel_error = rel
        run.note(
            "--hvp fd: relative difference from an exact product on a probe over "
            f"{obj.hvp_info.get('fd_probe_samples', 0)} samples: "
            + ("not measurable (no exact product for this model)" if rel is None else f"{rel:.2e}")
        )
    for w in res.warnings:
        run.warn(w)
    options = dict(p, hvp=res.hvp_mode, **({"shard_params": True} if shard is not None else {}))
    if getattr(obj, "fsdp", False):
        options["fsdp"] = True
    stored = res.top is not None and len(res.top.eigenvalues) > 0
    if stored:
        run.save(GROUP, res.to_tree(), kind="hessian", summary=res.summary(), options=options)
    if res.nonfinite:
        where = f"; the stages before it are stored in {run.out_path}" if stored else ""
        raise FlatscopeError(res.nonfinite + where)
    return res, obj


def _fsdp_objective(run, p):
    """``--shard-params --hvp fd``: the model sharded by FSDP2 (:mod:`flatscope.fsdp`); the parts that
    need whole parameter vectors are refused first."""
    for flag, asked in (
        ("--per-layer", p["per_layer"]),
        ("--save-eigenvectors", p["save_eigenvectors"]),
        ("--estimate", run.estimate),
    ):
        if asked:
            raise FlatscopeError(
                f"{flag} does not run with --shard-params --hvp fd (the model is sharded by FSDP2 and no rank "
                f"holds a whole parameter vector): drop {flag}, or use --hvp exact to keep the model whole"
            )
    from ..fsdp import FSDPObjective

    return FSDPObjective(
        run.checkpoint.model,
        data=run.split_source(run.splits()[0]),
        loss=run.loss,
        output=run.output_key,
        batch_size=run.batch_size,
        device=run.device,
        dtype=run.dtype,
        memory_budget=run.memory_budget,
        basis_device=run.basis_device,
    )


# ------------------------------------------------------------------------------------------ audit
def group(step) -> str:
    return one_split(step, GROUP)


def one_split(step, name: str) -> str:
    if len(step.splits) != 1:
        raise FlatscopeError(
            f"suite step {name} analyses one split: set split = \"train\" or \"test\" in its "
            f"table (e.g. --set {name}.split=train)"
        )
    return name


def validate(step) -> None:
    """Nothing to check without data: the option types (click's, or the audit's conversion) did it."""


def expected(step, target) -> dict:
    from ..options import HESSIAN

    how = {o.name for o in HESSIAN if not o.result}  # e.g. max_basis: restarts cost products, not accuracy
    return {k: v for k, v in step.params.items() if k not in how}


def complete(g) -> str | None:
    if "nonfinite" in g.attrs:
        return "the stored run stopped at a non-finite Hessian-vector product"
    if "eigenvalues" not in g:
        return "the stored group has no eigenvalues"
    return None


def metric_keys(step) -> list:
    from ..analyses.hessian import HessianResult

    return list(HessianResult(dim=0, n_samples=0, k=1, top=None).summary())
