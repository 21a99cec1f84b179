"""The ``flatscope`` command line: a thin layer over the library.

Each command lives in ``flatscope/cli/commands/<name>.py`` and exposes ``command`` (a click
command); they are discovered automatically. Exit codes: 0 success; 1 an audit threshold failed;
2 bad usage or bad input (one ``Error:`` line on stderr); 3 an internal error (a bug: ``-v`` shows
the traceback); 130 interrupted (Ctrl-C), with every file already written intact.

``flatscope --help``, ``--version`` and an unknown command answer without importing torch: the
command list's one-line summaries are read from the command modules' source (the docstring of their
``command`` function), and a command module is imported only when that command runs or shows its
own help.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import click

from .. import __version__


def _short_help(name: str, limit: int = 45) -> str | None:
    """The first sentence of command ``name``'s docstring, read from its source without importing it
    (None when the module does not define ``def command`` with a docstring: then it is imported)."""
    path = Path(__file__).with_name("commands") / f"{name.replace('-', '_')}.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "command" and ast.get_docstring(node):
            # a bare Command with that docstring: click shortens it exactly as for the real one
            return click.Command(name, help=ast.get_docstring(node)).get_short_help_str(limit)
    return None


class _Group(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Usage errors as one ``Error:`` line (exit 2), like every other bad input."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `flatscope`: the help text
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

        return sorted(
            m.name.replace("_", "-") for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")
        )

    def format_commands(self, ctx, formatter):
        """The command list of ``flatscope --help``, without importing any command (and torch)."""
        names = self.list_commands(ctx)
        if names:
            limit = formatter.width - 6 - max(len(n) for n in names)
            with formatter.section("Commands"):
                rows = []
                for n in names:
                    text = _short_help(n, limit)
                    if text is None:  # not the usual layout: ask the command itself (imports it)
                        cmd = self.get_command(ctx, n)
                        text = cmd.get_short_help_str(limit) if cmd is not None else ""
                    rows.append((n, text))
                formatter.write_dl(rows)

    def get_command(self, ctx, name):
        if name not in self.list_commands(ctx):
            return None
        from .common import handle_errors

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
