"""``flatscope show``: what a results file holds."""

from __future__ import annotations

import json
import os

import click

from ...measures import flatter
from ...options import stored_result_options
from ...results import find_analyses, open_results, stored_warnings
from ..common import Run, common_options

_PROVENANCE = (
    "checkpoint",
    "checkpoint_sha256",
    "command",
    "flatscope_version",
    "torch_version",
    "seed",
    "device",
    "dtype",
    "wall_time_s",
    "timestamp",
    "peak_memory_bytes",
    "peak_memory_of",
)


def summarize(path: str) -> dict:
    out = {"file": path, "analyses": {}}
    with open_results(path) as f:
        for name, g in find_analyses(f):
            a = {
                "kind": str(g.attrs["kind"]),
                "summary": json.loads(g.attrs.get("summary", "{}")),
                "options": json.loads(g.attrs.get("options", "{}")),
            }
            a["provenance"] = {
                k: (g.attrs[k].item() if hasattr(g.attrs[k], "item") else g.attrs[k])
                for k in _PROVENANCE
                if k in g.attrs
            }
            a["flatter"] = {k: d for k in a["summary"] if (d := flatter(f"{name.replace('/', '.')}.{k}"))}
            a["warnings"] = stored_warnings(g)
            out["analyses"][name] = a
    return out


def _relative(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (results store absolute paths)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if rel.startswith("..") else rel


def _fmt(v) -> str:
    """A summary value as show prints it: floats to 6 digits; None (not computed, or NaN) as '-'."""
    if v is None:
        return "-"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


@click.command("show")
@click.argument("results", nargs=-1, required=True, type=click.Path())
@common_options
def command(results, **common):
    """List the analyses in results files with their headline numbers; each flatness measure
    says which direction means flatter ("lower = flatter"), and the options the numbers depend on.

    \b
    Example:
      flatscope show sample_checkpoints/mlp-sgd.flatscope.h5
    """
    run = Run(**common)
    run.setup()
    files = [summarize(p) for p in results]

    def human(console):
        from rich.markup import escape

        for info in files:
            console.print(f"[bold]{info['file']}[/bold]")
            if not info["analyses"]:
                console.print("  (no analyses)")
            for name, a in info["analyses"].items():
                p = a["provenance"]
                console.print(
                    escape(
                        f"  /{name}  [{a['kind']}]  {p.get('timestamp', '')}  "
                        f"{p.get('wall_time_s', 0):.1f} s  seed {p.get('seed')}  {p.get('device', '')}"
                    )
                )
                if p.get("checkpoint"):
                    sha = str(p.get("checkpoint_sha256", ""))[:12]
                    console.print(
                        escape(
                            f"      checkpoint {_relative(str(p['checkpoint']))}"
                            + (f"  (sha256 {sha}...)" if sha else "")
                        ),
                        highlight=False,
                    )
                chosen = {k: v for k, v in stored_result_options(a["kind"], a["options"]).items() if v is not None}
                if chosen:
                    text = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in chosen.items())
                    console.print(escape(f"      options {text}"), highlight=False)
                for k, v in a["summary"].items():
                    d = a["flatter"].get(k)
                    console.print(escape(f"      {k:<30} {_fmt(v)}" + (f"   ({d} = flatter)" if d else "")))
                for w in a["warnings"]:
                    console.print(escape(f"      warning: {w}"), highlight=False)

    run.emit(files[0] if len(files) == 1 else {"files": files}, human)
