"""``flatscope correlate``: which flatness measure predicts the generalization gap across a family of models."""

from __future__ import annotations

import json
import math
import os

import click

from ...lazy import lazy_module
from ...audit import ANALYSES, Step, collect_metrics, load_suite, plan, run_steps
from ...errors import FlatscopeError
from ...measures import flatter, flatter_label
from ..common import Run
from ..schema import shared_analysis_options, suite_options
from .compare import labels_for

store = lazy_module("flatscope.results")  # h5py: imported when the command runs, not for --help
CORRELATE_SCHEMA = "flatscope.correlate/1"
DEFAULT_MEASURES = "hessian.lambda_max,hessian.trace,local_energy.train_target_sigma"


def analysis_for(measure: str):
    """(analysis, landscape name or None) of the analysis whose summary holds ``measure``."""
    head = measure.split(".", 1)[0].replace("-", "_")
    a = ANALYSES.get(head)
    if a is None or "." not in measure:
        raise FlatscopeError(
            f"measure {measure!r}: no analysis produces it; a measure is <analysis>.<summary key> "
            f"with an analysis among {', '.join(ANALYSES)} (e.g. hessian.lambda_max)"
        )
    if a.name == "landscape":
        parts = measure.split(".")
        if len(parts) < 3:
            raise FlatscopeError(
                f"measure {measure!r}: a landscape measure is landscape.<name>.<key>, "
                "e.g. landscape.random-1d.train_loss_max"
            )
        return a, parts[1]
    return a, None


def parse_measures(text: str) -> list[str]:
    names = [m.strip() for m in str(text).split(",") if m.strip()]
    if not names:
        raise FlatscopeError("--measures names no measure")
    if len(set(names)) != len(names):
        raise FlatscopeError("--measures names a measure twice")
    return names


def _quantities(run: Run, splits: list[str]) -> dict:
    out = {}
    for s in splits:
        loss, acc = run.objective(s).evaluate()
        out[f"{s}_loss"], out[f"{s}_acc"], out[f"{s}_error"] = float(loss), float(acc), float(1 - acc)
    return out


