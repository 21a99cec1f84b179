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
