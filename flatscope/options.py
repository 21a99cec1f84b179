"""The options of each analysis, declared once: for its command, the audit, ``compare``, caching and ``show``.

No torch and no click here, so that ``flatscope <command> --help`` and usage errors answer without
importing torch. An :class:`Option` states an option's name (the key in a suite table, in
``--set ANALYSIS.OPTION=VALUE`` and in the stored ``options`` attr: the long flag without its dashes,
``-`` written ``_``), its type, default, help, metavar and choices, and whether it *determines the
result* (``result=True``: two runs that differ in it give different numbers, so the audit's cache keys
on it) or only chooses how the same numbers are computed (``result=False``: batching, chunk sizes,
how work is split across ranks).

- :mod:`flatscope.cli.schema` builds each command's click options from these lists;
- :mod:`flatscope.audit` converts and checks a suite's step options with :meth:`Option.convert`
  (the same types, choices and bounds as the command line) and keys its cache on the ``result`` ones;
- :mod:`flatscope.steps` runs each analysis from the converted options.

Adding an option to an analysis is one :class:`Option` in its list below, plus its use in the step
(``flatscope/steps/<analysis>.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_OPTION_INT = 2**53  # larger whole numbers are not option values (and overflow torch and numpy)

# choices (the analysis modules hold the same tuples; tests/test_options.py checks they agree)
TRACE_METHODS = ("hutch++", "hutchinson")
NOISES = ("multiplicative", "additive", "filter")
BN_MODES = ("eval", "recompute")
BATCHED = ("auto", "on", "off")
DEFAULT_SIGMA = "0.01..1"
LANDSCAPE_KINDS = ("random", "interp", "hessian", "pca")
NORMALIZATIONS = ("filter", "layer", "none")
BIAS_BN = ("zero", "include")
BATCHING = ("auto", "vmap", "loop")
PARALLEL = ("data", "points")
SHARPNESS_NORMS = ("l2", "linf")
AVERAGES = ("surface", "gaussian")
DEFAULT_RHO = "0.01..1:5"
FULL_BATCH_MAX_SAMPLES = 4096

TYPES = ("str", "int", "float", "bool", "choice")


@dataclass(frozen=True)
class Option:
    """One option of an analysis.

    ``type``: ``str`` (parsed by the step: σ grids, ranges, numbers given as text), ``int``, ``float``,
    ``choice`` (one of ``choices``) or ``bool`` (a switch: ``--flag``, or ``--flag/--off`` when ``off``
    names the off flag). ``minimum``: the least value of an int or float. ``dest``: the name of the
    step's parameter (default ``name``). ``aliases``: more long flags. ``audit``: whether a suite step
    may set it (options that read other files or resume a run are the command's only).
    """

    name: str
    type: str = "str"
    default: object = None
    help: str = ""
    metavar: str | None = None
    choices: tuple = ()
    result: bool = True
    dest: str | None = None
    aliases: tuple = ()
    off: str | None = None
    minimum: float | None = None
    audit: bool = True
    show_default: bool = True

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"option {self.name}: unknown type {self.type!r}")
        if (self.type == "choice") != bool(self.choices):
            raise ValueError(f"option {self.name}: choices go with type 'choice'")

    @property
    def param(self) -> str:
        """The step's parameter name."""
        return self.dest or self.name

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def convert(self, value, where: str):
        """A suite value (TOML or ``--set``: bool, int, float, str or a list) as the command line would
        parse it; :class:`FlatscopeError` naming ``where`` and the option otherwise."""
        from .errors import FlatscopeError

        def bad(msg: str):
            return FlatscopeError(f"{where}: option {self.name}: {msg}")

        if self.type == "bool":
            if not isinstance(value, bool):
                raise FlatscopeError(f"{where}: option {self.name} is a switch; give true or false, not {value!r}")
            return value
        if isinstance(value, bool):
            raise FlatscopeError(f"{where}: option {self.name} takes a value, not {str(value).lower()}")
        if isinstance(value, (list, tuple)):
            if not value or not all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value):
                raise bad("a list must hold numbers or strings")
            if len(value) > 10_000:
                raise bad(f"a list of {len(value)} values is too long (at most 10000)")
            for v in value:
                check_number(v, f"{where}: option {self.name}")
            value = ",".join(str(v) for v in value)
        if not isinstance(value, (int, float, str)):
            raise bad(f"unsupported value {value!r}")
        check_number(value, f"{where}: option {self.name}")
        invalid = f"{where}: invalid value for {self.flag}: "
        out: float
        if self.type == "int":
            try:
                out = value if isinstance(value, int) else int(str(value).strip())
            except ValueError:
                raise FlatscopeError(f"{invalid}{value!r} is not a valid integer") from None
            if isinstance(value, float):
                raise FlatscopeError(f"{invalid}{value!r} is not a valid integer")
        elif self.type == "float":
            try:
                out = float(value)
            except ValueError:
                raise FlatscopeError(f"{invalid}{value!r} is not a valid float") from None
            check_number(out, f"{where}: option {self.name}")
        elif self.type == "choice":
            text = str(value)
            if text not in self.choices:
                raise FlatscopeError(f"{invalid}{text!r} is not one of {', '.join(map(repr, self.choices))}")
            return text
        else:
            return str(value)
        if self.minimum is not None and out < self.minimum:
            raise FlatscopeError(f"{invalid}{out} is not in the range x>={self.minimum:g}")
        return out