@click.command("correlate")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option(
    "--measures",
    default=DEFAULT_MEASURES,
    show_default=True,
    metavar="M1,M2,...",
    help="Metrics <analysis group>.<summary key>, as in flatscope audit (e.g. hessian.trace, "
    "local_energy.train_target_sigma, landscape.random-1d.train_loss_max, sharpness.worst).",
)
@click.option(
    "--gap",
    "gap_text",
    default="test_error-train_error",
    show_default=True,
    metavar="EXPR",
    help="The generalization gap: Q or Q1-Q2 with Q among train_/test_ + error, loss, acc.",
)
@click.option(
    "--axes",
    "axes_text",
    default=None,
    metavar="A1,A2,...",
    help="Hyperparameter axes for the granulated Kendall coefficient (default: every axis of the "
    "training records that varies, except seed).",
)
@click.option(
    "--resamples",
    type=click.IntRange(min=100),
    default=2000,
    show_default=True,
    metavar="B",
    help="Bootstrap resamples of the models for the confidence intervals.",
)
@click.option(
    "--level",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.95,
    show_default=True,
    help="Confidence level of the intervals.",
)
@suite_options(
    suite="Options of the analyses, as for flatscope audit (only the analyses the measures need run).",
    set_example="--set local_energy.samples=32",
    recompute="Recompute every measure, even results already stored.",
)
@click.option(
    "--results-dir",
    default=None,
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Each checkpoint's results in DIR/<label>.flatscope.h5 (default: beside the checkpoint).",
)
@click.option(
    "-o",
    "--out",
    "out",
    default="correlate.h5",
    show_default=True,
    metavar="RESULTS.h5",
    help="Where the /correlate group goes (plots beside it).",
)
@click.option(
    "--plot/--no-plot", default=True, show_default=True, help="Scatter plots of each measure against the gap."
)
@click.option("--plot-format", type=click.Choice(["png", "svg", "pdf"]), default="png", show_default=True)
@click.option("--allow-mixed", is_flag=True, help="Accept checkpoints of different data sets.")
@shared_analysis_options("checkpoint", "out", "plot", "plot_format", "allow_mixed")
def command(
    checkpoints,
    measures,
    gap_text,
    axes_text,
    resamples,
    level,
    suite_path,
    sets,
    recompute,
    results_dir,
    out,
    plot,
    plot_format,
    allow_mixed,
    **shared,
):
    """Rank correlations of flatness measures with the generalization gap across a family of checkpoints.

    Runs (or reads, when each checkpoint's results file already holds them for its sha256 and the
    same options) the analyses the measures need, with the same seed for every checkpoint, so the
    same random probes and noise draws; evaluates the gap on the whole train and test splits; and
    reports per measure Kendall's tau and Spearman's rho with the gap, with percentile bootstrap
    intervals over the models, and Jiang et al.'s (2019) granulated Kendall coefficient psi per
    hyperparameter axis (read from each checkpoint's training record) and their mean Psi.

    A positive tau means a larger measure goes with a larger gap; which direction of a measure
    means flatter is printed beside it. Results: /correlate in -o, scatter plots beside it.

    \b
    Examples:
      flatscope correlate runs/family/*.pt --json
      flatscope correlate runs/family/*.pt --measures hessian.lambda_max,local_energy.train_target_sigma
      flatscope correlate runs/family/*.pt --gap test_loss-train_loss --axes optimizer,lr -o corr.h5
    """
    from ...correlation import axes_of, correlate_measure, gap_value, parse_gap, varying_axes  # scipy: slow

    main_run = Run(**shared)
    main_run.setup()
    paths = [str(p) for p in checkpoints]
    if len(paths) < 3:
        raise FlatscopeError(
            f"correlate needs at least 3 checkpoints (a rank correlation of {len(paths)} models says nothing)"
        )
    if len({os.path.abspath(p) for p in paths}) != len(paths):
        raise FlatscopeError("the same checkpoint is given twice")
    terms = parse_gap(gap_text)
    names = parse_measures(measures)
    needed: dict[str, str | None] = {}
    for m in names:
        a, lname = analysis_for(m)
        if a.name in needed and needed[a.name] != lname:
            raise FlatscopeError(f"measures name two landscapes ({needed[a.name]} and {lname}); use one")
        needed[a.name] = lname
    extra_sets = [f"landscape.name={lname}" for a, lname in needed.items() if a == "landscape" and lname]
    suite = load_suite(suite_path, only=list(needed), sets=list(sets) + extra_sets)
    if results_dir is not None and not os.path.isdir(results_dir):
        raise FlatscopeError(f"--results-dir {results_dir} does not exist")
    store.check_output_path(out)
    labels = labels_for(paths)

    members = []
    for path, label in zip(paths, labels):
        res = os.path.join(results_dir, f"{label}.flatscope.h5") if results_dir else None
        run = Run(checkpoint=path, out=res, plot=False, plot_format="png", **shared)
        run.setup(check_output=True)
        steps = plan([Step(s.analysis, dict(s.options)) for s in suite.steps], run)
        members.append({"label": label, "path": path, "run": run, "steps": steps})
    known = [k for s in members[0]["steps"] for k in s.metrics]
    for m in names:
        if m not in known:
            group = m.rsplit(".", 1)[0]
            same = [k.rsplit(".", 1)[1] for k in known if k.rsplit(".", 1)[0] == group]
            raise FlatscopeError(
                f"measure {m!r}: {group} has no summary key {m.rsplit('.', 1)[1]!r}"
                + (f" (its keys: {', '.join(same)})" if same else "")
            )
    specs = [json.dumps(m["run"].data_spec(), sort_keys=True) for m in members]
    if len(set(specs)) > 1 and not allow_mixed:
        other = next(i for i, s in enumerate(specs) if s != specs[0])
        raise FlatscopeError(
            f"{members[0]['label']} and {members[other]['label']} are of different data sets "
            f"({specs[0]} vs {specs[other]}); a gap across data sets compares unlike things "
            "(pass --allow-mixed to correlate them anyway)"
        )
    splits = sorted({name.split("_", 1)[0] for _, name in terms}, key=["train", "test"].index)
    per_axes = [axes_of(m["run"].checkpoint.train, m["run"].checkpoint.model_spec) for m in members]
    vary = varying_axes(per_axes)
    if axes_text:
        axes = [a.strip() for a in axes_text.split(",") if a.strip()]
        for a in axes:
            if not all(a in p for p in per_axes):
                known_axes = sorted(set.intersection(*(set(p) for p in per_axes)))
                raise FlatscopeError(
                    f"--axes {a!r}: not in every checkpoint's training record "
                    f"(axes there: {', '.join(known_axes) or 'none'})"
                )
    else:
        axes = [a for a in vary if a != "seed"]
    fixed = [a for a in vary if a not in axes]

    # the gap first (cheap; fails on a missing test split before any analysis runs)
    for m in members:
        gap_run = Run(checkpoint=m["path"], **{**shared, "max_samples": None})
        gap_run.setup()
        try:
            m["quantities"] = _quantities(gap_run, splits)
        except FlatscopeError as exc:
            raise FlatscopeError(f"{m['label']}: {exc} (the gap {gap_text} needs it)") from None
        m["gap"] = gap_value(terms, m["quantities"])
        if not math.isfinite(m["gap"]):
            raise FlatscopeError(
                f"{m['label']}: the gap {gap_text} is not a finite number (accuracy is undefined "
                "for regression targets: use a loss gap, e.g. test_loss-train_loss)"
            )
    for m in members:
        m["records"] = run_steps(
            m["steps"], m["run"], recompute=recompute, note=lambda msg, lab=m["label"]: main_run.note(f"[{lab}] {msg}")
        )
        m["metrics"] = collect_metrics(m["steps"], m["records"])
    if not main_run.is_main:
        return

    gaps = [m["gap"] for m in members]
    axis_values = {a: [p.get(a) for p in per_axes] for a in axes + fixed}
    results = []
    for k, name in enumerate(names):
        vals = [m["metrics"].get(name) for m in members]
        vals = [math.nan if v is None else float(v) for v in vals]
        res = correlate_measure(
            name,
            vals,
            gaps,
            {a: axis_values[a] for a in axes},
            fixed={a: axis_values[a] for a in fixed},
            resamples=resamples,
            level=level,
            seed=main_run.seed + k,
            flatter=flatter(name),
        )
        if res.n < 3:
            main_run.warn(f"{name}: only {res.n} checkpoints have a finite value; no correlation")
        results.append(res)

    tree = _tree(members, names, results, axes, fixed, axis_values, gap_text, level)
    summary = {"n_models": len(members)}
    for r in results:
        summary.update(
            {f"{r.measure}.kendall": r.kendall, f"{r.measure}.spearman": r.spearman, f"{r.measure}.Psi": r.Psi}
        )
    options = {
        "measures": names,
        "gap": gap_text,
        "axes": axes,
        "fixed": fixed,
        "resamples": resamples,
        "level": level,
        "max_samples": main_run.max_samples,
        "batch_size": main_run.batch_size,
        "suite": [{"analysis": s.name, "options": s.options} for s in suite.steps],
    }
    with store.update(out) as f:
        store.write_analysis(
            f, "correlate", tree, kind="correlate", summary=summary, options=options, provenance=main_run.provenance()
        )
    main_run.note(f"wrote /correlate to {out}")
    plots = []
    if plot:
        from ...plotting import render_group

        plots = [str(p) for p in render_group(out, "correlate", fmt=plot_format)]
        for p in plots:
            main_run.note(f"wrote {p}")
    payload = {
        "schema": CORRELATE_SCHEMA,
        "results": os.path.abspath(out),
        "gap": gap_text,
        "axes": axes,
        "fixed": fixed,
        "level": level,
        "resamples": resamples,
        "seed": main_run.seed,
        "correlations": [r.to_json() for r in results],
        "checkpoints": [
            {
                "label": m["label"],
                "checkpoint": os.path.abspath(m["path"]),
                "checkpoint_sha256": m["run"].checkpoint.sha256,
                "results": os.path.abspath(m["run"].out_path),
                "axes": per_axes[i],
                "gap": m["gap"],
                "quantities": m["quantities"],
                "measures": {n: m["metrics"].get(n) for n in names},
                "steps": [r.to_json() for r in m["records"]],
            }
            for i, m in enumerate(members)
        ],
        "plots": [os.path.abspath(p) for p in plots],
    }

    def human(console):
        from rich import box
        from rich.table import Table

        pct = f"{100 * level:g}%"
        t = Table(
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            title=f"rank correlation with the gap {gap_text} over {len(members)} checkpoints",
        )
        t.add_column("measure", no_wrap=True)
        t.add_column("flatter", no_wrap=True, min_width=7)
        t.add_column("n", justify="right", no_wrap=True)
        t.add_column(f"Kendall τ [{pct}]", justify="right", no_wrap=True, min_width=24)
        t.add_column(f"Spearman ρ [{pct}]", justify="right", no_wrap=True, min_width=24)
        t.add_column("Ψ", justify="right", no_wrap=True, min_width=6)
        for r in results:
            t.add_row(
                r.measure,
                r.flatter or "-",
                str(r.n),
                _ci(r.kendall, r.kendall_ci),
                _ci(r.spearman, r.spearman_ci),
                _num(r.Psi),
            )
        console.print(t)
        if axes:
            t = Table(
                box=box.SIMPLE_HEAD,
                show_edge=False,
                pad_edge=False,
                title="granulated Kendall ψ per axis (groups of models differing only on it)",
            )
            t.add_column("measure", no_wrap=True)
            for a in axes:
                t.add_column(f"ψ {a}", justify="right", no_wrap=True, min_width=len(a) + 2)
            for r in results:
                t.add_row(r.measure, *[f"{_num(r.psi.get(a))} ({r.psi_groups.get(a, 0)})" for a in axes])
            console.print(t)
        console.print(
            f"axes: {', '.join(axes) or 'none vary'}"
            + (f"; held fixed within ψ groups: {', '.join(fixed)}" if fixed else ""),
            highlight=False,
        )
        console.print(f"results: {out}", highlight=False)

    main_run.emit(payload, human)


