"""The training loop behind ``flatscope train``.

Budgets are counted in gradient evaluations: one evaluation is the gradient of the loss on one
minibatch (whatever the method does with it). ``batches_per_epoch = ceil(N_train / batch_size)``;
``--epochs E`` means a budget of ``E * batches_per_epoch`` evaluations for every method, and the
history is logged each time the count crosses a multiple of ``batches_per_epoch`` (an effective
epoch). Methods live in :mod:`flatscope.methods`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import __version__
from . import methods
from .checkpoint import save_checkpoint
from .data import Dataset
from .errors import FlatscopeError
from .objective import Objective, loss_value


@dataclass
class TrainConfig:
    opt: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"      # constant | cosine | step
    batch_size: int = 64
    epochs: float = 30
    budget: int | None = None       # gradient evaluations; overrides epochs
    seed: int = 0
    save_every: int | None = None   # epochs between trajectory checkpoints
    extra: dict = field(default_factory=dict)   # method-specific hyperparameters


class BatchStream:
    """Minibatches from seeded per-epoch permutations; counts gradient evaluations."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.X, self.y = X, y
        self.n = int(X.shape[0])
        self.batch_size = min(int(batch_size), self.n)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.perm = torch.randperm(self.n, generator=self.gen)
        self.pos = 0
        self.evals = 0

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def next_indices(self) -> torch.Tensor:
        if self.pos >= self.n:
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        self.evals += 1
        return idx

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.next_indices()
        return self.X[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone(), "pos": self.pos, "evals": self.evals}

    def load_state_dict(self, s: dict) -> None:
        self.gen.set_state(s["gen"])
        self.perm, self.pos, self.evals = s["perm"].clone(), int(s["pos"]), int(s["evals"])


def lr_at(config: TrainConfig, evals: int, budget: int) -> float:
    frac = min(evals / max(budget, 1), 1.0)
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1 + math.cos(math.pi * frac))
    if config.schedule == "step":
        return config.lr * (0.1 ** (int(frac >= 0.5) + int(frac >= 0.75)))
    raise FlatscopeError(f"unknown lr schedule {config.schedule!r}; choose constant, cosine or step")


def evaluate_model(model: torch.nn.Module, data: Dataset, loss: str, split: str) -> tuple[float, float]:
    X, y = data.split(split)
    return Objective(model, X, y, loss=loss, batch_size=4096).evaluate()


def train(model: torch.nn.Module, data: Dataset, loss: str, config: TrainConfig, *,
          model_spec: dict, data_spec: dict, out: str | None = None,
          progress: Callable[[int], None] | None = None, resume_state: dict | None = None,
          history: dict | None = None) -> dict:
    """Train ``model`` in place; returns the training record stored in the checkpoint.

    With ``out`` and ``config.save_every``, trajectory checkpoints go to ``<out stem>-traj/``.
    """
    if config.batch_size < 1:
        raise FlatscopeError(f"--batch-size must be at least 1, got {config.batch_size}")
    torch.manual_seed(config.seed)
    stream = BatchStream(data.X_train, data.y_train, config.batch_size, config.seed)
    bpe = stream.batches_per_epoch
    budget = int(config.budget) if config.budget is not None else int(round(config.epochs * bpe))
    if budget < 1:
        raise FlatscopeError("the training budget must be at least one gradient evaluation")
    method = methods.get(config.opt)(model, lambda m, xb, yb: loss_value(m(xb), yb, loss), config)
    history = history or {}
    wall0 = time.time() - (history.get("wall_time_s") or [0.0])[-1]
    if resume_state:
        stream.load_state_dict(resume_state["stream"])
        method.load_state_dict(resume_state["method"])
        torch.set_rng_state(resume_state["torch_rng"])
    traj_dir = None
    if out and config.save_every:
        traj_dir = os.path.splitext(out)[0] + "-traj"
        os.makedirs(traj_dir, exist_ok=True)

    def log_epoch():
        result = method.result_model()
        was_training = result.training
        row = {"epoch": stream.evals / bpe, "grad_evals": stream.evals, "wall_time_s": time.time() - wall0}
        row["train_loss"], row["train_acc"] = evaluate_model(result, data, loss, "train")
        if data.X_test is not None:
            row["test_loss"], row["test_acc"] = evaluate_model(result, data, loss, "test")
        row.update(method.epoch_logs())
        result.train(was_training)
        for k, v in row.items():
            history.setdefault(k, []).append(float(v))
        if not math.isfinite(row["train_loss"]):
            raise FlatscopeError(f"training diverged at epoch {row['epoch']:.2f} (train loss {row['train_loss']}); "
                                 "lower --lr")
        return row

    model.train()
    if not history:
        log_epoch()  # epoch 0: the initialization
        if traj_dir:
            save_checkpoint(os.path.join(traj_dir, "epoch-0000.pt"), method.result_model(),
                            model_spec, data_spec, loss, {"epoch": 0, "grad_evals": 0})
    epoch_done = stream.evals // bpe
    while stream.evals < budget:
        before = stream.evals
        method.step(stream, lr_at(config, stream.evals, budget))
        if progress is not None:
            progress(stream.evals - before)
        if stream.evals // bpe > epoch_done or stream.evals >= budget:
            epoch_done = stream.evals // bpe
            log_epoch()
            if traj_dir and epoch_done % config.save_every == 0 and stream.evals < budget:
                save_checkpoint(os.path.join(traj_dir, f"epoch-{epoch_done:04d}.pt"), method.result_model(),
                                model_spec, data_spec, loss, {"epoch": epoch_done, "grad_evals": stream.evals})
    record = {
        "optimizer": config.opt,
        "hparams": dict(method.hparams(), schedule=config.schedule),
        "config": {k: v for k, v in asdict(config).items() if v is not None},
        "seed": config.seed,
        "batch_size": stream.batch_size,
        "batches_per_epoch": bpe,
        "budget": budget,
        "grad_evals": stream.evals,
        "effective_epochs": stream.evals / bpe,
        "wall_time_s": time.time() - wall0,
        "versions": {"flatscope": __version__, "torch": str(torch.__version__)},
        "history": history,
        "resume": {"stream": stream.state_dict(), "method": method.state_dict(), "torch_rng": torch.get_rng_state()},
    }
    if traj_dir:
        record["trajectory_dir"] = os.path.abspath(traj_dir)
        save_checkpoint(os.path.join(traj_dir, f"epoch-{stream.evals // bpe:04d}-final.pt"), method.result_model(),
                        model_spec, data_spec, loss, {"epoch": stream.evals / bpe, "grad_evals": stream.evals})
    return record
