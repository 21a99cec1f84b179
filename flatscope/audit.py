"""Audits: a suite of flatness analyses run on a checkpoint, named metrics, thresholds and a verdict.

A *suite* is an ordered list of *steps*. A step is one flatscope analysis command run with given
options, executed by the command's own code: the step ``hessian`` with ``{"top": 3}`` is exactly
``flatscope hessian CKPT --top 3 ...`` (its option names are the command's long flags without the
dashes), so it writes the very HDF5 group that command writes and nothing is re-implemented here.
Each step's equivalent command line is recorded (:attr:`StepRecord.command`).

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
- attr ``options`` (JSON) equal to this step's options in every key that determines the result
  (all of them, plus ``split``, ``max_samples`` and ``batch_size``; the keys that only choose how the
  numbers are computed, equal up to rounding, are ignored: the Hessian's ``hvp`` mode,
  local energy's ``batched`` and ``chunk``, the landscape's ``batching`` and ``points_per_call``), and
- a complete result (a landscape with every point done, a Hessian without a non-finite stop).

``recompute=True`` always recomputes. The device is not part of the key (CPU and CUDA agree up to
rounding).

Stored metrics. Groups written during training rather than by an analysis (:data:`STORED_KINDS`:
``/track`` of ``flatscope train --track``) are read, never computed: when the results file holds
one, its summary keys are metrics too (``track.lambda_max_last``, ``track.lambda_max_max``).

Adding an analysis is one entry in :data:`ANALYSES`: the command module, the audit defaults, the
group it writes, how its stored options compare, and its summary keys.
"""

from __future__ import annotations

import difflib
import importlib
import json
import math
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Callable

import click
import numpy as np

from .errors import FlatscopeError
from .results import find_analyses, open_results, to_jsonable
from .shared_options import ANALYSIS_KEYS, COMMON_KEYS, RESULT_DEFAULTS, result_options
from .thresholds import Threshold, parse_threshold

AUDIT_SCHEMA = "flatscope.audit/1"

# Options every analysis command shares (flatscope/cli/common.py): a step does not set them, the
# audit passes its own (except ``split``, which a step may override).
_SHARED = ("checkpoints",) + COMMON_KEYS + ANALYSIS_KEYS
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
    """One kind of audit step: a flatscope analysis command and how to read and cache its result."""

    name: str
    command: str  # module flatscope/cli/commands/<command>.py
    kind: str  # the group's ``kind`` attr
    defaults: dict  # audit defaults (option name -> value)
    in_default_suite: bool
    group: Callable[["Step"], str]  # the HDF5 group the step writes
    expected: Callable[["Step", Target], dict]  # stored options that must match for a cache hit
    metric_keys: Callable[["Step"], list]  # the summary keys the result will have
    normalize: Callable[[dict], dict] = lambda stored: stored  # stored options -> comparable form
    complete: Callable[[object], str | None] = lambda g: None  # why a stored group is unusable
    denied: tuple = ()  # command options an audit step may not set
    validate: Callable[["Step"], None] = lambda step: None  # option checks that need no data (at plan time)
    describe: str = ""


def _hessian_keys(step: "Step") -> list:
    from .analyses.hessian import HessianResult

    return list(HessianResult(dim=0, n_samples=0, k=1, top=None).summary())


def _one_split(name: str):
    def group(step: "Step") -> str:
        if len(step.splits) != 1:
            raise FlatscopeError(
                f"suite step {name} analyses one split: set split = \"train\" or \"test\" in its "
                f"table (e.g. --set {name}.split=train)"
            )
        return name

    return group


def _hessian_complete(g) -> str | None:
    if "nonfinite" in g.attrs:
        return "the stored run stopped at a non-finite Hessian-vector product"
    if "eigenvalues" not in g:
        return "the stored group has no eigenvalues"
    return None


def _local_energy_expected(step: "Step", target: Target) -> dict:
    from .analyses.local_energy import parse_sigmas
    from .cli.commands.local_energy import _whole

    p = step.params
    eps = p["target_error"]
    if eps is not None:
        try:
            eps = float(eps)
        except ValueError:
            raise FlatscopeError(f"--target-error {eps!r} is not a number") from None
    bn = p["bn"]
    if bn == "recompute" and not target.has_batchnorm:
        bn = "eval"  # the command does the same (with a warning)
    return {
        "sigma": parse_sigmas(p["sigma_spec"]).tolist(),
        "samples": _whole(p["samples"], "--samples", 2),
        "noise": p["noise"],
        "params": p["params"],
        "bn": bn,
        "target_error": eps,
    }