def _num(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:+.3f}"


def _ci(v, ci) -> str:
    return f"{_num(v)} [{_num(ci[0])}, {_num(ci[1])}]"


def _tree(members, names, results, axes, fixed, axis_values, gap_text, level) -> dict:
    import numpy as np

    vals = np.array(
        [[math.nan if m["metrics"].get(n) is None else float(m["metrics"][n]) for n in names] for m in members],
        dtype=float,
    )
    q_names = sorted({k for m in members for k in m["quantities"]})
    return {
        "labels": json.dumps([m["label"] for m in members]),
        "checkpoints": json.dumps([os.path.abspath(m["path"]) for m in members]),
        "checkpoint_sha256s": json.dumps([m["run"].checkpoint.sha256 for m in members]),
        "measures": json.dumps(names),
        "gap_expression": gap_text,
        "level": float(level),
        "flatter": json.dumps([flatter_label(n) for n in names]),
        "axes": json.dumps(axes),
        "fixed": json.dumps(fixed),
        "axis_values": json.dumps(store.to_jsonable(axis_values)),
        "values": vals,
        "gap": np.array([m["gap"] for m in members], dtype=float),
        "quantities": {k: np.array([m["quantities"][k] for m in members], dtype=float) for k in q_names},
        "n": np.array([r.n for r in results]),
        "kendall": np.array([r.kendall for r in results]),
        "kendall_ci": np.array([r.kendall_ci for r in results], dtype=float).reshape(len(results), 2),
        "spearman": np.array([r.spearman for r in results]),
        "spearman_ci": np.array([r.spearman_ci for r in results], dtype=float).reshape(len(results), 2),
        "psi": np.array([[r.psi.get(a, math.nan) for a in axes] for r in results], dtype=float).reshape(
            len(results), len(axes)
        ),
        "Psi": np.array([r.Psi for r in results]),
    }


