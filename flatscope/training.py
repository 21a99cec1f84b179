"""The training loop behind ``flatscope train``.

Budgets are counted in gradient evaluations: one evaluation is the gradient of the loss on one
minibatch, whatever the method does with it (an inner Langevin step, a replica's step, SAM's
second gradient; for the gradient-free ``is``, one forward pass of one minibatch is charged as one
evaluation). The stream counts them by kind: ``outer`` (at the method's own iterate: SGD steps,
replica steps, SAM's first gradient), ``inner`` (inside an inner loop: Langevin steps, perturbed
gradients of heat/hr), ``extra`` (SAM's gradient at the ascent point) and ``forward`` (``is``).

``batches_per_epoch = ceil(N_train / batch_size)``; ``--epochs E`` means a budget of
``round(E * batches_per_epoch)`` evaluations for every method, and *effective epochs* are
evaluations / batches_per_epoch. The history is logged each time the count crosses a multiple of
``batches_per_epoch`` (an effective epoch) and once at the end. Each method consumes a fixed
number of evaluations per call of ``step`` (1 for most; 2 for SAM; y for rSGD); training stops
before a step that would exceed the budget, so a run never uses more than its budget and less by
at most ``evals_per_step - 1``.

Resumption: the training record keeps every piece of state (the method's, the data stream's
generator and position, torch's global RNG, the history), so training N epochs equals training N/2
and resuming to N, bit for bit (the learning-rate schedule is a function of the *total* budget, so
for ``cosine``/``step`` schedules this holds only if the first run was given the final budget).
Methods live in :mod:`flatscope.methods`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch

from . import __version__
from . import distributed
from . import methods
from .checkpoint import save_checkpoint
from .data import Dataset
from .errors import FlatscopeError
from .losses import make_loss
from .objective import Objective, run_module
from .sources import Source, TensorSource, to_device

EVAL_KINDS = ("outer", "inner", "extra", "forward")


@dataclass
class TrainConfig:
    opt: str = "sgd"
    lr: float | None = None  # None: the method's default (methods.get(opt).default_lr)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine | step
    batch_size: int = 64
    epochs: float = 30
    budget: int | None = None  # gradient evaluations; overrides epochs
    seed: int = 0
    save_every: int | None = None  # epochs between trajectory checkpoints
    extra: dict = field(default_factory=dict)  # method-specific hyperparameters

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class BatchStream:
    """Minibatches from seeded per-epoch permutations; counts gradient evaluations by kind."""

    def __init__(
        self, X, y, batch_size: int, seed: int, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ):
        self.source = X if isinstance(X, Source) else TensorSource(X, y, "train")
        self.dtype, self.device = dtype, torch.device(device)
        if isinstance(self.source, TensorSource):
            self.source = self.source.to(self.device, dtype)
        self.n = len(self.source)
        self.batch_size = min(int(batch_size), self.n)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.perm = torch.randperm(self.n, generator=self.gen)
        self.pos = 0
        self.evals = 0
        self.by_kind = dict.fromkeys(EVAL_KINDS, 0)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def charge(self, n: int, kind: str = "outer") -> None:
        """Count ``n`` evaluations without drawing data (a second gradient on the same batch)."""
        self.evals += n
        self.by_kind[kind] += n

    def next_indices(self, kind: str = "outer") -> torch.Tensor:
        if self.pos >= self.n:
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        self.charge(1, kind)
        return idx

    @property
    def X(self):
        """The training inputs: a tensor (tree) in memory, else the streamed source itself."""
        return self.source.inputs if isinstance(self.source, TensorSource) else self.source

    @property
    def y(self):
        return self.source.targets if isinstance(self.source, TensorSource) else None

    def take(self, idx: torch.Tensor):
        """The samples ``idx`` on the training device (floating inputs in the training dtype)."""
        if isinstance(self.source, TensorSource):
            return self.source.take(idx)
        x, y = self.source.take(idx)
        return to_device(x, self.device, self.dtype), to_device(
            y, self.device, self.dtype if torch.is_floating_point(y) else None
        )

    def next(self, kind: str = "outer"):
        return self.take(self.next_indices(kind))

    def state_dict(self) -> dict:
        return {
            "gen": self.gen.get_state(),
            "perm": self.perm.clone(),
            "pos": self.pos,
            "evals": self.evals,
            "by_kind": dict(self.by_kind),
        }

    def load_state_dict(self, s: dict) -> None:
        self.gen.set_state(s["gen"])
        self.perm, self.pos, self.evals = s["perm"].clone(), int(s["pos"]), int(s["evals"])
        self.by_kind = dict.fromkeys(EVAL_KINDS, 0)
        self.by_kind.update({k: int(v) for k, v in (s.get("by_kind") or {"outer": self.evals}).items()})


def lr_factor(schedule: str, evals: int, budget: int) -> float:
    """The learning-rate multiplier after ``evals`` of ``budget`` evaluations."""
    frac = min(evals / max(budget, 1), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * frac))
    if schedule == "step":
        return 0.1 ** (int(frac >= 0.5) + int(frac >= 0.75))
    raise FlatscopeError(f"unknown lr schedule {schedule!r}; choose constant, cosine or step")


def lr_at(config: TrainConfig, evals: int, budget: int) -> float:
    """The scheduled learning rate (``config.lr`` must be set)."""
    return config.lr * lr_factor(config.schedule, evals, budget)


def evaluate_model(model: torch.nn.Module, data: Dataset, loss, split: str) -> tuple[float, float]:
    p = next(model.parameters())
    return Objective(
        model, data=data.source(split), loss=loss, batch_size=4096, device=p.device, dtype=p.dtype
    ).evaluate()


def budget_of(config: TrainConfig, batches_per_epoch: int) -> int:
    return int(config.budget) if config.budget is not None else int(round(config.epochs * batches_per_epoch))


def train(
    model: torch.nn.Module,
    data: Dataset,
    loss: str,
    config: TrainConfig,
    *,
    model_spec: dict,
    data_spec: dict,
    out: str | None = None,
    progress: Callable[[int], None] | None = None,
    resume_state: dict | None = None,
    history: dict | None = None,
    on_warning: Callable[[str], None] | None = None,
    monitor: Callable[[int, methods.Method, float | None], None] | None = None,
) -> dict:
    """Train ``model`` in place (it holds the method's result at the end); returns the training record.

    ``resume_state`` and ``history`` come from a previous record (``record["resume"]``,
    ``record["history"]``) whose ``config`` must equal ``config`` except for the budget.
    With ``out`` and ``config.save_every``, trajectory checkpoints go to ``<out stem>-traj/``.
    ``monitor(step, method, lr)`` is called before the first step of a fresh run (step 0) and after
    every step (``step`` = evaluations / evaluations per step); it must not change the method's state
    (:class:`flatscope.monitor.CurvatureMonitor` measures a copy) and charges nothing to the budget.
    """
    if config.batch_size < 1:
        raise FlatscopeError(f"--batch-size must be at least 1, got {config.batch_size}")
    torch.manual_seed(config.seed)
    p0 = next(model.parameters())
    stream = BatchStream(data.source("train"), None, config.batch_size, config.seed, dtype=p0.dtype, device=p0.device)
    bpe = stream.batches_per_epoch
    budget = budget_of(config, bpe)
    if budget < 1:
        raise FlatscopeError("the training budget must be at least one gradient evaluation")
    loss_fn = make_loss(loss)  # a name, or a Loss the CLI built (a custom pkg.module:fn only when typed)
    loss = loss_fn.name

    def batch_loss(m, xb, yb):  # m: the model itself, or a functional forward of FlatNet
        return loss_fn.mean(run_module(m, xb) if isinstance(m, torch.nn.Module) else m(xb), yb)

    method = methods.get(config.opt)(model, batch_loss, config)
    if budget < method.evals_per_step:
        raise FlatscopeError(
            f"a budget of {budget} evaluations is less than one step of --opt {config.opt} "
            f"({method.evals_per_step} evaluations)"
        )
    warnings: list[dict] = []

    def warn(key: str, message: str) -> None:
        if key in {w["key"] for w in warnings}:
            return
        warnings.append({"key": key, "message": message, "grad_evals": stream.evals})
        if on_warning is not None:
            on_warning(message)

    method._warn = warn
    method.setup(stream)
    history = {k: list(v) for k, v in (history or {}).items()}
    wall0 = time.time()
    if resume_state:
        stream.load_state_dict(resume_state["stream"])
        method.load_state_dict(resume_state["method"])
        torch.set_rng_state(resume_state["torch_rng"])
        wall0 -= float(resume_state.get("wall_time_s", 0.0))
        warnings.extend(resume_state.get("warnings", []))
        if not resume_state.get("last_row_on_epoch", True) and history:
            for v in history.values():  # the previous run's final row fell mid-epoch: not part of the straight run
                v.pop()
        if stream.evals >= budget:
            raise FlatscopeError(
                f"the checkpoint already used {stream.evals} gradient evaluations "
                f"({stream.evals / bpe:g} epochs); ask for a larger --epochs or --budget to resume"
            )
    traj_dir = None
    if out and config.save_every and distributed.is_main():  # under torchrun rank 0 alone writes
        traj_dir = os.path.splitext(out)[0] + "-traj"
        os.makedirs(traj_dir, exist_ok=True)

    def log_epoch():
        result = method.result_model()
        was_training = result.training
        row = {"epoch": stream.evals / bpe, "grad_evals": stream.evals, "wall_time_s": time.time() - wall0}
        row["train_loss"], row["train_acc"] = evaluate_model(result, data, loss_fn, "train")
        if data.test is not None:
            row["test_loss"], row["test_acc"] = evaluate_model(result, data, loss_fn, "test")
        if method.lr is not None:
            row["lr"] = method.lr * lr_factor(config.schedule, stream.evals, budget)
        row.update(method.epoch_logs())
        result.train(was_training)
        for k, v in row.items():
            history.setdefault(k, []).append(float(v))
        if not math.isfinite(row["train_loss"]):
            hint = f"after the warning: {warnings[-1]['message']}" if warnings else "lower --lr"
            raise FlatscopeError(
                f"training diverged at epoch {row['epoch']:.2f} (train loss {row['train_loss']}); " + hint
            )
        return row

    model.train()
    if not history:
        log_epoch()  # epoch 0: the initialization
        if traj_dir:
            save_checkpoint(
                os.path.join(traj_dir, "epoch-0000.pt"),
                method.result_model(),
                model_spec,
                data_spec,
                loss,
                {"epoch": 0, "grad_evals": 0},
            )
    epoch_done = stream.evals // bpe
    on_epoch = True

    def make_record() -> dict:
        return _record(method, config, stream, budget, history, warnings, wall0, on_epoch, traj_dir)

    k = method.evals_per_step
    if monitor is not None and stream.evals == 0:
        monitor(0, method, None if method.lr is None else method.lr * lr_factor(config.schedule, 0, budget))
    while budget - stream.evals >= k:
        before = stream.evals
        lr = None if method.lr is None else method.lr * lr_factor(config.schedule, stream.evals, budget)
        method.step(stream, lr)
        if stream.evals - before != k:
            raise RuntimeError(f"method {config.opt} used {stream.evals - before} evaluations in a step, declared {k}")
        if progress is not None:
            progress(stream.evals - before)
        if monitor is not None:
            monitor(stream.evals // k, method, lr)
        crossed = stream.evals // bpe > epoch_done
        if crossed or budget - stream.evals < k:
            epoch_done = stream.evals // bpe
            on_epoch = crossed
            log_epoch()
            if traj_dir and crossed and epoch_done % config.save_every == 0 and budget - stream.evals >= k:
                # A full, resumable record: a run killed later resumes from here bit-identically.
                save_checkpoint(
                    os.path.join(traj_dir, f"epoch-{epoch_done:04d}.pt"),
                    method.result_model(),
                    model_spec,
                    data_spec,
                    loss,
                    dict(make_record(), epoch=epoch_done),
                )
    record = make_record()
    if traj_dir:
        save_checkpoint(
            os.path.join(traj_dir, f"epoch-{stream.evals // bpe:04d}-final.pt"),
            method.result_model(),
            model_spec,
            data_spec,
            loss,
            dict(record, epoch=stream.evals / bpe),
        )
    return record


def _record(
    method,
    config: TrainConfig,
    stream: BatchStream,
    budget: int,
    history: dict,
    warnings: list,
    wall0: float,
    on_epoch: bool,
    traj_dir: str | None,
) -> dict:
    """The training record after the current step: the checkpoint's ``train`` entry, resumable."""
    k = method.evals_per_step
    bpe = stream.batches_per_epoch
    result = method.result_model()
    wall = time.time() - wall0
    record = {
        "optimizer": config.opt,
        "hparams": dict(method.hparams(), schedule=config.schedule),
        "config": {k: v for k, v in asdict(config).items() if v is not None},
        "seed": config.seed,
        "batch_size": stream.batch_size,
        "batches_per_epoch": bpe,
        "budget": budget,
        "grad_evals": stream.evals,
        "grad_evals_by_kind": dict(stream.by_kind),
        "evals_per_step": k,
        "effective_epochs": stream.evals / bpe,
        "wall_time_s": wall,
        "dtype": str(next(iter(result.parameters())).dtype).replace("torch.", ""),
        "versions": {"flatscope": __version__, "torch": str(torch.__version__)},
        "warnings": [w["message"] for w in warnings],
        "history": history,
        "resume": {
            "stream": stream.state_dict(),
            "method": method.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "wall_time_s": wall,
            "warnings": warnings,
            "last_row_on_epoch": on_epoch,
        },
    }
    record.update(method.extra_record())
    if traj_dir:
        record["trajectory_dir"] = os.path.abspath(traj_dir)
    return record