def _local_energy_validate(step: "Step") -> None:
    from .analyses.local_energy import parse_sigmas
    from .cli.commands.local_energy import _whole

    p = step.params
    parse_sigmas(p["sigma_spec"])
    _whole(p["samples"], "--samples", 2)
    _whole(p["chunk"], "--chunk", 1)
    if p["target_error"] is not None:
        try:
            eps = float(p["target_error"])
        except ValueError:
            raise FlatscopeError(f"--target-error {p['target_error']!r} is not a number") from None
        if not 0 < eps <= 1:
            raise FlatscopeError(f"--target-error must be in (0, 1] (a rise of the error rate), got {eps:g}")


def _local_energy_normalize(stored: dict) -> dict:
    from .analyses.local_energy import parse_sigmas

    out = dict(stored)
    try:
        out["sigma"] = parse_sigmas(stored.get("sigma")).tolist()
    except FlatscopeError:
        out["sigma"] = None
    return out


def _local_energy_keys(step: "Step") -> list:
    from .analyses.local_energy import LocalEnergyResult, SplitCurve, TargetSigma

    curves = {}
    for s in step.splits:
        c = SplitCurve(s, 0.0, 0.0, np.zeros((1, 2)), np.zeros((1, 2)))
        if step.params["target_error"] is not None:
            c.target = TargetSigma(0.0, math.nan, False, 0.0, 0.0, 0.0, math.nan, math.nan, 0, 0)
        curves[s] = c
    res = LocalEnergyResult(
        sigma=np.array([1.0]),
        samples=2,
        noise="",
        params="",
        bn="",
        batched=False,
        chunk=1,
        seed=0,
        n_perturbed=0,
        curves=curves,
    )
    return list(res.summary())


def _landscape_plan(step: "Step") -> tuple[str, int]:
    if step.extra_checkpoints:
        return "interp", len(step.extra_checkpoints)
    return "random", 2 if step.params.get("two_d") else 1


def _landscape_group(step: "Step") -> str:
    from .cli.commands.landscape import _NAME, _default_name

    kind, k = _landscape_plan(step)
    name = step.params.get("name") or _default_name(kind, k, None)
    if not _NAME.match(name):
        raise FlatscopeError(f"landscape name {name!r}: use letters, digits and . _ + - only")
    return f"landscape/{name}"


def _landscape_expected(step: "Step", target: Target) -> dict:
    from .analyses.landscape import parse_grid, parse_range

    p = step.params
    kind, k = _landscape_plan(step)
    random = kind == "random"
    bn = p["bn"]
    if bn == "recompute" and not target.has_batchnorm:
        bn = "eval"
    run = target.run
    return {
        "directions": kind,
        "dims": k,
        "range": [list(r) for r in parse_range(p["range_text"], k, (-1.0, 1.0) if random else (-0.5, 1.5))],
        "grid": parse_grid(p["grid_text"], k),
        "norm": p["norm"] if random else None,
        "bias_bn": p["bias_bn"] if random else None,
        "orthogonalize": bool(p["orthogonalize"]) if random else None,
        "seed": run.seed if random else None,
        "bn": bn,
        "checkpoint_sha256": [target.sha256] + list(step.extra_sha256),
        "dtype": run.dtype_name,
        "loss": run.loss_name,
        "data": target.data_spec,
    }


def _landscape_validate(step: "Step") -> None:
    from .analyses.landscape import parse_grid, parse_range

    kind, k = _landscape_plan(step)
    parse_range(step.params["range_text"], k, (-1.0, 1.0))
    parse_grid(step.params["grid_text"], k)


def _landscape_keys(step: "Step") -> list:
    import torch

    from .analyses.landscape import Grid, LandscapeResult
    from .directions import Directions
    from .params import ParamLayout

    kind, k = _landscape_plan(step)
    dirs = Directions(torch.zeros(k, 1, dtype=torch.float64), ParamLayout(("w",), ((1,),)), kind, {})
    x = np.array([-1.0, 0.0, 1.0])
    res = LandscapeResult("x", dirs, Grid(x, x if k == 2 else None), list(step.splits))
    return list(res.summary())