def family_section(
    members: list[dict],
    table: dict,
    gap_text: str,
    shared: dict,
    *,
    seed: int = 0,
    resamples: int = 1000,
    level: float = 0.95,
) -> dict:
    """For ``flatscope compare``: the rank correlation of every flatness metric of ``table``
    (``{metric: {label: value}}``) with the gap, over the compared checkpoints (``members`` with
    ``label`` and ``path``). Raises FlatscopeError when it cannot be computed (fewer than 3
    checkpoints, no test split, an undefined gap)."""
    from ...correlation import axes_of, correlate_measure, gap_value, parse_gap, varying_axes  # scipy: slow

    if len(members) < 3:
        raise FlatscopeError("a rank correlation needs at least 3 checkpoints")
    terms = parse_gap(gap_text)
    splits = sorted({name.split("_", 1)[0] for _, name in terms}, key=["train", "test"].index)
    gaps, per_axes = [], []
    for m in members:
        run = Run(checkpoint=m["path"], **{**shared, "max_samples": None})
        run.setup()
        try:
            g = gap_value(terms, _quantities(run, splits))
        except FlatscopeError as exc:
            raise FlatscopeError(f"{m['label']}: {exc}") from None
        if not math.isfinite(g):
            raise FlatscopeError(f"{m['label']}: the gap {gap_text} is not a finite number")
        gaps.append(g)
        per_axes.append(axes_of(run.checkpoint.train, run.checkpoint.model_spec))
    vary = varying_axes(per_axes)
    axes = [a for a in vary if a != "seed"]
    fixed = [a for a in vary if a not in axes]
    col = {a: [p.get(a) for p in per_axes] for a in vary}
    out = []
    for k, (name, row) in enumerate(table.items()):
        if flatter(name) is None:
            continue
        vals = [math.nan if row.get(m["label"]) is None else float(row[m["label"]]) for m in members]
        r = correlate_measure(
            name,
            vals,
            gaps,
            {a: col[a] for a in axes},
            fixed={a: col[a] for a in fixed},
            resamples=resamples,
            level=level,
            seed=seed + k,
            flatter=flatter(name),
        )
        if r.n >= 3:
            out.append(r)
    return {
        "gap": gap_text,
        "gaps": dict(zip([m["label"] for m in members], gaps)),
        "axes": axes,
        "fixed": fixed,
        "level": level,
        "correlations": out,
    }
