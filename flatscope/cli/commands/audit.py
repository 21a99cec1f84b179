"""``flatscope audit``: run a suite of flatness analyses on a checkpoint and check thresholds (for CI)."""

from __future__ import annotations

import click

from ...audit import ANALYSES, audit, load_suite
from ..common import analysis_options, pass_run
from ..schema import suite_options


def _option(cmd: click.Command, name: str) -> click.Option:
    return next(p for p in cmd.params if p.name == name)


@click.command("audit")
@analysis_options
@suite_options(
    suite="The suite: one [table] per analysis with its options, and fail_if = [...] (see the README). "
    "Default: hessian, local_energy and landscape with the cheap audit defaults.",
    step=f"Run only these steps, in this order (repeatable): {', '.join(ANALYSES)}. A step the "
    "suite lacks runs with its audit defaults.",
    set_example="--set hessian.top=5 --set local_energy.samples=16",
    recompute="Recompute every step, even when the results file holds it for this checkpoint and options.",
)
@click.option(
    "--fail-if",
    "fail_if",
    multiple=True,
    metavar="'METRIC OP NUMBER'",
    help="Fail (exit 1) when the condition holds, e.g. 'hessian.lambda_max > 50' (repeatable; "
    "OP one of < <= > >= == !=). Parsed by a fixed grammar, never evaluated.",
)
@pass_run
def command(run, suite_path, only, sets, fail_if, recompute):
    """Audit a checkpoint: run a suite of analyses, print every named metric, check thresholds.

    Exit code 0 when every --fail-if condition is false, 1 when any holds (one line per failed
    threshold on stderr, naming the value and the bound), 2 for bad input (a malformed threshold,
    a metric the suite cannot produce, a bad suite file or option), checked before anything is
    computed. Each step is the analysis command itself (`flatscope hessian ...`) writing its usual
    group to the results file; a group already there for the same checkpoint sha256 and options is
    reused unless --recompute.

    \b
    Examples:
      flatscope audit ckpt.pt
      flatscope audit ckpt.pt --fail-if "hessian.lambda_max > 50" --fail-if "local_energy.train_target_sigma < 0.1"
      flatscope audit ckpt.pt --suite audit.toml --json
      flatscope audit ckpt.pt --step hessian --set hessian.top=10 --max-samples 500
      flatscope audit ckpt.pt --recompute --plot
    """
    suite = load_suite(suite_path, only=list(only) or None, sets=list(sets), fail_if=list(fail_if))
    res = audit(run, suite, recompute=recompute, note=run.note)
    if run.is_main:
        for o in res.outcomes:
            if o.failed:
                click.echo(f"FAIL {o.message}  [--fail-if '{o.threshold.text}']", err=True)

    def human(console):
        from rich import box
        from rich.table import Table

        console.print(f"[bold]audit[/bold] of {res.checkpoint} (sha256 {res.sha256[:12]}...), suite {res.suite}")
        console.print(f"results: {res.results}")
        t = Table("step", "group", "result", "time", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for r in res.records:
            how = "reused" if r.cached else "computed"
            wall = f" (computed in {r.wall_time_s:.1f} s)" if r.cached and r.wall_time_s is not None else ""
            t.add_row(r.analysis, f"/{r.group}", how, f"{r.seconds:.1f} s{wall}")
        console.print(t)
        console.print()
        by_metric = {}
        for o in res.outcomes:
            by_metric.setdefault(o.threshold.metric, []).append(o)
        t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        t.add_column("metric", no_wrap=True, min_width=max(map(len, res.metrics), default=6))
        t.add_column("value", no_wrap=True)
        if res.outcomes:
            t.add_column("threshold", no_wrap=True)
        for name, v in res.metrics.items():
            val = "-" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
            outs = by_metric.get(name, [])
            if not outs:
                t.add_row(name, val, *([""] if res.outcomes else []))
            for o in outs:
                t.add_row(
                    name,
                    val,
                    f"fail if {o.threshold.op} {o.threshold.value:g}: "
                    + ("[red]FAIL[/red]" if o.failed else "[green]pass[/green]"),
                )
        console.print(t)
        console.print()
        n_failed = sum(o.failed for o in res.outcomes)
        verdict = "[green]PASS[/green]" if res.passed else "[red]FAIL[/red]"
        console.print(f"verdict: {verdict} ({len(res.outcomes)} threshold(s), {n_failed} failed)  {res.seconds:.1f} s")

    run.emit(res.to_json(), human)
    if res.exit_code:
        raise click.exceptions.Exit(res.exit_code)


# Plots cost time a CI job rarely wants: an audit writes them only with --plot.
_option(command, "plot").default = False
