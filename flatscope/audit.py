"""Audits: a suite of flatness analyses run on a checkpoint, named metrics, thresholds and a verdict.

A *suite* is an ordered list of *steps*. A step is one flatscope analysis run with given options by
the same library function its command calls (``compute`` of :mod:`flatscope.steps`): the step
``hessian`` with ``{"top": 3}`` is exactly ``flatscope hessian CKPT --top 3 ...`` (its option names
are the command's long flags without the dashes, declared once in :mod:`flatscope.options`), so it
writes the very HDF5 group that command writes and nothing is re-implemented here. A step's values
are converted and checked by those declarations (types, choices, bounds) and by the step's own
``validate``, before anything is loaded. Each step's equivalent command line is recorded
(:attr:`StepRecord.command`).

Analyses (:data:`ANALYSES`, one registry entry each):

- ``hessian``: top eigenvalues and trace (:mod:`flatscope.analyses.hessian`), group ``/hessian``;
- ``local_energy``: δE(σ) and the σ at which the error rate rises by ε (Pittorino et al. 2021,
  arXiv:2006.07897; :mod:`flatscope.analyses.local_energy`),
  group ``/local_energy``;
- ``landscape``: a slice along filter-normalized random directions (Li et al. 2018;
  :mod:`flatscope.analyses.landscape`), group ``/landscape/<name>`` (default ``random-1d``);
- ``local_entropy`` (optional, not in the default suite: Langevin sampling costs more): the local
  entropy F(γ) (García Trillos, Kaplan & Sanz-Alonso 2019, arXiv:1901.10082;
  :mod:`flatscope.analyses.local_entropy`), group ``/local_entropy``, one split.
- ``sharpness`` (optional): worst-case and average-case adaptive sharpness over a ρ grid (Andriushchenko
  et al. 2023, arXiv:2302.07011; :mod:`flatscope.analyses.sharpness`), group ``/sharpness``.

The default suite (:data:`DEFAULT_SUITE`) is cheap enough for CI on a CPU: the top 3 eigenvalues and
a 30-product Hutch++ trace, δE at 5 σ with 8 draws and the σ where the error rises by 0.01, and a
21-point 1-D slice. An option a suite leaves out takes the audit default below when there is one,
else the command's own default.

Metrics. Every analysis result has a ``summary()`` of headline scalars, stored as the group's
``summary`` attr; the metric ``<group>.<key>`` is that value, with ``/`` in the group path written
``.`` (``hessian.lambda_max``, ``local_energy.train_target_sigma``,
``landscape.random-1d.train_loss_max``). Booleans become 1/0, NaN and missing values ``None``.
The metric names a suite can produce are known before anything is computed
(:meth:`Analysis.metric_keys` asks each library's own result class for its summary keys), so a
threshold naming a metric the suite cannot produce is rejected up front.

Caching. A step is not recomputed when the results file already holds its group with

- attr ``checkpoint_sha256`` equal to the checkpoint's sha256,
- provenance attrs ``seed``, ``dtype``, ``loss`` and ``data`` equal to this run's,
- attr ``options`` (JSON) equal to this step's options in every key that determines the result (the
  options declared ``result=True`` in :mod:`flatscope.options`, plus ``split``, ``max_samples`` and
  ``batch_size``; the keys that only choose how the numbers are computed, equal up to rounding, are
  ignored: the Hessian's ``hvp`` mode, local energy's ``batched`` and ``chunk``, the landscape's
  ``batching`` and ``points_per_call``, ``parallel``), and
- a complete result (a landscape with every point done, a Hessian without a non-finite stop).

``recompute=True`` always recomputes. The device is not part of the key (CPU and CUDA agree up to
rounding).

Stored metrics. Groups written during training rather than by an analysis (:data:`STORED_KINDS`:
``/track`` of ``flatscope train --track``) are read, never computed: when the results file holds
one, its summary keys are metrics too (``track.lambda_max_last``, ``track.lambda_max_max``).

Adding an analysis to the audit is one entry in :data:`ANALYSES` (its command name, kind and audit
defaults): its options come from :data:`flatscope.options.SCHEMAS`, and its group, cache comparison,
completeness and summary keys from its step module ``flatscope/steps/<name>.py``.

Warnings. The warnings stored with a group (sampler heating, low ESS, non-convergence: attr
``warnings``) are part of its :class:`StepRecord`, whether the step was computed or reused, so a
rerun that reads a stored result still reports them (``--json``: ``steps[i].warnings``).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import math
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .errors import FlatscopeError
from .options import MAX_OPTION_INT, SCHEMAS, Option, check_number  # noqa: F401
from .options import defaults as option_defaults
from .lazy import lazy_module
from .shared_options import RESULT_DEFAULTS, result_options
from .thresholds import Threshold, parse_threshold

if TYPE_CHECKING:
    import numpy as np

    from . import results as store
else:  # imported on first use: `flatscope audit --help` needs neither
    np = lazy_module("numpy")
    store = lazy_module("flatscope.results")

AUDIT_SCHEMA = "flatscope.audit/1"

# Of the options every analysis shares (flatscope/cli/common.py), a step may set only ``split``: the
# others are the audit's own, and every step runs with them.
_STEP_SHARED = ("split",)


# ------------------------------------------------------------------------------------------ registry
@dataclass
class Target:
    """What the steps run on: the checkpoint and the shared options, from a :class:`flatscope.cli.common.Run`."""

    run: object

    @property
    def sha256(self) -> str:
        return self.run.checkpoint.sha256

    @property
    def data_spec(self) -> dict:
        return self.run.data_spec()

    @property
    def has_batchnorm(self) -> bool:
        import torch

        return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.run.checkpoint.model.modules())


@dataclass(frozen=True)
class Analysis:
    """One kind of audit step: an analysis, its options (:data:`flatscope.options.SCHEMAS`) and its step
    module ``flatscope/steps/<name>.py`` (compute and store; the stored group, how its options compare for
    a cache hit, whether it is complete, its summary keys)."""

    name: str
    command: str  # the command line's name: flatscope <command>
    kind: str  # the group's ``kind`` attr
    defaults: dict  # audit defaults (option name -> value)
    in_default_suite: bool
    describe: str = ""

    @property
    def options(self) -> tuple:
        return SCHEMAS[self.name]

    @property
    def denied(self) -> tuple:
        """Command options an audit step may not set (they read other files or resume a run)."""
        return tuple(o.name for o in self.options if not o.audit)

    @property
    def step(self):
        """The step module (imported on first use: it imports torch)."""
        return importlib.import_module(f"flatscope.steps.{self.name}")

    def group(self, step: "Step") -> str:
        return self.step.group(step)

    def expected(self, step: "Step", target: Target) -> dict:
        return self.step.expected(step, target)

    def normalize(self, stored: dict) -> dict:
        return getattr(self.step, "normalize", lambda x: x)(stored)

    def complete(self, g) -> str | None:
        return self.step.complete(g)

    def validate(self, step: "Step") -> None:
        self.step.validate(step)

    def metric_keys(self, step: "Step") -> list:
        return self.step.metric_keys(step)


ANALYSES: dict[str, Analysis] = {
    a.name: a
    for a in [
        Analysis(
            "hessian",
            "hessian",
            "hessian",
            {"top": 3, "density": False, "trace_probes": 30},
            True,
            "top eigenvalues (Lanczos) and the trace (Hutch++)",
        ),
        Analysis(
            "local_energy",
            "local-energy",
            "local_energy",
            {"sigma": "0.01..1:5", "samples": 8, "target_error": 0.01},
            True,
            "δE(σ) of loss and error under multiplicative weight noise, and the σ where the error rises by ε",
        ),
        Analysis(
            "landscape",
            "landscape",
            "landscape",
            {"grid": 21},
            True,
            "loss along a filter-normalized random direction (Li et al. 2018)",
        ),
        Analysis(
            "local_entropy",
            "local-entropy",
            "local_entropy",
            {"gamma": "0.1..10:5", "steps": 200, "burn_in": 50, "chains": 4, "is_samples": 0},
            False,
            "local entropy F(γ) by Langevin sampling (optional: add it with --step or a [local_entropy] table)",
        ),
        Analysis(
            "sharpness",
            "sharpness",
            "sharpness",
            {"rho": "0.1..1:3", "steps": 10, "samples": 8},
            False,
            "worst-case and average-case adaptive sharpness (Andriushchenko et al. 2023; optional: add it "
            "with --step or a [sharpness] table)",
        ),
    ]
}

DEFAULT_SUITE = {a.name: {} for a in ANALYSES.values() if a.in_default_suite}
# flatscope compare's default suite: the audit's, plus a cheap spectral density (4 probes x 40 Lanczos
# steps) for the overlaid spectra, plus local entropy and sharpness at the audit defaults.
COMPARE_SUITE = {
    "hessian": {"density": True, "probes": 4, "steps": 40},
    "local_energy": {},
    "landscape": {},
    "local_entropy": {},
}
COMPARE_SUITE["sharpness"] = {}


def analysis(name: str) -> Analysis:
    key = str(name).strip().replace("-", "_")
    if key not in ANALYSES:
        raise FlatscopeError(f"unknown analysis {name!r} in the suite; known: {', '.join(ANALYSES)}")
    return ANALYSES[key]


# ----------------------------------------------------------------------------------------- options
def option_table(a: Analysis) -> dict[str, Option]:
    """Option name -> declaration, for the options a suite step may set (its own, and ``split``)."""
    return {o.name: o for o in a.options if o.audit}


def _tokens(o: Option, value) -> list[str]:
    """A converted step option as command-line flags (for the step's equivalent command line)."""
    if o.type == "bool":
        if value:
            return [o.flag]
        return [o.off] if o.off else []
    return [o.flag, str(value)]


def parse_value(text: str):
    """A ``--set`` value: true/false, an integer, a float, else the text itself."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if re.fullmatch(r"[+-]?\d+", t, re.ASCII):
        return check_number(int(t), "--set")
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", t, re.ASCII):
        return check_number(float(t), "--set")
    return t


# ------------------------------------------------------------------------------------------- suite
@dataclass
class Step:
    """One step of a suite: an analysis, its options, and (after :func:`plan`) the parsed command."""

    analysis: Analysis
    options: dict = field(default_factory=dict)
    extra_checkpoints: list = field(default_factory=list)  # landscape: interpolation to these
    extra_sha256: list = field(default_factory=list)
    argv: list = field(default_factory=list)
    params: dict = field(default_factory=dict)  # the command's parsed step options
    splits: list = field(default_factory=list)
    group: str = ""
    metrics: list = field(default_factory=list)  # predicted metric names

    @property
    def name(self) -> str:
        return self.analysis.name

    @property
    def prefix(self) -> str:
        return self.group.replace("/", ".")

    def command_line(self) -> str:
        return shlex.join(["flatscope", self.analysis.command] + self.argv)


@dataclass
class Suite:
    steps: list
    thresholds: list = field(default_factory=list)
    source: str = "default"


def _norm_key(k: str) -> str:
    return str(k).strip().replace("-", "_")


MAX_SUITE_BYTES = 1 << 20
MAX_SUITE_DEPTH = 4  # [analysis] table > option > list of numbers


def _depth(x, level: int = 0) -> int:
    if level > MAX_SUITE_DEPTH:
        return level
    if isinstance(x, dict):
        return max([_depth(v, level + 1) for v in x.values()] or [level + 1])
    if isinstance(x, list):
        return max([_depth(v, level + 1) for v in x] or [level + 1])
    return level


def read_toml(path: str) -> dict:
    """Read a suite file with :mod:`tomllib` (Python >= 3.11), or the ``tomli`` backport on 3.10."""
    try:
        import tomllib  # type: ignore[import-not-found]
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[import-not-found, no-redef]
        except ImportError:
            raise FlatscopeError(
                "reading a --suite file needs Python >= 3.11 (tomllib) or `pip install tomli`; "
                "or give the options as --step/--set flags"
            ) from None
    from .safe_files import check_regular_file, human_bytes

    size = check_regular_file(path, "suite file")
    if size > MAX_SUITE_BYTES:
        raise FlatscopeError(
            f"suite file {path} is {human_bytes(size)}; a suite is at most {human_bytes(MAX_SUITE_BYTES)} of TOML"
        )
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise FlatscopeError(f"suite file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise FlatscopeError(f"suite file {path} nests arrays or tables too deeply to be a suite") from None
    except UnicodeDecodeError:
        raise FlatscopeError(f"suite file {path} is not UTF-8 text") from None
    depth = _depth(table)
    if depth > MAX_SUITE_DEPTH:
        raise FlatscopeError(f"suite file {path} nests {depth} levels deep; a suite needs at most {MAX_SUITE_DEPTH}")
    return table


def build_suite(
    table: dict | None = None,
    *,
    only: list[str] | None = None,
    sets: list[str] = (),
    fail_if: list[str] = (),
    source: str = "default",
) -> Suite:
    """The suite from a parsed TOML table (None: the default suite), ``--step`` selections, ``--set``
    overrides and ``--fail-if`` thresholds. Options start from each analysis' audit defaults.

    Thresholds are parsed first, so that malformed or hostile text fails before anything else.
    """
    thresholds_text = list(fail_if)
    if table is not None:
        extra = table.get("fail_if", [])
        if isinstance(extra, str):
            extra = [extra]
        if not isinstance(extra, list) or not all(isinstance(t, str) for t in extra):
            raise FlatscopeError(f"{source}: fail_if must be a list of strings like \"hessian.lambda_max > 50\"")
        thresholds_text = list(extra) + thresholds_text
    thresholds = [parse_threshold(t) for t in thresholds_text]

    tables: dict[str, dict] = {}
    if table is None:
        tables = {k: dict(v) for k, v in DEFAULT_SUITE.items()}
    else:
        for key, value in table.items():
            if key == "fail_if":
                continue
            if not isinstance(value, dict):
                raise FlatscopeError(
                    f"{source}: unexpected top-level key {key!r}; a suite holds fail_if = [...] "
                    f"and one [table] per analysis ({', '.join(ANALYSES)})"
                )
            name = analysis(key).name
            if "fail_if" in value:
                raise FlatscopeError(
                    f"{source}: fail_if is inside [{key}]; put it at the top of the file, before the first [table]"
                )
            if name in tables:
                raise FlatscopeError(f"{source}: analysis {name} appears twice")
            tables[name] = {_norm_key(k): v for k, v in value.items()}
        if not tables:
            raise FlatscopeError(f"{source}: the suite has no analysis table ([hessian], [local_energy], ...)")
    if only:
        picked = {}
        for name in only:
            a = analysis(name)
            if a.name in picked:
                raise FlatscopeError(f"--step {a.name} is given twice")
            picked[a.name] = tables.get(a.name, {})
        tables = picked
    for text in sets:
        m = re.fullmatch(r"\s*([A-Za-z_-]+)\.([A-Za-z0-9_-]+)\s*=(.*)", text or "", re.DOTALL)
        if not m:
            raise FlatscopeError(f"--set {text!r}: expected ANALYSIS.OPTION=VALUE, e.g. hessian.top=5")
        a = analysis(m.group(1))
        if a.name not in tables:
            raise FlatscopeError(f"--set {text!r}: {a.name} is not in the suite (add it with --step {a.name})")
        tables[a.name][_norm_key(m.group(2))] = parse_value(m.group(3))
    steps = []
    for name, opts in tables.items():
        a = ANALYSES[name]
        merged = dict(a.defaults)
        merged.update(opts)
        steps.append(Step(a, merged))
    return Suite(steps, thresholds, source)


def load_suite(path: str | None, *, only=None, sets=(), fail_if=(), compare: bool = False) -> Suite:
    """The suite of ``flatscope audit`` (or, with ``compare``, of ``flatscope compare``)."""
    # thresholds first: a hostile --fail-if is rejected before the suite file is even read
    for t in fail_if:
        parse_threshold(t)
    if path:
        return build_suite(read_toml(path), only=only, sets=sets, fail_if=fail_if, source=path)
    if compare:
        table = {k: dict(v) for k, v in COMPARE_SUITE.items()}
        return build_suite(table, only=only, sets=sets, fail_if=fail_if, source="default")
    return build_suite(None, only=only, sets=sets, fail_if=fail_if, source="default")


# -------------------------------------------------------------------------------------------- plan
def shared_argv(run, split: str | None = None) -> list[str]:
    """The shared options of ``run`` as command-line flags for a step (quiet, the audit's results file)."""
    argv = [
        "--device",
        run.device_spec,
        "--seed",
        str(run.seed),
        "--dtype",
        run.dtype_name,
        "--split",
        split or run.split,
        "-o",
        run.out_path,
        "--plot" if run.do_plot else "--no-plot",
        "--plot-format",
        run.plot_format,
        "-q",
    ]
    if run.threads:
        argv += ["--threads", str(run.threads)]
    if run.batch_size is not None:
        argv += ["--batch-size", str(run.batch_size)]
    if run.max_samples is not None:
        argv += ["--max-samples", str(run.max_samples)]
    if run.model_name is not None:
        argv += ["--model", run.model_name]
    if run.model_kwargs is not None:
        argv += ["--model-kwargs", json.dumps(run.model_kwargs)]
    if run.data_name is not None:
        argv += ["--data", run.data_name]
    if run.data_kwargs is not None:
        argv += ["--data-kwargs", json.dumps(run.data_kwargs)]
    if run.loss_override is not None:
        argv += ["--loss", run.loss_override]
    if run.label_smoothing:
        argv += ["--label-smoothing", repr(float(run.label_smoothing))]
    if run.metric_name is not None:
        argv += ["--metric", run.metric_name]
    if run.output_key is not None:
        argv += ["--output", run.output_key]
    if run.hvp_mode != "auto":
        argv += ["--hvp", run.hvp_mode]
    if run.workers:
        argv += ["--workers", str(run.workers)]
    if run.allow_nonfinite:
        argv.append("--allow-nonfinite")
    if getattr(run, "allow_mixed", False):
        argv.append("--allow-mixed")
    if run.verbose:
        argv.append("-v")
    return argv


def plan(steps: list[Step], run) -> list[Step]:
    """Convert and check every step's options by their declarations and predict groups and metric names.

    Nothing is loaded or computed. Unknown options, bad values (the declared types, choices and bounds
    of :mod:`flatscope.options`, as on the command line, and the checks of each step's ``validate``: σ
    and γ grids, ranges, grids, bounds) and steps that would write the same group fail here, as
    :class:`FlatscopeError` naming the step.
    """
    groups: dict[str, str] = {}
    for step in steps:
        a = step.analysis
        where = f"suite step {a.name}"
        table = option_table(a)
        opts = dict(step.options)
        split = opts.pop("split", None)
        if split is not None and split not in ("train", "test", "both"):
            raise FlatscopeError(f"{where}: split must be train, test or both, got {split!r}")
        argv = [str(run.checkpoint_path)] + [str(p) for p in step.extra_checkpoints]
        argv += shared_argv(run, split)
        params = option_defaults(a.options)
        for key, value in opts.items():
            if key not in table:
                names = sorted(list(table) + list(_STEP_SHARED))
                hint = difflib.get_close_matches(key, names, n=1)
                denied = f" (not available in an audit; run flatscope {a.command} directly)" if key in a.denied else ""
                raise FlatscopeError(
                    f"{where}: unknown option {key!r}{denied}"
                    + (f"; did you mean {hint[0]!r}?" if hint and not denied else "")
                    + f" (options: {', '.join(names)})"
                )
            o = table[key]
            params[o.param] = o.convert(value, where)
            argv += _tokens(o, params[o.param])
        step.argv = argv
        step.params = params
        s = split or run.split
        step.splits = ["train", "test"] if s == "both" else [s]
        try:
            a.validate(step)
        except FlatscopeError as exc:
            raise FlatscopeError(f"{where}: {exc}") from None
        step.group = a.group(step)
        if step.group in groups:
            raise FlatscopeError(f"suite steps {groups[step.group]} and {a.name} would both write /{step.group}")
        groups[step.group] = a.name
        step.metrics = [f"{step.prefix}.{k}" for k in a.metric_keys(step)]
    return steps


def check_metric_names(thresholds: list[Threshold], steps: list[Step], stored: dict | None = None) -> None:
    """Every threshold must name a metric the planned suite (or a stored group) produces (else exit 2)."""
    known = [m for s in steps for m in s.metrics] + list(stored or {})
    for t in thresholds:
        if t.metric in known:
            continue
        group, _, key = t.metric.rpartition(".")
        same_group = [m for m in known if m.rpartition(".")[0] == group]
        words = {w for w in key.split("_") if len(w) > 2}
        hint = [m for m in same_group if words and words <= set(m.rpartition(".")[2].split("_"))]
        hint = hint or difflib.get_close_matches(t.metric, known, n=1, cutoff=0.6)
        msg = f"threshold {t.text!r}: unknown metric {t.metric!r}"
        if hint:
            msg += f"; did you mean {hint[0]!r}?"
        if same_group:
            msg += f" ({group} metrics: {', '.join(m.rpartition('.')[2] for m in same_group)})"
        else:
            groups = sorted({m.rpartition('.')[0] for m in known})
            msg += f" (this suite's metric groups: {', '.join(groups) or 'none'})"
        raise FlatscopeError(msg)


# ------------------------------------------------------------------------------------------- cache
def _canon(x) -> str:
    return json.dumps(store.to_jsonable(x), sort_keys=True)


def cache_status(path: str, step: Step, target: Target) -> tuple[bool, str]:
    """(reusable, reason): whether ``path`` holds a finished ``step.group`` for this checkpoint and options."""
    if not os.path.exists(path):
        return False, "no results file yet"
    with store.open_results(path) as f:
        if step.group not in f:
            return False, f"no /{step.group} in the results file"
        g = f[step.group]
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.attrs.items()}
        if str(attrs.get("kind")) != step.analysis.kind:
            return False, f"/{step.group} holds a {attrs.get('kind')!r} result"
        if attrs.get("checkpoint_sha256") != target.sha256:
            return False, "the stored result is for another checkpoint (sha256 differs)"
        run = target.run
        mine = {"seed": run.seed, "dtype": run.dtype_name, "loss": run.loss_name, "data": json.dumps(target.data_spec)}
        for k, v in mine.items():
            have = attrs.get(k)
            if k == "seed" and have is not None:
                have = int(have)
            if have != v:
                return False, f"{k} was {have} in the stored result, now {v}"
        why = step.analysis.complete(g)
        if why:
            return False, why
        try:
            stored = json.loads(attrs.get("options", "{}"))
        except json.JSONDecodeError:
            return False, "the stored options are unreadable"
    stored_cmp = step.analysis.normalize(stored)
    want = dict(step.analysis.expected(step, target))
    want.update(
        split="both" if len(step.splits) == 2 else step.splits[0],
        max_samples=run.max_samples,
        batch_size=run.batch_size,
    )
    mine = result_options(run, with_hvp=False)
    for key in RESULT_DEFAULTS:  # the shared options that change the numbers (the HVP mode only up to rounding)
        if key == "hvp":
            continue
        if key in mine or key in stored_cmp:
            want[key] = mine.get(key, RESULT_DEFAULTS[key])
    for k, v in want.items():
        if _canon(stored_cmp.get(k)) != _canon(v):
            return False, f"option {k} was {_canon(stored.get(k))} in the stored result, now {_canon(v)}"
    return True, "same checkpoint and options"


# --------------------------------------------------------------------------------------- execution
STORED_KINDS = ("track",)


def stored_metrics(path: str) -> dict:
    """``{"<group>.<key>": value}`` from the summaries of the :data:`STORED_KINDS` groups in ``path``."""
    if not os.path.exists(path):
        return {}
    out = {}
    with store.open_results(path) as f:
        for name, g in store.find_analyses(f):
            if str(g.attrs["kind"]) in STORED_KINDS:
                for k, v in json.loads(g.attrs.get("summary", "{}")).items():
                    if not isinstance(v, str):
                        out[f"{name.replace('/', '.')}.{k}"] = metric_value(v)
    return out


def metric_value(v):
    if isinstance(v, (bool, np.bool_)):
        return int(bool(v))
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(float(v)) else None
    return None


@dataclass
class StepRecord:
    analysis: str
    group: str
    cached: bool
    reason: str
    seconds: float  # this audit's time on the step (reading it, or computing it)
    command: str  # the equivalent flatscope command line
    options: dict  # the stored options attr
    summary: dict  # the stored summary attr
    wall_time_s: float | None  # how long the stored computation took
    warnings: list = field(default_factory=list)  # the warnings stored with the group (also when reused)

    def to_json(self) -> dict:
        return {
            "analysis": self.analysis,
            "group": f"/{self.group}",
            "cached": self.cached,
            "reason": self.reason,
            "seconds": self.seconds,
            "wall_time_s": self.wall_time_s,
            "command": self.command,
            "options": self.options,
            "warnings": self.warnings,
        }


def read_group(path: str, group: str) -> tuple[dict, dict, float | None, list]:
    """The stored summary, options, computing time and warnings of ``group``."""
    with store.open_results(path) as f:
        g = f[group]
        summary = json.loads(g.attrs.get("summary", "{}"))
        options = json.loads(g.attrs.get("options", "{}"))
        wall = g.attrs.get("wall_time_s")
        warnings = store.stored_warnings(g)
    return summary, options, (float(wall) if wall is not None else None), warnings


@contextlib.contextmanager
def _step_run(run, step: Step):
    """``run`` as the step's command would see it: the step's split, quiet (the audit says what it
    does), the clock and the seed reset, and only this step's warnings stored with its group."""
    saved = run.split, run.quiet, run.started
    run.split = "both" if len(step.splits) == 2 else step.splits[0]
    run.quiet = True
    run.started = time.time()
    run._warnings_saved = len(run.warnings)
    run.reseed()
    try:
        yield run
    finally:
        run.split, run.quiet, run.started = saved


def run_steps(
    steps: list[Step], run, *, recompute: bool = False, note: Callable[[str], None] = lambda msg: None
) -> list[StepRecord]:
    """Run (or read from the results file) each planned step on ``run``'s checkpoint, in order."""
    target = Target(run)
    path = run.out_path
    records = []
    for step in steps:
        t0 = time.perf_counter()
        if recompute:
            hit, reason = False, "--recompute"
        else:
            hit, reason = cache_status(path, step, target)
        if hit:
            note(f"{step.name}: reusing /{step.group} ({reason})")
            if run.do_plot and run.is_main:
                run.plot(step.group)
        else:
            note(f"{step.name}: computing ({reason})")
            with _step_run(run, step):
                try:
                    extra = {"extra_checkpoints": list(step.extra_checkpoints)} if step.extra_checkpoints else {}
                    step.analysis.step.compute(run, **extra, **step.params)
                except FlatscopeError as exc:
                    raise FlatscopeError(f"{step.name}: {exc}") from None
                if run.do_plot and run.is_main:
                    run.plot(step.group)
        seconds = time.perf_counter() - t0
        if not run.is_main:
            records.append(StepRecord(step.name, step.group, hit, reason, seconds, step.command_line(), {}, {}, None))
            continue
        summary, options, wall, warnings = read_group(path, step.group)
        if not hit:
            note(f"{step.name}: wrote /{step.group} in {seconds:.1f} s")
        else:
            for w in warnings:  # the stored result's warnings still qualify its numbers
                note(f"{step.name}: stored warning: {w}")
        records.append(
            StepRecord(
                step.name, step.group, hit, reason, seconds, step.command_line(), options, summary, wall, warnings
            )
        )
    return records


def collect_metrics(steps: list[Step], records: list[StepRecord]) -> dict:
    """``{"<group>.<key>": value}`` in suite order, from the stored summaries (numbers or None)."""
    out = {}
    for step, rec in zip(steps, records):
        for k, v in rec.summary.items():
            if isinstance(v, str):
                continue
            out[f"{step.prefix}.{k}"] = metric_value(v)
    return out


@dataclass
class Outcome:
    threshold: Threshold
    value: float | None
    failed: bool
    message: str

    def to_json(self) -> dict:
        t = self.threshold
        return {
            "threshold": t.text,
            "metric": t.metric,
            "op": t.op,
            "bound": t.value,
            "value": self.value,
            "failed": self.failed,
            "message": self.message,
        }


def check_thresholds(thresholds: list[Threshold], metrics: dict) -> list[Outcome]:
    out = []
    for t in thresholds:
        failed, msg = t.check(metrics)
        out.append(Outcome(t, metrics.get(t.metric), failed, msg))
    return out


@dataclass
class AuditResult:
    checkpoint: str
    sha256: str
    results: str
    suite: str
    records: list
    metrics: dict
    outcomes: list
    seconds: float

    @property
    def passed(self) -> bool:
        return not any(o.failed for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_json(self) -> dict:
        """The ``--json`` object (schema :data:`AUDIT_SCHEMA`, documented in the README)."""
        return store.to_jsonable(
            {
                "schema": AUDIT_SCHEMA,
                "checkpoint": self.checkpoint,
                "checkpoint_sha256": self.sha256,
                "results": self.results,
                "suite": self.suite,
                "verdict": "pass" if self.passed else "fail",
                "exit_code": self.exit_code,
                "metrics": self.metrics,
                "thresholds": [o.to_json() for o in self.outcomes],
                "failed": [o.threshold.text for o in self.outcomes if o.failed],
                "steps": [r.to_json() for r in self.records],
                "seconds": self.seconds,
            }
        )


def audit(run, suite: Suite, *, recompute: bool = False, note: Callable[[str], None] = lambda m: None) -> AuditResult:
    """Plan the suite (and check the thresholds' metric names) before computing, then run it."""
    t0 = time.perf_counter()
    steps = plan(suite.steps, run)
    stored = stored_metrics(run.out_path)
    check_metric_names(suite.thresholds, steps, stored)
    sha = run.checkpoint.sha256
    records = run_steps(steps, run, recompute=recompute, note=note)
    metrics = collect_metrics(steps, records)
    metrics.update({k: v for k, v in stored_metrics(run.out_path).items() if k not in metrics})
    outcomes = check_thresholds(suite.thresholds, metrics)
    return AuditResult(
        os.path.abspath(run.checkpoint_path),
        sha,
        os.path.abspath(run.out_path),
        suite.source,
        records,
        metrics,
        outcomes,
        time.perf_counter() - t0,
    )