def check_number(v, where: str):
    """Refuse whole numbers beyond 2**53 and NaN/Inf (the command line refuses them too)."""
    from .errors import FlatscopeError

    if isinstance(v, bool):
        return v
    if isinstance(v, int) and abs(v) > MAX_OPTION_INT:
        raise FlatscopeError(f"{where}: {v} is too large for an option value (at most {MAX_OPTION_INT})")
    if isinstance(v, float) and not math.isfinite(v):
        raise FlatscopeError(f"{where}: {v} is not a finite number")
    return v


def parallel(what: str) -> Option:
    """``--parallel data|points`` of the analyses that split grid points or noise draws across ranks."""
    return Option(
        "parallel",
        "choice",
        "data",
        f"Under torchrun: shard the data across ranks (data), or give every rank the whole data and a "
        f"share of the {what} (points). No effect in one process.",
        choices=PARALLEL,
        result=False,
    )


HESSIAN = (
    Option("top", "int", 10, "How many of the largest eigenvalues to compute (Lanczos).", "K"),
    Option("bottom", "int", 0, "Also the K smallest (most negative) eigenvalues.", "K"),
    Option("density", "bool", True, "Spectral density by stochastic Lanczos quadrature.", off="--no-density"),
    Option("probes", "int", 8, "Random probes for the density (each runs --steps Lanczos steps).", "N"),
    Option("steps", "int", 80, "Lanczos steps per density probe (M-point Gauss rule).", "M"),
    Option(
        "slq_reorth",
        "choice",
        "full",
        "Density probes: full reorthogonalization (M vectors a probe) or none (the three-term recurrence, "
        "2 vectors a probe: the moments stay exact, converged outliers get ghost copies).",
        choices=("full", "none"),
    ),
    Option(
        "sigma",
        "float",
        0.01,
        "Gaussian broadening of the density, as a fraction of the spread of the Ritz nodes.",
        "S",
    ),
    Option(
        "trace_probes",
        "int",
        60,
        "Hessian-vector products for the trace estimate (exact when N >= parameter count).",
        "N",
    ),
    Option("trace_method", "choice", "hutch++", "Trace estimator.", choices=TRACE_METHODS),
    Option("per_layer", "bool", False, "Top eigenvalue and trace of every parameter tensor's block."),
    Option(
        "save_eigenvectors",
        "bool",
        False,
        "Store the top eigenvectors (k x dim) and the parameter layout (for landscape directions).",
    ),
    Option("tol", "float", 1e-5, "Converged when ||Hv - lambda v|| <= TOL * |lambda_max|."),
    Option(
        "max_iter",
        "int",
        None,
        "Most Hessian-vector products per Lanczos run [default: max(300, 30 K)].",
        "N",
        show_default=False,
    ),
    Option(
        "block_size",
        "int",
        1,
        "Lanczos block size; use B >= multiplicity to resolve exactly repeated eigenvalues.",
        "B",
    ),
    Option(
        "max_basis",
        "int",
        None,
        "Lanczos vectors kept before a thick restart (memory: M vectors) [default: max(3 K + 30, "
        "2**26 / parameters), lowered to fit --memory-budget].",
        "M",
        show_default=False,
        result=False,
    ),
)

