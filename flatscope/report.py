"""A self-contained HTML report: tables, PNG plots embedded as base64 ``data:`` URIs, provenance.

The page needs nothing but itself: no script, no external style sheet, font or image, so it can be
archived as a CI artifact, mailed, or opened offline. ``scripts/render_report.sh`` renders it in
headless Chromium to check that it displays.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1150px;
     padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #d7d7d7;padding:.28em .6em;text-align:left;vertical-align:top}
th{background:#f3f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:ui-monospace,monospace}
tr:nth-child(even) td{background:#fafafa}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #e3e3e3}
figcaption{color:#444;font-size:.9em}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.82em}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.4em .8em}
details{margin:.3em 0}
"""


def esc(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def table(headers: list[str], rows: list[list], numeric_from: int = 1) -> str:
    """An HTML table; cells from column ``numeric_from`` on are right-aligned numbers (formatted by :func:`fmt`)."""
    out = ["<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            if i >= numeric_from and (v is None or isinstance(v, (int, float))):
                cells.append(f'<td class="num">{esc(fmt(v))}</td>')
            else:
                cells.append(f"<td>{v if isinstance(v, Raw) else esc(fmt(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


class Raw(str):
    """Trusted HTML (built here from escaped parts), inserted as is."""


def code(text: str) -> Raw:
    return Raw(f"<code>{esc(text)}</code>")


def image(path: str | Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def page(title: str, body: list[str]) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write(path: str | Path, text: str) -> Path:
    """Write atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
