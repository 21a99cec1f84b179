"""Click options built from the option declarations of :mod:`flatscope.options` (one source for the CLI and
the audit)."""

from __future__ import annotations

from typing import Callable

import click

from ..options import Option


def click_option(o: Option) -> Callable:
    """The click option of one declaration: ``--name`` (and its aliases), typed, with its help."""
    flags = [o.flag, *o.aliases]
    kw: dict = {"help": o.help, "metavar": o.metavar}
    if o.type == "bool":
        if o.off is not None:
            flags = [f"{o.flag}/{o.off}"]
        else:
            kw["is_flag"] = True
        kw["default"] = o.default
        kw["show_default"] = o.show_default and o.off is not None
    else:
        kw["default"] = o.default
        kw["show_default"] = o.show_default and o.default is not None
        if o.type == "choice":
            kw["type"] = click.Choice(o.choices)
        elif o.type == "int":
            kw["type"] = click.INT if o.minimum is None else click.IntRange(min=int(o.minimum))
        elif o.type == "float":
            kw["type"] = click.FLOAT if o.minimum is None else click.FloatRange(min=o.minimum)
    if o.metavar is None:
        kw.pop("metavar")
    return click.option(*flags, o.param, **kw)


def schema_options(options) -> Callable:
    """Decorate a command with the click options of ``options`` (in their order)."""

    def deco(f: Callable) -> Callable:
        for o in reversed(tuple(options)):
            f = click_option(o)(f)
        return f

    return deco


def shared_analysis_options(*without: str) -> Callable:
    """The shared analysis options (:func:`flatscope.cli.common.analysis_options`) without the named
    ones, for commands that set those themselves (several checkpoints, their own results file)."""
    from .common import analysis_options

    @analysis_options
    def donor(**kw):  # pragma: no cover - only its click params are used
        pass

    def deco(f: Callable) -> Callable:
        given: list = donor.__click_params__  # type: ignore[attr-defined]
        params = [p for p in given if p.name not in without]
        f.__click_params__ = list(getattr(f, "__click_params__", [])) + params  # type: ignore[attr-defined]
        return f

    return deco


def suite_options(*, suite: str, set_example: str, recompute: str, step: str | None = None) -> Callable:
    """``--suite``, ``--step`` (when ``step`` gives its help), ``--set`` and ``--recompute`` of the commands
    that run a suite of analyses (audit, compare, correlate)."""
    from ..audit import ANALYSES

    opts = [
        click.option("--suite", "suite_path", default=None, metavar="SUITE.toml", help=suite),
        click.option(
            "--set",
            "sets",
            multiple=True,
            metavar="ANALYSIS.OPTION=VALUE",
            help=f"Override one analysis option (repeatable), e.g. {set_example}.",
        ),
        click.option("--recompute", is_flag=True, help=recompute),
    ]
    if step is not None:
        choice = click.Choice(sorted(ANALYSES))
        opts.insert(1, click.option("--step", "only", multiple=True, type=choice, metavar="ANALYSIS", help=step))

    def deco(f: Callable) -> Callable:
        for opt in reversed(opts):
            f = opt(f)
        return f

    return deco