LOCAL_ENERGY = (
    Option(
        "sigma",
        "str",
        DEFAULT_SIGMA,
        "Noise scales: a..b (10 log-spaced), a..b:N, a..b:N:lin|log, or a comma list "
        "(items may be ranges), e.g. 0.05,0.1,0.2.",
        "SPEC",
        dest="sigma_spec",
    ),
    Option(
        "samples",
        "str",
        "32",
        "Noise draws per σ (at least 2); the same draws are used at every σ and on every split.",
        "N",
    ),
    Option(
        "noise",
        "choice",
        "multiplicative",
        "w + σ z⊙w (multiplicative), w + σ z (additive), or filter-normalized z (Li et al.; "
        "1-D tensors count as one filter).",
        choices=NOISES,
    ),
    Option(
        "params",
        "str",
        "all",
        "Which parameters get noise: all, weights (tensors of 2+ dims: no biases, no BN), "
        "or a regex on parameter names.",
        "all|weights|REGEX",
    ),
    Option(
        "bn",
        "choice",
        "eval",
        "BatchNorm: keep the running statistics (eval), or recompute them on the training "
        "inputs at every perturbed point (recompute).",
        choices=BN_MODES,
    ),
    Option(
        "target_error",
        "str",
        None,
        "Also find the σ at which the mean error rate has risen by EPS (in (0, 1]), by bisection on the same "
        "draws; with --metric, the σ at which the metric has fallen by EPS (the error is 1 - metric).",
        "EPS",
        aliases=("--target",),
        show_default=False,
    ),
    Option(
        "batched",
        "choice",
        "auto",
        "Evaluate draws in one vmapped call (on) or one at a time (off); auto: batched on "
        "CUDA, one at a time on CPU (faster there, see benchmarks/RESULTS.md).",
        choices=BATCHED,
        result=False,
    ),
    Option(
        "chunk",
        "str",
        "16",
        "Draws per vmapped call when batched (memory grows with N); under --parallel points "
        "the unit dealt to the ranks.",
        "N",
        result=False,
    ),
    parallel("noise draws"),
)

LANDSCAPE = (
    Option(
        "2d",
        "bool",
        None,
        "A 2-D plane or a 1-D line. Default: 1-D, except PCA and three checkpoints (2-D).",
        dest="two_d",
        off="--1d",
        show_default=False,
    ),
    Option(
        "directions",
        "choice",
        None,
        "random (default), interp (implied by 2-3 checkpoints), hessian (top eigenvectors of the "
        "train loss: stored or computed), pca (of the training trajectory).",
        choices=LANDSCAPE_KINDS,
        dest="kind",
        audit=False,
        show_default=False,
    ),
    Option(
        "range",
        "str",
        None,
        "Coordinates along x (and y). Default -1:1; interp -0.5:1.5; pca 1.25x the path's extent; "
        "--directions-from the stored slice's.",
        "LO:HI[,LO:HI]",
        dest="range_text",
    ),
    Option(
        "grid",
        "str",
        None,
        "Points along x (and y), at least 2. Default 51 (or the stored slice's). Use an odd N "
        "with a symmetric range so that 0 (the checkpoint) is a grid point.",
        "N[,M]",
        dest="grid_text",
    ),
    Option(
        "norm",
        "choice",
        "filter",
        "Random directions: rescale each filter (Li et al. 2018) or layer to w's norm, or not at all.",
        choices=NORMALIZATIONS,
    ),
    Option(
        "bias_bn",
        "choice",
        "zero",
        "Random directions: zero 1-D parameters (biases, BatchNorm affine) or include them.",
        choices=BIAS_BN,
    ),
    Option("orthogonalize", "bool", False, "Random 2-D: make the second direction exactly orthogonal to the first."),
    Option(
        "hessian_from",
        "str",
        None,
        "File with /hessian/eigenvectors from `flatscope hessian --save-eigenvectors` [default: the "
        "results file if it holds them, else they are computed now by Lanczos].",
        "RESULTS.h5",
        audit=False,
    ),
    Option(
        "trajectory",
        "str",
        None,
        "PCA: folder of checkpoints from `flatscope train --save-every K` (default: <checkpoint>-traj/).",
        "DIR",
        audit=False,
    ),
    Option(
        "directions_from",
        "str",
        None,
        "Reuse the directions of a stored landscape (its parameter layout must match).",
        "RESULTS.h5[:NAME]",
        audit=False,
    ),
    Option(
        "name",
        "str",
        None,
        "Group /landscape/NAME (default random-1d, random-2d, interp, interp-2d, hessian-2d, pca-2d, ...).",
        "NAME",
    ),
    Option(
        "resume",
        "bool",
        False,
        "Finish an interrupted run of the same command; finished points are kept.",
        audit=False,
        result=False,
    ),
    Option(
        "bn",
        "choice",
        "eval",
        "BatchNorm: the checkpoint's running statistics, or recompute them at every point on the train inputs.",
        choices=BN_MODES,
    ),
    Option(
        "batching",
        "choice",
        "auto",
        "Several points per vmapped call, or one point per call; auto follows the rule in the README.",
        choices=BATCHING,
        result=False,
    ),
    Option(
        "points_per_call",
        "int",
        None,
        "Points per chunk: one vmapped call, or a loop over them (default: about 4096 samples "
        "per vmapped call, 8 to 32 points; 16 for a loop).",
        "M",
        minimum=1,
        result=False,
    ),
    Option(
        "flush_every",
        "float",
        10.0,
        "Write finished points to the results file at most this often (and on exit or Ctrl-C).",
        "SECONDS",
        minimum=0,
        result=False,
    ),
    parallel("grid points"),
)

