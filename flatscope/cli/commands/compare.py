"""``flatscope compare``: the same analyses on several checkpoints, side by side, with an HTML report."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from ... import __version__
from ... import report as rep
from ...audit import ANALYSES, Step, collect_metrics, load_suite, plan, run_steps
from ...errors import FlatscopeError
from ...lazy import lazy_module
from ..common import Run
from ..schema import shared_analysis_options, suite_options

store = lazy_module("flatscope.results")  # h5py: imported when the command runs, not for --help
COMPARE_SCHEMA = "flatscope.compare/1"


def labels_for(paths: list[str]) -> list[str]:
    """Short unique labels: the file stems (characters outside [A-Za-z0-9_.+-] become _), -2, -3 on clashes."""
    out: list[str] = []
    for p in paths:
        stem = re.sub(r"[^A-Za-z0-9_+-]", "_", Path(p).stem) or "checkpoint"
        lab, n = stem, 2
        while lab in out:
            lab, n = f"{stem}-{n}", n + 1
        out.append(lab)
    return out


_CAPTIONS = {
    "eigenvalues": "top Hessian eigenvalues",
    "density": "Hessian spectral density (SLQ)",
    "per_layer": "per-tensor sharpness and trace",
    "curves": "local energy δE(σ) of loss and error rate",
    "curve": "loss and accuracy along the slice",
    "contour": "loss contours",
    "surface": "loss surface",
    "entropy": "local entropy F(γ) and ⟨L⟩_q against the coupling γ",
    "distance": "spread of the local Gibbs measure ⟨‖w′ − w‖²⟩_q against γ",
    "traces": "sampler traces (loss per chain)",
    "rho": "worst-case and average-case sharpness against ρ, and the error rate at the worst-case point",
}


def _caption(path: Path, what: str) -> str:
    suffix = path.name.split(".")[-2]
    return f"{what}: {_CAPTIONS.get(suffix, suffix)}"


@click.command("compare")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option(
    "-o",
    "--out",
    "report_dir",
    default="report",
    show_default=True,
    metavar="DIR",
    help="Report folder (created if missing): index.html, the PNG plots, interpolations.h5.",
)
@suite_options(
    suite="The analyses, as for flatscope audit (its fail_if is ignored). Default: the audit's default "
    "suite plus a spectral density (hessian density=true, probes=4, steps=40), local_entropy "
    "and sharpness.",
    step="Run only these analyses, in this order (repeatable).",
    set_example="--set local_energy.samples=32",
    recompute="Recompute everything, even results already stored for these options.",
)
@click.option(
    "--results-dir",
    default=None,
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Write each checkpoint's results to DIR/<label>.<sha256[:8]>.flatscope.h5 (default: <checkpoint>.flatscope.h5 "
    "beside the checkpoint, the file flatscope audit uses).",
)
@click.option(
    "--interp/--no-interp",
    default=True,
    show_default=True,
    help="Loss along the straight line between each pair of checkpoints (same architecture only).",
)
@click.option(
    "--interp-grid",
    type=click.IntRange(min=3),
    default=21,
    show_default=True,
    metavar="N",
    help="Points on each interpolation line.",
)
@click.option(
    "--interp-range",
    default="-0.5:1.5",
    show_default=True,
    metavar="LO:HI",
    help="Interpolation coordinates: 0 is the first checkpoint of the pair, 1 the second.",
)
@click.option(
    "--gap",
    "gap_text",
    default="test_error-train_error",
    show_default=True,
    metavar="EXPR",
    help="With 3 or more checkpoints, the report ranks each flatness metric against this gap "
    "(Kendall, Spearman, as flatscope correlate); 'none' leaves the section out.",
)
@shared_analysis_options("checkpoint", "out", "plot", "plot_format")
def command(
    checkpoints,
    report_dir,
    suite_path,
    only,
    sets,
    recompute,
    results_dir,
    interp,
    interp_grid,
    interp_range,
    gap_text,
    **shared,
):
    """Compare checkpoints: the same analyses on each, with the same seed, so the same random
    directions, noise draws and probes; a side-by-side table, overlay plots, the loss along the line
    between each pair, and one self-contained HTML report (DIR/index.html).

    Landscape directions: one Gaussian draw (from --seed) shared by every checkpoint and
    filter-normalized against each checkpoint's own weights (Li et al. 2018). Local-energy noise: the
    same draws z_j for every checkpoint (multiplicative noise z_j ⊙ w of each). Results already stored
    for a checkpoint's sha256 and the same options are reused (e.g. from flatscope audit).

    \b
    Examples:
      flatscope compare runs/mlp-sgd.pt runs/mlp-esgd.pt runs/mlp-rsgd.pt -o report/
      flatscope compare a.pt b.pt -o report/ --max-samples 500 --set local_energy.samples=32
      flatscope compare a.pt b.pt -o report/ --suite audit.toml --results-dir results/ --json
    """
    from ...analyses.landscape import parse_range
    from ...checkpoint import sha256_file
    from ...params import ParamLayout

    main_run = Run(**shared)
    main_run.setup()
    paths = [str(p) for p in checkpoints]
    if len(paths) < 2:
        raise FlatscopeError("compare needs at least two checkpoints")
    if len({os.path.abspath(p) for p in paths}) != len(paths):
        raise FlatscopeError("the same checkpoint is given twice")
    labels = labels_for(paths)
    if interp:
        parse_range(interp_range, 1, (-0.5, 1.5))  # fail before anything is computed or created
    suite = load_suite(suite_path, only=list(only) or None, sets=list(sets), compare=True)
    report = Path(report_dir)
    if report.exists() and not report.is_dir():
        raise FlatscopeError(f"report folder {report} exists and is not a folder")
    if results_dir is not None and not os.path.isdir(results_dir):
        raise FlatscopeError(f"--results-dir {results_dir} does not exist")

    # plan everything (option errors, output paths) before computing anything
    members = []
    for path, label in zip(paths, labels):
        out = None
        if results_dir:  # the label and the file's sha256: distinct checkpoints never share a results file
            sha = sha256_file(path)[:8] if os.path.isfile(path) else "missing"
            out = os.path.join(results_dir, f"{label}.{sha}.flatscope.h5")
        run = Run(checkpoint=path, out=out, plot=False, plot_format="png", **shared)
        run.setup(check_output=True)
        steps = plan([Step(s.analysis, dict(s.options)) for s in suite.steps], run)
        members.append({"label": label, "path": path, "run": run, "steps": steps})
    ckpts = [m["run"].checkpoint for m in members]
    warnings: list[str] = []
    layouts = [ParamLayout.of(c.model) for c in ckpts]
    same_layout = all(lay == layouts[0] for lay in layouts)
    if not same_layout:
        warnings.append(
            "the checkpoints have different parameter layouts: random directions and noise draws "
            "cannot be identical across them, and no interpolation is possible"
        )
    datas = {json.dumps(m["run"].data_spec(), sort_keys=True) for m in members}
    if len(datas) > 1:
        warnings.append("the checkpoints name different data; their metrics are over different data sets")
    report.mkdir(parents=True, exist_ok=True)
    interp_file = str(report / "interpolations.h5")
    pairs = []
    if interp and same_layout:
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                a, b = members[i], members[j]
                if ckpts[i].sha256 == ckpts[j].sha256:
                    warnings.append(f"{a['label']} and {b['label']} are the same file contents; no interpolation")
                    continue
                run = Run(
                    checkpoint=a["path"],
                    out=interp_file,
                    plot=False,
                    plot_format="png",
                    **dict(shared, allow_mixed=True),
                )  # one file holds every pair's line, by design
                run.setup(check_output=True)
                step = Step(
                    ANALYSES["landscape"],
                    {"grid": interp_grid, "range": interp_range, "name": f"{a['label']}..{b['label']}"},
                    extra_checkpoints=[b["path"]],
                    extra_sha256=[ckpts[j].sha256],
                )
                plan([step], run)
                pairs.append({"from": a["label"], "to": b["label"], "run": run, "step": step})
    for w in warnings:
        main_run.warn(w)

    # run (or read) every analysis
    for m in members:
        m["records"] = run_steps(
            m["steps"], m["run"], recompute=recompute, note=lambda msg, lab=m["label"]: main_run.note(f"[{lab}] {msg}")
        )
        m["metrics"] = collect_metrics(m["steps"], m["records"])
    for p in pairs:
        (p["record"],) = run_steps(
            [p["step"]], p["run"], recompute=recompute, note=lambda msg: main_run.note(f"[interpolation] {msg}")
        )
    if not main_run.is_main:
        return

    plots = _plots(members, pairs, report)
    metric_names = list(dict.fromkeys(k for m in members for k in m["metrics"]))
    table = {k: {m["label"]: m["metrics"].get(k) for m in members} for k in metric_names}
    family = None
    if gap_text != "none" and len(members) >= 3:
        from .correlate import family_section

        try:
            family = family_section(members, table, gap_text, shared, seed=main_run.seed)
        except FlatscopeError as exc:
            warnings.append(f"no rank correlation with the gap: {exc}")
            main_run.warn(warnings[-1])
    interps = []
    for p in pairs:
        rec = p["record"]
        with store.open_results(interp_file) as f:
            dist = f[rec.group]["directions"].get("distance")
            dist = float(dist[()][0]) if dist is not None else None
        interps.append(
            {
                "from": p["from"],
                "to": p["to"],
                "group": f"/{rec.group}",
                "results": os.path.abspath(interp_file),
                "cached": rec.cached,
                "distance": dist,
                "summary": rec.summary,
            }
        )
    index = report / "index.html"
    rep.write(index, _html(main_run, members, ckpts, table, interps, pairs, plots, warnings, suite, family))
    payload = {
        "schema": COMPARE_SCHEMA,
        "report": str(index.resolve()),
        "seed": main_run.seed,
        "checkpoints": [
            {
                "label": m["label"],
                "checkpoint": os.path.abspath(m["path"]),
                "checkpoint_sha256": c.sha256,
                "results": os.path.abspath(m["run"].out_path),
                "steps": [r.to_json() for r in m["records"]],
            }
            for m, c in zip(members, ckpts)
        ],
        "metrics": table,
        "interpolations": interps,
        "plots": [str(Path(p).resolve()) for p, _ in plots],
        "warnings": warnings,
    }
    if family is not None:
        payload["correlations"] = dict(family, correlations=[r.to_json() for r in family["correlations"]])
    main_run.note(f"wrote {index}")

    def human(console):
        from rich import box
        from rich.table import Table

        t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        t.add_column("metric", overflow="fold")
        for m in members:
            t.add_column(m["label"], justify="right", no_wrap=True, min_width=10)
        for k, row in table.items():
            t.add_row(
                k, *[("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row.values()]
            )
        console.print(t)
        for it in interps:
            s = it["summary"]
            bars = ", ".join(
                f"{k[: -len('_barrier')]} barrier {v:.4g}"
                for k, v in s.items()
                if k.endswith("_barrier") and v is not None
            )
            console.print(
                f"interpolation {it['from']} -> {it['to']}: {bars or 'no barrier (grid misses 0 or 1)'}"
                + (f", distance {it['distance']:.4g}" if it["distance"] is not None else "")
            )
        console.print(f"report: {index}")

    main_run.emit(payload, human)


def _plots(members, pairs, report: Path) -> list[tuple[str, str]]:
    """Overlay plots of every analysis (one curve per checkpoint) and one plot per interpolation."""
    from ...plotting import plot_function

    out: list[tuple[str, str]] = []
    for i, step in enumerate(members[0]["steps"]):
        fn = plot_function(step.analysis.kind)
        if fn is None:
            continue
        items = []
        for m in members:
            with store.open_results(m["run"].out_path) as f:
                items.append((m["label"], store.read_tree(f[m["steps"][i].group])))
        for p in fn(items, report / f"overlay.{step.group.replace('/', '-')}", "png"):
            out.append((str(p), _caption(Path(p), f"/{step.group}")))
    fn = plot_function("landscape")
    for p in pairs:
        with store.open_results(p["run"].out_path) as f:
            tree = store.read_tree(f[p["record"].group])
        for path in fn(
            [(f"{p['from']} → {p['to']}", tree)], report / f"interp.{p['step'].group.split('/')[-1]}", "png"
        ):
            out.append(
                (
                    str(path),
                    f"interpolation {p['from']} → {p['to']}: loss and accuracy along "
                    f"(1 − x)·w_{p['from']} + x·w_{p['to']}",
                )
            )
    return out


def _html(main_run, members, ckpts, table, interps, pairs, plots, warnings, suite, family=None) -> str:
    import torch

    labels = [m["label"] for m in members]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    command = shlex.join(["flatscope"] + sys.argv[1:]) if sys.argv else "flatscope compare"
    body = [
        f"<h1>flatscope compare: {rep.esc(', '.join(labels))}</h1>",
        f"<p class=\"meta\">{rep.esc(now)} · flatscope {rep.esc(__version__)} · torch {rep.esc(torch.__version__)} · "
        f"device {rep.esc(members[0]['run'].device)} · dtype {rep.esc(main_run.dtype_name)} · seed {main_run.seed} · "
        f"suite {rep.esc(suite.source)}<br>{rep.code(command)}</p>",
    ]
    body += [f"<p class=\"warn\">{rep.esc(w)}</p>" for w in warnings]
    rows = []
    for m, c in zip(members, ckpts):
        spec = c.model_spec or {}
        rows.append(
            [
                m["label"],
                rep.code(os.path.abspath(m["path"])),
                rep.code(c.sha256[:16] + "…"),
                f"{spec.get('name', '?')} {json.dumps(spec.get('kwargs', {}))}",
                c.n_params,
                json.dumps(m["run"].data_spec()),
                m["run"].loss_name,
                rep.code(os.path.abspath(m["run"].out_path)),
            ]
        )
    body += [
        "<h2>Checkpoints</h2>",
        rep.table(
            ["label", "checkpoint", "sha256", "model", "parameters", "data", "loss", "results"], rows, numeric_from=4
        ),
    ]
    body += [
        "<h2>Metrics</h2>",
        "<p>Each metric is <code>&lt;analysis group&gt;.&lt;summary key&gt;</code>, as in "
        "<code>flatscope audit</code> (the README lists their meanings).</p>",
        rep.table(["metric"] + labels, _metric_rows(members, table)),
    ]
    if interps:
        splits = sorted({k[: -len("_barrier")] for it in interps for k in it["summary"] if k.endswith("_barrier")})
        rows = [
            [it["from"], it["to"], it["distance"]]
            + [it["summary"].get(f"{s}_barrier") for s in splits]
            + [it["summary"].get(f"{s}_loss_max") for s in splits]
            for it in interps
        ]
        body += [
            "<h2>Interpolations</h2>",
            "<p>Loss along w(x) = (1 − x)·w<sub>from</sub> + x·w<sub>to</sub>; the barrier is the largest "
            "rise above the straight line between the two end losses for x in [0, 1].</p>",
            rep.table(
                ["from", "to", "‖w_to − w_from‖"]
                + [f"{s} barrier" for s in splits]
                + [f"{s} max loss" for s in splits],
                rows,
                numeric_from=2,
            ),
        ]
    if family is not None:
        body += _family_html(family)
    body.append("<h2>Plots</h2>")
    body += [rep.image(p, cap) for p, cap in plots]
    body += [
        "<h2>Shared randomness</h2>",
        f"<p>Every checkpoint is analysed with seed {main_run.seed}: the Lanczos start vectors and trace "
        "probes of the Hessian, the local-energy noise draws z<sub>j</sub> (applied as z<sub>j</sub> ⊙ w to "
        "each checkpoint's weights w) and the Gaussian landscape direction are the same draws for every "
        "checkpoint. The landscape direction is filter-normalized against each checkpoint's own weights "
        "(Li et al. 2018), so each filter moves by the same fraction of its norm.</p>",
    ]
    body.append("<h2>Provenance</h2>")
    rows = []
    for m in members:
        for r in m["records"]:
            rows.append(_prov_row(m["label"], r))
    rows += [_prov_row(f"{p['from']} → {p['to']}", p["record"]) for p in pairs]
    body.append(
        rep.table(
            ["checkpoint", "group", "result", "seconds", "equivalent command and stored options"], rows, numeric_from=3
        )
    )
    return rep.page(f"flatscope compare: {', '.join(labels)}", body)


def _metric_rows(members, table) -> list[list]:
    """The metrics table's rows; after each analysis group's metrics, its stored warnings per checkpoint
    (also of results reused from an earlier run: they still qualify those numbers)."""
    warned: dict[str, tuple[str, dict]] = {}  # metric prefix -> (group, {label: warnings})
    for m in members:
        for step, rec in zip(m["steps"], m["records"]):
            if rec.warnings:
                warned.setdefault(step.prefix, (rec.group, {}))[1][m["label"]] = rec.warnings
    keys = list(table)
    rows = []
    for i, k in enumerate(keys):
        rows.append([rep.code(k)] + list(table[k].values()))
        prefix = _prefix_of(k, warned)
        if prefix is None or (i + 1 < len(keys) and _prefix_of(keys[i + 1], warned) == prefix):
            continue
        group, by_label = warned[prefix]
        cells = [rep.Raw("<br>".join(f"⚠ {rep.esc(w)}" for w in by_label.get(m["label"], []))) for m in members]
        rows.append([rep.Raw(f'<span class="warn">warnings of /{rep.esc(group)}</span>')] + cells)
    return rows


def _prefix_of(metric: str, prefixes) -> str | None:
    return next((p for p in prefixes if metric.startswith(p + ".")), None)


def _family_html(family) -> list[str]:
    """The report's section of rank correlations with the gap (as ``flatscope correlate`` computes them)."""
    pct = f"{100 * family['level']:g}%"

    def ci(v, c):
        return "–" if v is None or not math.isfinite(v) else f"{v:+.3f} [{c[0]:+.3f}, {c[1]:+.3f}]"

    rows = [
        [rep.code(r.measure), f"{r.flatter} = flatter", r.n, ci(r.kendall, r.kendall_ci), ci(r.spearman, r.spearman_ci)]
        + [r.psi.get(a) for a in family["axes"]]
        + [r.Psi]
        for r in family["correlations"]
    ]
    gaps = ", ".join(f"{k} {v:.4g}" for k, v in family["gaps"].items())
    return [
        "<h2>Rank correlation with the generalization gap</h2>",
        (
            f"<p>Gap {rep.code(family['gap'])} over the whole splits: {rep.esc(gaps)}. Kendall's τ and Spearman's ρ "
            f"of each flatness metric with the gap across these checkpoints, with {pct} percentile bootstrap "
            "intervals over the checkpoints; ψ per hyperparameter axis (from the training records) and their mean Ψ "
            "are Jiang et al.'s (2019) granulated Kendall coefficients. A positive τ means a larger value goes with a "
            "larger gap. With few checkpoints the intervals are wide: use <code>flatscope correlate</code> on a "
            "controlled family.</p>"
        ),
        rep.table(
            ["metric", "direction", "n", f"Kendall τ [{pct}]", f"Spearman ρ [{pct}]"]
            + [f"ψ {a}" for a in family["axes"]]
            + ["Ψ"],
            rows,
            numeric_from=2,
        ),
    ]


def _prov_row(label, r) -> list:
    opts = rep.esc(json.dumps(store.to_jsonable(r.options), indent=1, sort_keys=True))
    how = f"reused ({r.reason})" if r.cached else f"computed ({r.reason})"
    return [
        label,
        rep.code(f"/{r.group}"),
        how,
        round(r.seconds, 2),
        rep.Raw(f"{rep.code(r.command)}<details><summary>options</summary><pre>{opts}</pre></details>"),
    ]