def _landscape_complete(g) -> str | None:
    if "done" not in g or not bool(np.all(g["done"][()])):
        return "the stored slice is not finished"
    return None


def _local_entropy_norm(opts: dict, strict: bool = False) -> dict:
    from .analyses.local_entropy import parse_gamma
    from .cli.commands.local_entropy import parse_beta, parse_step

    out = dict(opts)
    try:
        grid, relative = parse_gamma(str(opts.get("gamma")))
        out["gamma"] = [grid.tolist(), relative]
        out["beta"] = parse_beta(str(opts.get("beta")))
        out["step_size"] = list(parse_step(str(opts.get("step_size"))))
    except FlatscopeError:
        if strict:
            raise
        out["gamma"] = None
    return out


def _local_entropy_expected(step: "Step", target: Target) -> dict:
    from .analyses.local_entropy import default_minibatch
    from .cli.commands.local_entropy import parse_minibatch

    p = dict(step.params)
    spec = p.pop("minibatch_spec")
    if p["sampler"] == "mala":
        minibatch = None
    elif spec is not None:
        minibatch = parse_minibatch(spec)
    else:  # the command's default depends on the split's size
        minibatch = default_minibatch(len(target.run.split_source(step.splits[0])))
    want = {
        "gamma": p.pop("gamma_spec"),
        "beta": p.pop("beta_spec"),
        "step_size": p.pop("step_spec"),
        "minibatch": minibatch or "full",
        **p,
    }
    return _local_entropy_norm(want)


def _local_entropy_validate(step: "Step") -> None:
    from .cli.commands.local_entropy import parse_minibatch

    p = step.params
    _local_entropy_norm({"gamma": p["gamma_spec"], "beta": p["beta_spec"], "step_size": p["step_spec"]}, strict=True)
    if p["minibatch_spec"] is not None:
        parse_minibatch(p["minibatch_spec"])


def _local_entropy_keys(step: "Step") -> list:
    from .analyses.local_entropy import LocalEntropyResult

    one = {
        k: np.zeros(1)
        for k in (
            "local_entropy",
            "local_entropy_err",
            "mean_loss",
            "mean_sq_dist",
            "grad_norm",
            "rhat",
            "ess",
            "accept_rate",
        )
    }
    res = LocalEntropyResult(
        gamma=np.ones(1),
        beta=1.0,
        n_params=1,
        center_loss=0.0,
        center_grad_norm=0.0,
        lambda_max=0.0,
        lambda_max_source="",
        sampler="",
        chains=1,
        steps=1,
        burn_in=0,
        thin=1,
        minibatch=None,
        warm_start="",
        integrator="",
        per_gamma=one,
        vectors={},
        traces={},
        importance=None,
    )
    return list(res.summary())


def _sharpness_parse(step: "Step") -> dict:
    from .cli.commands.sharpness import parse_options

    p = step.params
    return parse_options(
        p["rho_spec"],
        p["steps"],
        p["step_size"],
        p["restarts"],
        p["eta"],
        p["samples"],
        p["m"],
        p["norm"],
        p["average"],
    )


def _sharpness_expected(step: "Step", target: Target) -> dict:
    o = _sharpness_parse(step)
    p = step.params
    return {
        "rho": o["rhos"].tolist(),
        "norm": p["norm"],
        "adaptive": bool(p["adaptive"]),
        "eta": o["eta"],
        "steps": o["steps"],
        "step_size": o["step_size"],
        "restarts": o["restarts"],
        "m": o["m"],
        "average": p["average"],
        "samples": o["samples"],
        "params": p["params"],
    }


def _sharpness_normalize(stored: dict) -> dict:
    from .analyses.sharpness import parse_rhos

    out = dict(stored)
    try:
        out["rho"] = parse_rhos(str(stored.get("rho"))).tolist()
    except FlatscopeError:
        out["rho"] = None
    return out


def _sharpness_keys(step: "Step") -> list:
    from .analyses.sharpness import summary_keys

    return summary_keys(step.splits)


