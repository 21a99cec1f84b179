"""What every command shares: options, the :class:`Run` context, output, progress, errors.

Commands stay thin: parse options, build objectives with :meth:`Run.objective`, call a library
function, then :meth:`Run.save` (HDF5 with provenance), :meth:`Run.plot` and :meth:`Run.emit`
(one JSON object with ``--json``, a human summary otherwise).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from .. import __version__
from ..errors import FlatscopeError
from ..lazy import lazy_module
from ..threads import choose_threads
from ..shared_options import ANALYSIS_KEYS, COMMON_KEYS, result_options

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .. import distributed
    from .. import results as store
    from ..checkpoint import Checkpoint
    from ..data import Dataset
    from ..objective import Objective
else:  # imported on first use, so that --help and usage errors answer without torch
    np = lazy_module("numpy")
    torch = lazy_module("torch")
    distributed = lazy_module("flatscope.distributed")
    store = lazy_module("flatscope.results")

STATE = {"verbose": False}
_TORCH_THREADS: list[int] = []  # torch's own default thread count, read before any command changes it


def _json_dict(ctx, param, value):
    if value is None:
        return None
    try:
        out = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}") from None
    if not isinstance(out, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"widths\": [64, 64]}'")
    return out


def _set_verbose(ctx, param, value):
    STATE["verbose"] = bool(value)  # per invocation (CliRunner runs many in one process)
    return value


def common_options(f: Callable) -> Callable:
    """--device --seed --dtype --threads --json -q -v."""
    opts = [
        click.option(
            "--device",
            default="auto",
            show_default=True,
            metavar="auto|cpu|cuda[:N]",
            help="Where to compute; auto picks CUDA when available.",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for every random draw."),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "float64", "bfloat16", "float16"]),
            default="float32",
            show_default=True,
            help="Precision of the model and data; bfloat16/float16 run forward and backward in that "
            "precision and sum over batches in float32 (the Lanczos recurrence is float64).",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            metavar="N",
            help="torch CPU threads (default: the idle cores, 1 on a busy CPU; OMP_NUM_THREADS if set).",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars, notes or summary tables."),
        click.option(
            "-v",
            "--verbose",
            is_flag=True,
            callback=_set_verbose,
            is_eager=True,
            help="More detail, and the traceback on errors.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def analysis_options(f: Callable) -> Callable:
    """The checkpoint argument and the data/model/output options of every analysis."""
    opts = [
        click.argument("checkpoint", type=click.Path(dir_okay=True)),
        click.option(
            "--model",
            default=None,
            metavar="NAME|torchvision:NAME|hf:DIR|pkg.module:factory",
            help="Architecture for a bare state_dict or .safetensors file (or to override the stored one).",
        ),
        click.option(
            "--model-kwargs",
            default=None,
            callback=_json_dict,
            metavar="JSON",
            help="Keyword arguments for --model, as a JSON object.",
        ),
        click.option(
            "--data",
            default=None,
            metavar="SPEC",
            help="Override the data stored in the checkpoint: digits, mnist1d, teacher, npz:PATH, h5:PATH, "
            "torchvision:NAME, hf-disk:PATH, pkg.module:factory (a Dataset, (X, y) or dict of arrays).",
        ),
        click.option(
            "--data-kwargs",
            default=None,
            callback=_json_dict,
            metavar="JSON",
            help="Keyword arguments for --data, as a JSON object.",
        ),
        click.option(
            "--loss",
            default=None,
            metavar="ce|lm|bce|mse|pkg.module:fn",
            help="Override the checkpoint's loss; lm is next-token cross-entropy over sequences, "
            "pkg.module:fn a function fn(outputs, targets) -> mean loss.",
        ),
        click.option(
            "--label-smoothing", type=float, default=0.0, show_default=True, help="Label smoothing of the ce/lm loss."
        ),
        click.option(
            "--metric",
            default=None,
            metavar="pkg.module:fn",
            help="fn(outputs, targets) -> mean value, reported instead of accuracy.",
        ),
        click.option(
            "--output",
            default=None,
            metavar="KEY",
            help="Which model output the loss is taken of (default: the tensor, .logits, or the first).",
        ),
        click.option(
            "--hvp",
            type=click.Choice(["auto", "exact", "fd", "cached", "double-backward"]),
            default="auto",
            show_default=True,
            help="Hessian-vector products: exact (double backward; cached: each batch's linearization "
            "kept for the next product, double-backward: rebuilt per product, one batch in memory), "
            "fd (central difference of two gradients; works wherever a gradient does), auto "
            "(exact, cached when every batch's linearization fits --memory-budget; fd where a layer has no double "
            "backward, with a note).",
        ),
        click.option(
            "--memory-budget",
            default=None,
            metavar="SIZE",
            help="Most memory the analysis may add to what is loaded, e.g. 4GB, 512MiB, 2G: it decides "
            "whether linearizations are cached, where a Lanczos basis restarts and how many vectors or "
            "points go through one call, never the results [default: half the free memory].",
        ),
        click.option(
            "--basis-device",
            default=None,
            metavar="cpu|cuda[:N]",
            help="Where Lanczos, SLQ and trace vectors live [default: --device]; cpu keeps them off the GPU.",
        ),
        click.option(
            "--workers",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="DataLoader worker processes for a streamed dataset.",
        ),
        click.option(
            "--split",
            type=click.Choice(["train", "test", "both"]),
            default="train",
            show_default=True,
            help="Which data split the loss is taken over.",
        ),
        click.option(
            "--batch-size",
            type=int,
            default=2048,
            show_default=True,
            help="Samples per forward pass (results are exact over the whole split regardless).",
        ),
        click.option(
            "--max-samples",
            type=int,
            default=None,
            metavar="N",
            help="Use a seeded random subset of N samples of each split.",
        ),
        click.option(
            "-o",
            "--out",
            default=None,
            metavar="RESULTS.h5",
            help="Results file (default: <checkpoint>.flatscope.h5 beside the checkpoint).",
        ),
        click.option("--plot/--no-plot", default=True, show_default=True, help="Write plots beside the results file."),
        click.option("--plot-format", type=click.Choice(["png", "svg", "pdf"]), default="png", show_default=True),
        click.option("--allow-nonfinite", is_flag=True, help="Analyze weights that hold NaN or Inf."),
        click.option(
            "--allow-mixed",
            is_flag=True,
            help="Write to a results file that holds analyses of another checkpoint (refused otherwise).",
        ),
        click.option(
            "--shard-params",
            is_flag=True,
            help="Under torchrun: shard every parameter-space vector of the analysis (Lanczos bases, "
            "probes, eigenvectors) across the ranks, each rank a contiguous slice (hessian only); with "
            "--hvp fd the model too (FSDP2), each rank its dim-0 chunk of every parameter.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return common_options(f)


def estimate_option(f: Callable) -> Callable:
    """``--estimate``, for the analyses that can predict their cost (hessian, local-energy, landscape,
    sharpness, local-entropy); kept out of :func:`analysis_options` so that info/compare/audit do not
    offer it. The command builds its objective, calls :meth:`Run.emit_estimate` and returns."""
    return click.option(
        "--estimate",
        is_flag=True,
        help="Measure one product of each kind on this machine and print the predicted products, wall time "
        "and peak memory of this run (one JSON object with --json); nothing is computed or written.",
    )(f)


def peak_memory(device) -> dict:
    """The run's peak memory so far: on a CUDA device the most its allocator held
    (``torch.cuda.max_memory_allocated``), elsewhere the process' peak resident memory."""
    from ..estimate import peak_rss_bytes

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(dev)), "peak_memory_of": "cuda allocator"}
    return {"peak_memory_bytes": int(peak_rss_bytes()), "peak_memory_of": "process RSS"}