LOCAL_ENTROPY = (
    Option(
        "gamma",
        "str",
        "0.1x..100x:7",
        "Couplings gamma (the scope is 1/gamma): A..B:K (K log-spaced values), a,b,c, or one value; "
        "an x suffix means times lambda_max (e.g. 0.1x..100x:7).",
        "GRID",
        dest="gamma_spec",
    ),
    Option(
        "beta",
        "str",
        "auto",
        "Inverse temperature; auto = the number of samples N of the split (exp(-N L) is the likelihood "
        "under cross-entropy). Entropy-SGD's noise eps=1e-4 is beta = 2/eps^2 = 2e8.",
        "auto|FLOAT",
        dest="beta_spec",
    ),
    Option(
        "sampler",
        "choice",
        "sgld",
        "sgld: Langevin (Entropy-SGD's inner loop; full-batch or minibatch gradients, see --minibatch); "
        "mala: full batch, Metropolis-adjusted (exact; small models).",
        choices=("sgld", "mala"),
    ),
    Option(
        "integrator",
        "choice",
        "lm",
        "SGLD noise: lm = sqrt(2 eta/beta)(xi_t + xi_t+1)/2 (Leimkuhler-Matthews: exact variance on "
        "quadratics, same cost); euler = sqrt(2 eta/beta) xi_t (Welling & Teh, Entropy-SGD).",
        choices=("lm", "euler"),
    ),
    Option("steps", "int", 1000, "Kept sampling steps per gamma and chain."),
    Option("burn_in", "int", 200, "Discarded steps per gamma before --steps."),
    Option("thin", "int", 10, "Store every THIN-th step in the traces (averages use every kept step)."),
    Option("chains", "int", 8, "Independent chains (batched with vmap); standard errors come from their spread."),
    Option(
        "step_size",
        "str",
        "auto",
        "Langevin step eta (learning-rate units); auto = C/(lambda_max + gamma) with C = 0.25 for sgld "
        "(0.1 with --integrator euler), adapted in burn-in to acceptance 0.574 for mala.",
        "auto|auto:C|ETA",
        dest="step_spec",
    ),
    Option(
        "minibatch",
        "str",
        None,
        "SGLD minibatch size (drawn with replacement per chain and step); full = full batch [default: "
        f"full for splits of at most {FULL_BATCH_MAX_SAMPLES} samples, else 64]. With a minibatch, half "
        "the chains use M and half 2M: the minibatch bias is estimated from the two and folded into "
        "the errors. MALA always uses the full batch.",
        "M|full",
        dest="minibatch_spec",
        show_default=False,
    ),
    Option("is_samples", "int", 256, "Importance-sampling draws per gamma for the gradient-free cross-check (0: off)."),
    Option(
        "lambda_max",
        "float",
        None,
        "Top Hessian eigenvalue for the step rule and x-relative grids (default: 20 power iterations).",
        "FLOAT",
        show_default=False,
    ),
    Option(
        "warm_start",
        "choice",
        "previous",
        "previous: chains continue from the next larger gamma (widened by the extra prior variance); "
        "center: fresh draws from N(w, I/(beta gamma)).",
        choices=("previous", "center"),
    ),
    Option(
        "chain_mode",
        "choice",
        "auto",
        "How chains share a step: vmap (one batched call) or loop; auto = vmap for >= 8 chains with "
        "small per-chain calls (rows x parameters <= 2e6), loop otherwise (measured faster there).",
        choices=("auto", "vmap", "loop"),
    ),
)

