"""The documentation's console examples still produce the output they show.

A console block is executed when an HTML comment ``<!-- run -->`` stands on the line before its
opening fence (in ``docs/**/*.md`` and ``README.md``)::

    <!-- run -->
    ```console
    $ flatscope hessian sample_checkpoints/mlp-sgd.pt --top 0
    Error: --top must be at least 1, got 0
    ```

Every ``$ `` line is a command, and the lines up to the next ``$ `` line are its expected output
(stdout and stderr together, in the order a terminal shows them). The blocks of one file run in
order in one scratch directory holding a copy of ``sample_checkpoints/`` (so results files written
beside a checkpoint never land in the repository) and an empty ``runs/``, with ``flatscope`` on the PATH running this
checkout, one thread, seed defaults unchanged. ``$ echo $?`` prints the exit code of the command
before it.

The output must have the documented *shape*: the same number of lines and, line by line, the same
text once numbers are taken out; every number must agree within the block's tolerance (default
``rtol=0.05 atol=1e-6``, or ``<!-- run rtol=0.1 atol=1e-3 -->``). Durations (a number followed by
`` s``) are not compared, runs of table rule characters and of spaces count as one.
``<!-- run slow -->`` marks a block that takes more than a few seconds: it runs only under
``pytest -m slow``, which executes every block of the file in order.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^<!--\s*run(?P<opts>[^>]*?)\s*-->[ \t]*\n```console[ \t]*\n(?P<body>.*?)^```", re.DOTALL | re.MULTILINE)
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|[-+]?\b(?:nan|inf)\b")
DURATION = re.compile(r"\d+(?:\.\d+)?(?= s\b)")
RULES = re.compile(r"([━─═┄])\1+")


@dataclass
class Command:
    line: str
    expected: list[str] = field(default_factory=list)


@dataclass
class Block:
    file: Path
    lineno: int
    slow: bool
    rtol: float
    atol: float
    commands: list[Command]

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.lineno}"


def parse_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    out = []
    for m in BLOCK.finditer(text):
        opts = m.group("opts").split()
        kv = dict(o.split("=", 1) for o in opts if "=" in o)
        cmds: list[Command] = []
        for ln in m.group("body").splitlines():
            if ln.startswith("$ "):
                cmds.append(Command(ln[2:].strip()))
            elif cmds:
                cmds[-1].expected.append(ln)
            elif ln.strip():
                raise AssertionError(f"{path}: a runnable block must start with a '$ ' command line")
        out.append(Block(path, text.count("\n", 0, m.start()) + 1, "slow" in opts, float(kv.get("rtol", 0.05)),
                         float(kv.get("atol", 1e-6)), cmds))
    return out


def doc_files() -> list[Path]:
    return sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])


def normalize(line: str) -> str:
    line = DURATION.sub("<t>", line.rstrip())
    line = RULES.sub(r"\1", line)
    return re.sub(r"[ \t]+", " ", line)


def same_shape(got: list[str], want: list[str], rtol: float, atol: float) -> str | None:
    """None when `got` has the documented shape; else a message naming the first difference."""
    got = [normalize(x) for x in got if x.strip()]
    want = [normalize(x) for x in want if x.strip()]
    if len(got) != len(want):
        return f"{len(got)} output lines, the docs show {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if NUMBER.sub("#", g) != NUMBER.sub("#", w):
            return f"line {i + 1} reads\n  {g}\nthe docs show\n  {w}"
        for a, b in zip(NUMBER.findall(g), NUMBER.findall(w)):
            x, y = float(a), float(b)
            if math.isnan(x) and math.isnan(y):
                continue
            if not (x == y or abs(x - y) <= atol + rtol * max(abs(x), abs(y))):
                return f"line {i + 1}: {a} where the docs show {b} (rtol {rtol}, atol {atol})\n  {g}\n  {w}"
    return None


def test_normalize_and_compare():
    """The comparison itself: a number outside the tolerance, other text, or another line count fail."""
    want = ["results: mlp.h5  (4.6 s)", "│ 1 │ 0.161751   │ 2.6e-07  │ yes       │"]
    assert same_shape(["results: mlp.h5  (9.1 s)", "│ 1 │ 0.1620 │ 2.9e-07 │ yes │"], want, 0.05, 1e-6) is None
    assert "0.2" in same_shape(["results: mlp.h5  (4.6 s)", "│ 1 │ 0.2 │ 2.6e-07 │ yes │"], want, 0.05, 1e-6)
    assert "reads" in same_shape(["results: mlp.h5  (4.6 s)", "│ 1 │ 0.161751 │ 2.6e-07 │ no │"], want, 0.05, 1e-6)
    assert "output lines" in same_shape(want[:1], want, 0.05, 1e-6)
    blocks = parse_blocks(ROOT / "docs" / "concepts.md")
    assert blocks and blocks[0].commands[0].line.startswith("flatscope ") and blocks[0].commands[0].expected


def run_blocks(blocks: list[Block], workdir) -> None:
    cwd, env = workdir
    rc = 0
    for block in blocks:
        for cmd in block.commands:
            if cmd.line == "echo $?":
                out = [str(rc)]
            else:
                p = subprocess.run(["bash", "-c", cmd.line], check=False, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, timeout=600)
                rc, out = p.returncode, p.stdout.splitlines()
            problem = same_shape(out, cmd.expected, block.rtol, block.atol)
            assert problem is None, f"{block.id}: $ {cmd.line}\n{problem}\n--- output ---\n" + "\n".join(out)


FILES = [f for f in doc_files() if parse_blocks(f)]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_fast_examples(path, tmp_path_factory):
    blocks = [b for b in parse_blocks(path) if not b.slow]
    if not blocks:
        pytest.skip("every runnable block of this file is marked slow")
    d = tmp_path_factory.mktemp("fast")
    run_blocks(blocks, _fresh(d))


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_all_examples(path, tmp_path_factory):
    run_blocks(parse_blocks(path), _fresh(tmp_path_factory.mktemp("all")))


def _fresh(d: Path):
    shutil.copytree(ROOT / "sample_checkpoints", d / "sample_checkpoints")
    (d / "runs").mkdir()
    bin_dir = d / ".bin"
    bin_dir.mkdir()
    exe = bin_dir / "flatscope"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m flatscope "$@"\n')
    exe.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PATH=str(bin_dir) + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", COLUMNS="100", NO_COLOR="1")
    env.pop("FORCE_COLOR", None)
    return d, env