def pass_run(f: Callable | None = None, *, writes: bool = True, shards: bool = False) -> Callable:
    """Collect the shared options into a :class:`Run` passed as the first argument.

    With ``writes`` (the default) the results path is checked before any work starts, so an
    unwritable path or a non-HDF5 file fails at once and is left untouched. ``shards``: the command
    runs with ``--shard-params`` (others refuse it).
    """

    def deco(f):
        @functools.wraps(f)
        def wrapper(**kw):
            shared = {k: kw.pop(k) for k in COMMON_KEYS + ANALYSIS_KEYS if k in kw}
            run = Run(**shared)
            run.shards_ok = shards
            run.setup(check_output=writes)
            if not run.estimate:
                return f(run, **kw)
            from ..estimate import Estimated

            try:
                return f(run, **kw)
            except Estimated as done:
                return run.emit_estimate(done.estimate)

        return wrapper

    return deco(f) if f is not None else deco


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise FlatscopeError(f"unknown device {spec!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FlatscopeError(f"device {spec!r} asked for, but no CUDA device is available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FlatscopeError(
                f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type != "cpu":
        raise FlatscopeError(f"unsupported device {spec!r}; use auto, cpu or cuda[:N]")
    return dev


class Run:
    def __init__(
        self,
        device="auto",
        seed=0,
        dtype="float32",
        threads=None,
        as_json=False,
        quiet=False,
        verbose=False,
        checkpoint=None,
        model=None,
        model_kwargs=None,
        data=None,
        data_kwargs=None,
        loss=None,
        split="train",
        batch_size=None,
        max_samples=None,
        out=None,
        plot=False,
        plot_format="png",
        allow_nonfinite=False,
        allow_mixed=False,
        label_smoothing=0.0,
        metric=None,
        output=None,
        hvp="auto",
        workers=0,
        memory_budget=None,
        basis_device=None,
        estimate=False,
        shard_params=False,
    ):
        self.device_spec, self.seed, self.dtype_name = device, seed, dtype
        self.threads, self.as_json, self.quiet, self.verbose = threads, as_json, quiet, verbose
        self.checkpoint_path, self.model_name, self.model_kwargs = checkpoint, model, model_kwargs
        self.data_name, self.data_kwargs, self.loss_override = data, data_kwargs, loss
        self.split, self.batch_size, self.max_samples = split, batch_size, max_samples
        self.out_arg, self.do_plot, self.plot_format = out, plot, plot_format
        self.allow_nonfinite, self.allow_mixed = allow_nonfinite, allow_mixed
        self.label_smoothing, self.metric_name, self.output_key = label_smoothing, metric, output
        self.hvp_mode, self.workers = hvp, workers
        self.memory_budget, self.basis_device_spec = memory_budget, basis_device
        self.estimate = bool(estimate)
        self.shard_params, self.shards_ok = bool(shard_params), False
        self._loss_obj = None
        self._metric_obj = None
        self.started = time.time()
        self._ckpt: Checkpoint | None = None
        self._data: Dataset | None = None
        self.written: list[str] = []
        self.warnings: list[str] = []  # every warning of this run; save() stores the new ones with the group
        self._warnings_saved = 0

    # ------------------------------------------------------------------ setup
    def setup(self, check_output: bool = False) -> None:
        STATE["verbose"] = bool(self.verbose)
        if not _TORCH_THREADS:
            _TORCH_THREADS.append(torch.get_num_threads())
        n = choose_threads(self.threads, _TORCH_THREADS[0])  # see flatscope/threads.py
        if n is not None and n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.device = resolve_device(self.device_spec)
        if self.shard_params and not self.shards_ok:
            name = click.get_current_context(silent=True)
            raise FlatscopeError(
                f"--shard-params: flatscope {name.info_name if name else 'this command'} does not run with "
                "sharded parameters; only flatscope hessian does"
            )
        if self.shard_params and not (distributed.launched_by_torchrun() or distributed.active()):
            raise FlatscopeError(
                "--shard-params shards the parameters across torchrun ranks: start the command with "
                "torchrun --nproc-per-node N (N >= 2), or drop --shard-params in one process"
            )
        distributed.init_from_env(self.device)
        self.device = distributed.local_device(self.device)
        self.dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            self.dtype_name, torch.float32
        )
        if self.device.type == "cuda" and self.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise FlatscopeError(
                f"--dtype bfloat16: the device {self.device} has no bfloat16 support; use --dtype float16 or float32"
            )
        self.reseed()
        if self.max_samples is not None and self.max_samples < 1:
            raise FlatscopeError(f"--max-samples must be at least 1, got {self.max_samples}")
        if self.batch_size is not None and self.batch_size < 1:
            raise FlatscopeError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.memory_budget is not None:
            from ..memory import parse_size

            self.memory_budget = parse_size(self.memory_budget)
        self.basis_device = self.device if self.basis_device_spec is None else resolve_device(self.basis_device_spec)
        if check_output and self.checkpoint_path is not None:
            store.check_output_path(self.out_path)
            self.check_not_mixed()

    def check_not_mixed(self) -> None:
        """Refuse a results file that holds analyses of another checkpoint, unless --allow-mixed."""
        if self.allow_mixed or not os.path.isfile(self.out_path):
            return
        from ..checkpoint import sha256_file

        sha = self._ckpt.sha256 if self._ckpt else sha256_file(self.checkpoint_path)
        other = store.other_checkpoint(self.out_path, sha)
        if other is not None:
            raise FlatscopeError(
                f"{self.out_path} holds analyses of another checkpoint ({other[0]}: {other[1]}, sha256 "
                f"{other[2][:12]}...), not of {self.checkpoint_path} (sha256 {sha[:12]}...); write to another file "
                f"with -o, or pass --allow-mixed to keep both in one file"
            )

    def reseed(self, offset: int = 0) -> None:
        torch.manual_seed(self.seed + offset)
        np.random.seed((self.seed + offset) % 2**32)
        random.seed(self.seed + offset)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from --seed (plus ``offset`` for independent streams)."""
        return torch.Generator().manual_seed(self.seed + offset)

    # ------------------------------------------------------------------ inputs
    @property
    def out_path(self) -> str:
        if self.out_arg:
            return self.out_arg
        p = Path(self.checkpoint_path)
        return str(p.with_name(p.stem + ".flatscope.h5"))

    def model_spec(self) -> dict | None:
        if self.model_name is None:
            if self.model_kwargs is not None:
                raise FlatscopeError("--model-kwargs needs --model")
            return None
        return {"name": self.model_name, "kwargs": self.model_kwargs or {}}

    @property
    def checkpoint(self) -> Checkpoint:
        if self._ckpt is None:
            from ..checkpoint import load_checkpoint
            from ..models import is_factory_path

            self._ckpt = load_checkpoint(
                self.checkpoint_path,
                model_spec=self.model_spec(),
                allow_import=self.model_name is not None and is_factory_path(self.model_name),
                allow_nonfinite=self.allow_nonfinite,
            )
            for note in self._ckpt.notes:
                self.warn(note)
        return self._ckpt

    def data_spec(self) -> dict:
        if self.data_name is not None:
            return {"name": self.data_name, "kwargs": self.data_kwargs or {}}
        if self.data_kwargs is not None:
            raise FlatscopeError("--data-kwargs needs --data")
        spec = self.checkpoint.data_spec
        if not spec:
            raise FlatscopeError(f"{self.checkpoint_path} names no data; pass --data SPEC")
        return spec

    @property
    def data(self) -> Dataset:
        if self._data is None:
            from ..data import load_data
            from ..models import is_factory_path

            self._data = load_data(
                self.data_spec(), allow_import=self.data_name is not None and is_factory_path(self.data_name)
            )
        return self._data

    @property
    def loss_name(self) -> str:
        name = self.loss_override or self.checkpoint.loss
        if not name:
            raise FlatscopeError(f"{self.checkpoint_path} names no loss; pass --loss ce|lm|bce|mse|pkg.module:fn")
        return name

    @property
    def loss(self):
        """The :class:`flatscope.losses.Loss` (a custom ``pkg.module:fn`` only when typed as --loss)."""
        if self._loss_obj is None:
            from ..losses import make_loss

            typed = self.loss_override is not None and self.loss_override == self.loss_name
            self._loss_obj = make_loss(self.loss_name, label_smoothing=self.label_smoothing, allow_import=typed)
        return self._loss_obj

    @property
    def metric(self):
        if self._metric_obj is None and self.metric_name is not None:
            from ..losses import make_metric

            self._metric_obj = make_metric(self.metric_name, allow_import=True)
        return self._metric_obj

    def splits(self) -> list[str]:
        return ["train", "test"] if self.split == "both" else [self.split]

    def split_source(self, split: str):
        """The split's :class:`~flatscope.sources.Source`, subsampled by --max-samples."""
        src = self.data.source(split)
        if self.workers and hasattr(src, "workers"):
            src.workers = self.workers
        from ..data import subsample_source

        return subsample_source(src, self.max_samples, self.seed)

    def split_data(self, split: str):
        """``(X, y)`` of a split held in memory (streamed splits: :meth:`split_source`)."""
        src = self.split_source(split)
        if not hasattr(src, "inputs"):
            return src, None
        return src.inputs, src.targets

    def param_shard(self, dim: int):
        """This rank's :class:`flatscope.sharding.ParamShard` of ``dim`` parameters with --shard-params, else None."""
        if not self.shard_params:
            return None
        from ..sharding import ParamShard

        return ParamShard(dim)

    def objective(
        self, split: str | None = None, model: torch.nn.Module | None = None, shard: bool = True, **kwargs
    ) -> Objective:
        from ..objective import Objective

        split = split or self.splits()[0]
        obj = Objective(
            self.checkpoint.model if model is None else model,
            data=self.split_source(split),
            loss=self.loss,
            metric=self.metric,
            output=self.output_key,
            batch_size=self.batch_size,
            device=self.device,
            dtype=self.dtype,
            hvp_mode=self.hvp_mode if self.hvp_mode in ("auto", "fd") else "exact",
            memory_budget=self.memory_budget,
            basis_device=self.basis_device,
            **kwargs,
        )
        for note in obj.notes:
            self.note(note)
        return obj.shard() if shard and distributed.active() else obj

    # ------------------------------------------------------------------ output
    @property
    def is_main(self) -> bool:
        """Rank 0 under torchrun (always true in one process): the only rank that prints or writes."""
        return distributed.is_main()

    @property
    def interactive(self) -> bool:
        return sys.stdout.isatty() and not self.quiet and not self.as_json and self.is_main

    def note(self, msg: str) -> None:
        if not self.quiet and self.is_main:
            click.echo(msg, err=True)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        if self.is_main:
            click.echo(f"Warning: {msg}", err=True)

    @contextlib.contextmanager
    def progress(self, total: int, description: str, unit_seconds: float | None = None):
        """Yields ``advance(n=1)``; a rich bar with ETA only on a terminal without --quiet/--json.

        The ETA is :func:`flatscope.estimate.eta_seconds`: the items left times the seconds per item
        observed in this stage, or before its first item ``unit_seconds`` (a measured unit cost)."""
        if not self.interactive or total <= 0:
            yield lambda n=1: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
        from rich.text import Text

        from ..estimate import eta_seconds

        class Eta(ProgressColumn):
            def render(self, task):
                left = eta_seconds(task.remaining or 0, task.completed, task.elapsed or 0.0, unit_seconds)
                if left is None:
                    return Text("-:--:--")
                m, sec = divmod(int(round(left)), 60)
                return Text(f"{m // 60}:{m % 60:02d}:{sec:02d}")

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            Eta(),
            transient=True,
        ) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)

    def provenance(self) -> dict:
        ckpt = self._ckpt
        return {
            "flatscope_version": __version__,
            "torch_version": str(torch.__version__),
            "command": shlex.join(["flatscope"] + sys.argv[1:]) if sys.argv else "flatscope",
            "checkpoint": os.path.abspath(self.checkpoint_path) if self.checkpoint_path else None,
            "checkpoint_sha256": ckpt.sha256 if ckpt else None,
            "data": json.dumps(self.data_spec()) if ckpt else None,
            "loss": self.loss_name if ckpt else None,
            "seed": self.seed,
            "device": str(self.device),
            "world_size": distributed.world_size(),
            "dtype": self.dtype_name,
            "wall_time_s": time.time() - self.started,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **peak_memory(self.device),
        }

    def save(self, name: str, tree: dict, *, kind: str, summary: dict, options: dict) -> str:
        """Write analysis group ``name`` (replacing an older one) atomically; returns the file path."""
        options = dict(options, split=self.split, max_samples=self.max_samples, batch_size=self.batch_size)
        for key, value in result_options(self).items():
            options.setdefault(key, value)  # hessian stores its own resolved hvp mode
        if not self.is_main:
            return self.out_path
        if self.checkpoint_path is not None:
            self.check_not_mixed()
        with store.update(self.out_path) as f:
            store.write_analysis(
                f,
                name,
                tree,
                kind=kind,
                summary=summary,
                options=options,
                provenance=self.provenance(),
                warnings=self.warnings[self._warnings_saved :],
            )
        self._warnings_saved = len(self.warnings)
        self.note(f"wrote /{name} to {self.out_path}")
        return self.out_path

    def plot(self, name: str) -> list[str]:
        """Render the plots of group ``name`` from the results file, if --plot."""
        if not self.do_plot or not self.is_main:
            return []
        from ..plotting import render_group

        paths = render_group(self.out_path, name, fmt=self.plot_format)
        for p in paths:
            self.note(f"wrote {p}")
        self.written += [str(p) for p in paths]
        return [str(p) for p in paths]

    def emit_estimate(self, est) -> None:
        """Print an :class:`flatscope.estimate.Estimate` (one JSON object with --json, else a table);
        the command then returns without computing or writing anything."""
        from ..estimate import process_seconds

        so_far = process_seconds()
        so_far = time.time() - self.started if so_far is None else so_far
        est.elapsed = max(0.0, so_far - est.units.measured_in)  # imports and loading, before measuring

        def human(console):
            from rich.table import Table

            console.print(
                f"[bold]estimate[/bold] of {est.analysis}: {est.dim:,} parameters, measured on {self.device} "
                f"in {est.units.measured_in:.2f} s" + (f" (HVPs: {est.units.hvp_mode})" if est.units.hvp_mode else "")
            )
            t = Table("stage", "count", "unit", "unit cost", "seconds")
            for s in est.stages:
                cost = getattr(est.units, s["unit"])
                t.add_row(
                    s["stage"],
                    ("" if s["exact"] else "~") + f"{s['count']:,}",
                    s["unit"],
                    "-" if cost is None else f"{cost * 1e3:.3g} ms",
                    "-" if s["seconds"] is None else f"{s['seconds']:.3g}",
                )
            console.print(t)
            if est.units.setup:
                console.print(f"setup (paid once: cache build, first calls): {est.units.setup:.3g} s", highlight=False)
            console.print(
                f"predicted: {est.seconds:.3g} s for the analysis ({est.elapsed + est.seconds:.3g} s with "
                f"loading the checkpoint and data), peak memory {est.peak_bytes / 2**20:,.0f} MiB; ~ marks a modelled count",
                highlight=False,
            )
            for n in est.notes:
                console.print(n, highlight=False)

        self.emit(est.to_json(), human)

    def emit(self, payload: dict, human: Callable[["Console"], None] | None = None) -> None:  # noqa: F821
        if not self.is_main:
            return
        if self.as_json:
            click.echo(json.dumps(store.to_jsonable(payload)))
        elif human is not None and not self.quiet:
            from rich.console import Console

            human(Console(soft_wrap=True))