ANALYSES: dict[str, Analysis] = {
    a.name: a
    for a in [
        Analysis(
            name="hessian",
            command="hessian",
            kind="hessian",
            in_default_suite=True,
            defaults={"top": 3, "density": False, "trace_probes": 30},
            group=_one_split("hessian"),
            expected=lambda step, target: {k: v for k, v in step.params.items() if k != "hvp"},
            metric_keys=_hessian_keys,
            complete=_hessian_complete,
            describe="top eigenvalues (Lanczos) and the trace (Hutch++)",
        ),
        Analysis(
            name="local_energy",
            command="local_energy",
            kind="local_energy",
            in_default_suite=True,
            defaults={"sigma": "0.01..1:5", "samples": 8, "target_error": 0.01},
            group=lambda step: "local_energy",
            expected=_local_energy_expected,
            normalize=_local_energy_normalize,
            metric_keys=_local_energy_keys,
            validate=_local_energy_validate,
            describe="δE(σ) of loss and error under multiplicative weight noise, and the σ where the error rises by ε",
        ),
        Analysis(
            name="landscape",
            command="landscape",
            kind="landscape",
            in_default_suite=True,
            defaults={"grid": 21},
            denied=("directions", "hessian_from", "trajectory", "directions_from", "resume"),
            group=_landscape_group,
            expected=_landscape_expected,
            metric_keys=_landscape_keys,
            complete=_landscape_complete,
            validate=_landscape_validate,
            describe="loss along a filter-normalized random direction (Li et al. 2018)",
        ),
        Analysis(
            name="local_entropy",
            command="local_entropy",
            kind="local_entropy",
            in_default_suite=False,
            defaults={"gamma": "0.1..10:5", "steps": 200, "burn_in": 50, "chains": 4, "is_samples": 0},
            group=_one_split("local_entropy"),
            expected=_local_entropy_expected,
            normalize=_local_entropy_norm,
            metric_keys=_local_entropy_keys,
            validate=_local_entropy_validate,
            describe="local entropy F(γ) by Langevin sampling (optional: add it with --step or a [local_entropy] table)",
        ),
        Analysis(
            name="sharpness",
            command="sharpness",
            kind="sharpness",
            in_default_suite=False,
            defaults={"rho": "0.1..1:3", "steps": 10, "samples": 8},
            group=lambda step: "sharpness",
            expected=_sharpness_expected,
            normalize=_sharpness_normalize,
            metric_keys=_sharpness_keys,
            validate=lambda step: _sharpness_parse(step) and None,
            describe="worst-case and average-case adaptive sharpness (Andriushchenko et al. 2023; optional: add it "
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


# ---------------------------------------------------------------------------------------- commands
def command_of(a: Analysis) -> click.Command:
    return importlib.import_module(f"flatscope.cli.commands.{a.command}").command


def _callback(cmd: click.Command) -> Callable:
    """The command's function, without the CLI's error handler (errors reach the audit as exceptions)."""
    cb = cmd.callback
    if getattr(cb, "_handles_errors", False):
        cb = cb.__wrapped__
    return cb


def option_table(a: Analysis) -> dict[str, click.Option]:
    """Option name (the long flag without dashes, ``-`` as ``_``) -> click option, for the step options."""
    out = {}
    for p in command_of(a).params:
        if not isinstance(p, click.Option) or (p.name in _SHARED and p.name not in _STEP_SHARED):
            continue
        longs = [o for o in p.opts if o.startswith("--")]
        if not longs:
            continue
        key = longs[0][2:].replace("-", "_")
        if key in a.denied:
            continue
        out[key] = p
    return out


def _tokens(key: str, opt: click.Option, value, where: str) -> list[str]:
    flag = next(o for o in opt.opts if o.startswith("--"))
    if opt.is_flag:
        if not isinstance(value, bool):
            raise FlatscopeError(f"{where}: option {key} is a switch; give true or false, not {value!r}")
        if value:
            return [flag]
        off = [o for o in opt.secondary_opts if o.startswith("--")]
        return [off[0]] if off else []
    if isinstance(value, bool):
        raise FlatscopeError(f"{where}: option {key} takes a value, not {str(value).lower()}")
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value):
            raise FlatscopeError(f"{where}: option {key}: a list must hold numbers or strings")
        if len(value) > 10_000:
            raise FlatscopeError(f"{where}: option {key}: a list of {len(value)} values is too long (at most 10000)")
        for v in value:
            if isinstance(v, int):
                _bounded_int(v, f"{where}: option {key}")
            elif isinstance(v, float):
                _finite(v, f"{where}: option {key}")
        value = ",".join(str(v) for v in value)
    if not isinstance(value, (int, float, str)):
        raise FlatscopeError(f"{where}: option {key}: unsupported value {value!r}")
    if isinstance(value, int):
        _bounded_int(value, f"{where}: option {key}")
    if isinstance(value, float):
        _finite(value, f"{where}: option {key}")
    return [flag, str(value)]


def parse_value(text: str):
    """A ``--set`` value: true/false, an integer, a float, else the text itself."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if re.fullmatch(r"[+-]?\d+", t, re.ASCII):
        return _bounded_int(int(t), "--set")
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", t, re.ASCII):
        return _finite(float(t), "--set")
    return t


MAX_OPTION_INT = 2**53  # larger whole numbers are not option values (and overflow torch and numpy)


def _bounded_int(v: int, where: str) -> int:
    if abs(v) > MAX_OPTION_INT:
        raise FlatscopeError(f"{where}: {v} is too large for an option value (at most {MAX_OPTION_INT})")
    return v


def _finite(v: float, where: str) -> float:
    if not math.isfinite(v):
        raise FlatscopeError(f"{where}: {v} is not a finite number")
    return v


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
        return shlex.join(["flatscope", command_of(self.analysis).name] + self.argv)


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
    """Parse every step's options with its command's own parser and predict groups and metric names.

    Nothing is loaded or computed. Unknown options, bad values (the command's click types and choices,
    and the checks of :attr:`Analysis.validate`: σ and γ grids, ranges, grids, bounds) and steps that
    would write the same group fail here, as :class:`FlatscopeError` naming the step.
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
        for key, value in opts.items():
            if key not in table:
                hint = difflib.get_close_matches(key, list(table), n=1)
                denied = (
                    f" (not available in an audit; run flatscope {command_of(a).name} directly)"
                    if key in a.denied
                    else ""
                )
                raise FlatscopeError(
                    f"{where}: unknown option {key!r}{denied}"
                    + (f"; did you mean {hint[0]!r}?" if hint and not denied else "")
                    + f" (options: {', '.join(sorted(table))})"
                )
            argv += _tokens(key, table[key], value, where)
        cmd = command_of(a)
        try:
            ctx = cmd.make_context(f"flatscope {cmd.name}", list(argv))
        except click.exceptions.Exit:
            raise FlatscopeError(f"{where}: unexpected option") from None
        except click.ClickException as exc:
            raise FlatscopeError(f"{where}: {exc.format_message()}") from None
        step.argv = argv
        step.params = {k: v for k, v in ctx.params.items() if k not in _SHARED}
        s = ctx.params.get("split", run.split)
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
    return json.dumps(to_jsonable(x), sort_keys=True)


def cache_status(path: str, step: Step, target: Target) -> tuple[bool, str]:
    """(reusable, reason): whether ``path`` holds a finished ``step.group`` for this checkpoint and options."""
    if not os.path.exists(path):
        return False, "no results file yet"
    with open_results(path) as f:
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
    for key in ("label_smoothing", "metric", "output"):
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
    with open_results(path) as f:
        for name, g in find_analyses(f):
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
        }


def read_group(path: str, group: str) -> tuple[dict, dict, float | None]:
    with open_results(path) as f:
        g = f[group]
        summary = json.loads(g.attrs.get("summary", "{}"))
        options = json.loads(g.attrs.get("options", "{}"))
        wall = g.attrs.get("wall_time_s")
    return summary, options, (float(wall) if wall is not None else None)


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
            cmd = command_of(step.analysis)
            try:
                ctx = cmd.make_context(f"flatscope {cmd.name}", list(step.argv))
                with ctx:
                    ctx.invoke(_callback(cmd), **ctx.params)
            except FlatscopeError as exc:
                raise FlatscopeError(f"{step.name}: {exc}") from None
            except click.ClickException as exc:
                raise FlatscopeError(f"{step.name}: {exc.format_message()}") from None
        seconds = time.perf_counter() - t0
        if not run.is_main:
            records.append(StepRecord(step.name, step.group, hit, reason, seconds, step.command_line(), {}, {}, None))
            continue
        summary, options, wall = read_group(path, step.group)
        if not hit:
            note(f"{step.name}: wrote /{step.group} in {seconds:.1f} s")
        records.append(
            StepRecord(step.name, step.group, hit, reason, seconds, step.command_line(), options, summary, wall)
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
        return to_jsonable(
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
