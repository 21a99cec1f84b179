"""The ``flatscope`` command line: a thin layer over the library.

Each command lives in ``flatscope/cli/commands/<name>.py`` and exposes ``command`` (a click
command); they are discovered automatically. Exit codes: 0 success; 1 an audit threshold failed;
2 bad usage or bad input (one ``Error:`` line on stderr); 3 an internal error (a bug: ``-v`` shows
the traceback); 130 interrupted (Ctrl-C), with every file already written intact.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from .. import __version__
from .common import handle_errors


class _Group(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Usage errors as one ``Error:`` line (exit 2), like every other bad input."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:   # bare `flatscope`: the help text
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Error: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)

    def list_commands(self, ctx):
        from . import commands

        return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(commands.__path__)
                      if not m.name.startswith("_"))

    def get_command(self, ctx, name):
        if name not in self.list_commands(ctx):
            return None
        mod = importlib.import_module(f"{__package__}.commands.{name.replace('-', '_')}")
        cmd = mod.command
        if not getattr(cmd.callback, "_handles_errors", False):
            cmd.callback = handle_errors(cmd.callback)
            cmd.callback._handles_errors = True
        return cmd


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="flatscope")
def main():
    """Measure how flat a neural network's minimum is, and train toward flat minima.

    Every analysis reads a checkpoint, writes its results to HDF5 (with provenance) and plots,
    and prints a summary (or one JSON object with --json).
    """


__all__ = ["main"]
