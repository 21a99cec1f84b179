"""``flatscope train``: produce a flatscope checkpoint."""

from __future__ import annotations

import json
import os

import click

from ... import methods
from ...checkpoint import save_checkpoint
from ...data import load_data
from ...errors import FlatscopeError
from ...models import BUILTIN_MODELS, build_model, is_factory_path
from ...objective import LOSSES
from ...training import TrainConfig, train
from ..common import Run, _json_dict, common_options


@click.command("train")
@click.option("--model", "model_name", default="mlp", show_default=True, metavar="NAME|pkg.module:factory",
              help=f"Architecture: {', '.join(BUILTIN_MODELS)}, or pkg.module:factory.")
@click.option("--model-kwargs", default=None, callback=_json_dict, metavar="JSON",
              help="e.g. '{\"widths\": [32, 32]}'; in_features/out_features default to the data's.")
@click.option("--data", "data_name", default="digits", show_default=True, metavar="SPEC",
              help="digits, teacher, npz:PATH, h5:PATH or pkg.module:factory.")
@click.option("--data-kwargs", default=None, callback=_json_dict, metavar="JSON")
@click.option("--loss", type=click.Choice(LOSSES), default=None, help="Default: ce for labels, mse for float targets.")
@click.option("--opt", default="sgd", show_default=True, metavar="|".join(["sgd", "adam"]),
              help="Optimizer (flatscope train --help lists all; see README).")
@click.option("--lr", type=float, default=0.05, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--nesterov", is_flag=True, help="Nesterov momentum (SGD).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--schedule", type=click.Choice(["constant", "cosine", "step"]), default="constant", show_default=True,
              help="Learning-rate schedule over the gradient budget.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--epochs", type=float, default=30, show_default=True, help="Budget in epochs of gradient evaluations.")
@click.option("--budget", type=int, default=None, metavar="N", help="Budget in gradient evaluations (overrides --epochs).")
@click.option("--save-every", type=click.IntRange(min=1), default=None, metavar="K",
              help="Also save a trajectory checkpoint every K epochs into <out>-traj/ (for landscape PCA).")
@click.option("-o", "--out", required=True, metavar="CKPT.pt", help="Where to write the checkpoint.")
@common_options
def command(model_name, model_kwargs, data_name, data_kwargs, loss, opt, lr, momentum, nesterov, weight_decay,
            schedule, batch_size, epochs, budget, save_every, out, **common):
    """Train a model and write a flatscope checkpoint.

    \b
    Example:
      flatscope train --model mlp --data digits --opt sgd --epochs 30 --seed 0 -o runs/mlp-sgd.pt
    """
    run = Run(**common)
    run.setup()
    if budget is not None and budget < 1:
        raise FlatscopeError(f"--budget must be at least 1, got {budget}")
    if epochs <= 0 and budget is None:
        raise FlatscopeError(f"--epochs must be positive, got {epochs}")
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise FlatscopeError(f"cannot create the folder of {out}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise FlatscopeError(f"cannot write {out}: folder {folder} is not writable")
    methods.get(opt)  # fail fast on an unknown optimizer
    data_spec = {"name": data_name, "kwargs": data_kwargs or {}}
    data = load_data(data_spec, allow_import=is_factory_path(data_name))
    loss = loss or ("ce" if data.classification else "mse")
    kwargs = dict(model_kwargs or {})
    if model_name in BUILTIN_MODELS:
        kwargs.setdefault("in_features", data.in_features)
        kwargs.setdefault("out_features", data.n_outputs)
    model_spec = {"name": model_name, "kwargs": kwargs}
    model = build_model(model_spec, allow_import=is_factory_path(model_name)).to(run.dtype)
    data.X_train, data.X_test = data.X_train.to(run.dtype), (None if data.X_test is None else data.X_test.to(run.dtype))
    if data.classification is False:
        data.y_train = data.y_train.to(run.dtype)
        data.y_test = None if data.y_test is None else data.y_test.to(run.dtype)
    config = TrainConfig(opt=opt, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         schedule=schedule, batch_size=batch_size, epochs=epochs, budget=budget, seed=run.seed,
                         save_every=save_every)
    n_batches = -(-data.X_train.shape[0] // max(1, min(batch_size, data.X_train.shape[0])))
    total = budget if budget is not None else int(round(epochs * n_batches))
    with run.progress(total, f"train {opt}") as advance:
        record = train(model, data, loss, config, model_spec=model_spec, data_spec=data_spec, out=out,
                       progress=advance)
    save_checkpoint(out, model, model_spec, data_spec, loss, record)
    h = record["history"]
    payload = {"checkpoint": os.path.abspath(out), "optimizer": opt, "grad_evals": record["grad_evals"],
               "effective_epochs": record["effective_epochs"], "wall_time_s": record["wall_time_s"],
               "train_loss": h["train_loss"][-1], "train_acc": h["train_acc"][-1],
               "test_loss": (h.get("test_loss") or [None])[-1], "test_acc": (h.get("test_acc") or [None])[-1]}
    run.note(f"wrote {out}")

    def human(console):
        console.print(f"trained {model_name} on {data_name} with {opt}: {record['grad_evals']} gradient evaluations "
                      f"({record['effective_epochs']:.1f} epochs) in {record['wall_time_s']:.1f} s")
        line = f"train loss {payload['train_loss']:.4f}  acc {payload['train_acc']:.4f}"
        if payload["test_loss"] is not None:
            line += f"   test loss {payload['test_loss']:.4f}  acc {payload['test_acc']:.4f}"
        console.print(line)

    run.emit(payload, human)