SHARPNESS = (
    Option(
        "rho",
        "str",
        DEFAULT_RHO,
        "Radii ρ > 0: a..b (10 log-spaced), a..b:N, a..b:N:lin|log, or a comma list, e.g. 0.05,0.1.",
        "SPEC",
        dest="rho_spec",
    ),
    Option("norm", "choice", "l2", "The ball: ‖δ ⊘ c‖₂ ≤ ρ (l2) or ‖δ ⊘ c‖∞ ≤ ρ (linf).", choices=SHARPNESS_NORMS),
    Option(
        "adaptive",
        "bool",
        True,
        "Scale the ball elementwise by c = |w| + η (adaptive, invariant to layer rescaling) or not (c = 1).",
        off="--no-adaptive",
    ),
    Option(
        "eta",
        "str",
        "0",
        "η in c = |w| + η (adaptive only); 0 as in Andriushchenko et al. 2023, 0.01 is ASAM's ball.",
        "ETA",
    ),
    Option("steps", "str", "20", "Projected gradient-ascent steps per restart (one gradient over the data each).", "N"),
    Option(
        "step_size",
        "str",
        "1",
        "First ascent step, as a fraction of ρ; halved whenever a step does not raise the loss.",
        "A",
    ),
    Option(
        "restarts",
        "str",
        "1",
        "Ascents per ρ: the first from δ = 0, the others from seeded random points of the ball.",
        "R",
    ),
    Option(
        "m",
        "str",
        None,
        "m-sharpness: the mean over disjoint sub-batches of M samples of each one's worst case.",
        "M",
        show_default=False,
    ),
    Option(
        "average",
        "choice",
        "surface",
        "Average case over the ball's surface (uniform) or a Gaussian of the same second moment.",
        choices=AVERAGES,
    ),
    Option("samples", "str", "16", "Average-case draws (0: skip the average case); the same draws at every ρ.", "N"),
    Option(
        "params",
        "str",
        "all",
        "Which parameters may move: all, weights (tensors of 2+ dims), or a regex on names.",
        "all|weights|REGEX",
    ),
)

# analysis name -> its options (the command of analysis ``local_energy`` is ``flatscope local-energy``)
SCHEMAS = {
    "hessian": HESSIAN,
    "local_energy": LOCAL_ENERGY,
    "landscape": LANDSCAPE,
    "local_entropy": LOCAL_ENTROPY,
    "sharpness": SHARPNESS,
}


def by_name(options) -> dict[str, Option]:
    return {o.name: o for o in options}


def defaults(options) -> dict:
    """``{param: default}``: a step's parameters when nothing is set."""
    return {o.param: o.default for o in options}


def result_names(options) -> list[str]:
    """The names of the options that determine the result (what a cache keys on)."""
    return [o.name for o in options if o.result]


def stored_result_options(kind: str, stored: dict) -> dict:
    """Of a group's stored ``options``, the declared options of analysis ``kind`` that determine its
    numbers (what ``flatscope show`` prints; {} for kinds without declarations, e.g. ``track``)."""
    return {o.name: stored[o.name] for o in SCHEMAS.get(kind, ()) if o.result and o.name in stored}