def check_finite_options(params: dict) -> None:
    """Refuse NaN and Inf in every number option (click's FloatRange lets NaN through every bound), and
    whole numbers beyond 2**53 (they overflow torch and numpy sizes)."""
    import math

    for name, value in params.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise FlatscopeError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2**53:
                raise FlatscopeError(f"--{name.replace('_', '-')} {v} is too large (at most 2**53)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every clean-up (temporaries, landscape's flush) runs."""


def _on_sigterm(signum, frame):
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def handle_errors(fn: Callable) -> Callable:
    """Turn errors into one ``Error:`` line and an exit code (2 bad input, 130 Ctrl-C, 143 SIGTERM, 3 internal)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            check_finite_options(kwargs)
            with _sigterm_as_interrupt():
                out = fn(*args, **kwargs)
            distributed.finish()  # under torchrun: every rank done before gloo/NCCL is torn down
            return out
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Terminated:
            click.echo("Error: terminated (SIGTERM); files already written are intact", err=True)
            sys.exit(143)
        except FlatscopeError as exc:
            if STATE["verbose"]:
                import traceback

                traceback.print_exc()
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank refuses; rank 0 says so
                click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("Error: interrupted; files already written are intact", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug: still one line unless -v
            if STATE["verbose"]:
                import traceback

                traceback.print_exc()
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"Error: internal error {type(exc).__name__}: {msg} (run with -v for the traceback)", err=True)
            sys.exit(3)

    return wrapper
