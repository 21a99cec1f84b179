"""``flatscope train``: produce a flatscope checkpoint, with any registered optimizer, at a counted budget."""

from __future__ import annotations

import os
import re

import click
from click.core import ParameterSource

from ... import distributed
from ... import methods
from ... import results as store
from ...checkpoint import check_checkpoint_output, load_checkpoint, peek_checkpoint, save_checkpoint, sha256_file
from ...data import load_data
from ...losses import make_loss
from ...errors import FlatscopeError
from ...methods._flat import resolve_params
from ...models import BUILTIN_MODELS, build_model, is_factory_path
from ...training import TrainConfig, train
from ..common import Run, _json_dict, common_options, resolve_device

# Shared options and the methods they concern (an explicit one that a method ignores is an error).
SHARED = {
    "lr": "learning rate",
    "momentum": "momentum",
    "nesterov": "Nesterov momentum",
    "weight_decay": "weight decay",
    "schedule": "learning-rate schedule",
}
USES = {"adam": {"lr", "weight_decay", "schedule"}, "hr": {"weight_decay"}, "is": set()}
# What runs under torchrun: rSGD with replicas on ranks, eSGD data-parallel.
DISTRIBUTED = ("rsgd", "esgd")
MAX_EPOCHS = 1e6
MAX_BUDGET = 10**12
# What a resumed run keeps from its checkpoint (giving a different value is an error).
KEPT_ON_RESUME = ("opt", "lr", "momentum", "nesterov", "weight_decay", "schedule", "batch_size", "seed")


def _method_params() -> dict[str, list[tuple[str, object]]]:
    """Every method hyperparameter: name -> [(method, Param)], in registry order."""
    out: dict[str, list] = {}
    for name in methods.names():
        for pname, prm in methods.get(name).PARAMS.items():
            out.setdefault(pname, []).append((name, prm))
    return out


METHOD_PARAMS = _method_params()


def _method_options(f):
    for pname, uses in reversed(list(METHOD_PARAMS.items())):
        flag = "--" + pname.replace("_", "-")
        text = "; ".join(f"[{m}] {prm.describe()}" for m, prm in uses)
        typ = uses[0][1].type
        if typ is bool:
            f = click.option(flag, pname, is_flag=True, default=None, help=text)(f)
        else:
            choices = uses[0][1].choices
            metavar = "|".join(choices) if choices else {int: "INT", float: "FLOAT", str: "TEXT"}[typ]
            f = click.option(flag, pname, default=None, metavar=metavar, help=text)(f)
    return f


def _epilog() -> str:
    lines = ["\b", "Optimizers (--opt):"]
    for name in methods.names():
        cls = methods.get(name)
        lr = "no --lr" if cls.default_lr is None else f"--lr default {cls.default_lr:g}"
        lines.append(f"  {name:<5} {cls.summary} [{lr}]")
    return "\n".join(lines)


@click.command("train", epilog=_epilog())
@click.option(
    "--model",
    "model_name",
    default="mlp",
    show_default=True,
    metavar="NAME|pkg.module:factory",
    help=f"Architecture: {', '.join(BUILTIN_MODELS)}, or pkg.module:factory.",
)
@click.option(
    "--model-kwargs",
    default=None,
    callback=_json_dict,
    metavar="JSON",
    help="e.g. '{\"widths\": [32, 32]}'; in_features/out_features default to the data's.",
)
@click.option(
    "--data",
    "data_name",
    default="digits",
    show_default=True,
    metavar="SPEC",
    help="digits, mnist1d, teacher, npz:PATH, h5:PATH or pkg.module:factory.",
)
@click.option("--data-kwargs", default=None, callback=_json_dict, metavar="JSON")
@click.option(
    "--loss", default=None, metavar="ce|lm|bce|mse|pkg.module:fn", help="Default: ce for labels, mse for float targets."
)
@click.option(
    "--opt",
    default="sgd",
    show_default=True,
    metavar="|".join(methods.names()),
    help="Optimizer (listed below; details in the README).",
)
@click.option(
    "--lr",
    type=float,
    default=None,
    metavar="FLOAT",
    help="Learning rate (eSGD: the outer eta, effective outer step eta*gamma). Default: per optimizer, listed below.",
)
@click.option(
    "--momentum",
    type=float,
    default=0.9,
    show_default=True,
    help="Momentum of the (outer) step: sgd, esgd (outer only), rsgd, heat, sam.",
)
@click.option("--nesterov", is_flag=True, help="Nesterov momentum (the Entropy-SGD authors used it on the outer step).")
@click.option(
    "--weight-decay", type=float, default=0.0, show_default=True, help="L2 coefficient added to each gradient."
)
@click.option(
    "--schedule",
    type=click.Choice(["constant", "cosine", "step"]),
    default="constant",
    show_default=True,
    help="Learning-rate schedule over the gradient budget.",
)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option(
    "--epochs",
    type=float,
    default=30,
    show_default=True,
    help="Budget in effective epochs: epochs x ceil(N_train / batch size) gradient evaluations.",
)
@click.option(
    "--budget", type=int, default=None, metavar="N", help="Budget in gradient evaluations (overrides --epochs)."
)
@click.option(
    "--budget-from",
    default=None,
    metavar="CKPT.pt",
    help="Use the gradient evaluations another flatscope checkpoint used as the budget.",
)
@click.option(
    "--resume",
    default=None,
    metavar="CKPT.pt",
    help="Continue a flatscope train checkpoint bit-identically to the total --epochs/--budget.",
)
@click.option(
    "--log",
    "log_path",
    default=None,
    metavar="RESULTS.h5",
    help="Also write the per-epoch history to the HDF5 group /train of this results file.",
)
@click.option(
    "--save-every",
    type=click.IntRange(min=1),
    default=None,
    metavar="K",
    help="Also save a trajectory checkpoint every K epochs into <out>-traj/ (for landscape PCA).",
)
@click.option(
    "--track",
    "track",
    default=None,
    metavar="MEASURES",
    help="Track curvature during training into /track of --log: comma-separated measures, e.g. "
    "lambda_max,trace (lambda_max[:k], lambda_min, trace[:N], local_energy:SIGMA, grad_norm, "
    "pre_lambda_max for adam). Costs no gradient evaluations; its time is reported apart.",
)
@click.option(
    "--track-every",
    type=int,
    default=50,
    show_default=True,
    metavar="N",
    help="Measure every N optimizer steps (and at step 0).",
)
@click.option(
    "--track-samples",
    type=int,
    default=512,
    show_default=True,
    metavar="N",
    help="Size of the fixed, seeded subset of the training set the tracked measures use.",
)
@_method_options
@click.option("-o", "--out", required=True, metavar="CKPT.pt", help="Where to write the checkpoint.")
@common_options
def command(
    model_name,
    model_kwargs,
    data_name,
    data_kwargs,
    loss,
    opt,
    lr,
    momentum,
    nesterov,
    weight_decay,
    schedule,
    batch_size,
    epochs,
    budget,
    budget_from,
    resume,
    log_path,
    save_every,
    track,
    track_every,
    track_samples,
    out,
    **rest,
):
    """Train a model and write a flatscope checkpoint.

    Every optimizer is charged in gradient evaluations (one minibatch gradient = 1; Entropy-SGD's
    Langevin steps, rSGD's replica steps and SAM's second gradient included), so --epochs E or
    --budget N give all optimizers the same budget. The checkpoint holds the per-epoch history
    (train/test loss and accuracy, gamma, tau, distances) and everything needed to --resume.

    \b
    Examples:
      flatscope train --model mlp --data digits --opt sgd --epochs 30 --seed 0 -o runs/mlp-sgd.pt
      flatscope train --model mlp --data digits --opt esgd --epochs 20 -o runs/mlp-esgd.pt
      flatscope train --model mlp --data digits --opt rsgd --replicas 3 -o runs/mlp-rsgd.pt
      flatscope train --model mlp --data digits --opt sgd --budget-from runs/mlp-esgd.pt -o runs/mlp-sgd-eq.pt
      flatscope train --resume runs/mlp-rsgd.pt --epochs 40 -o runs/mlp-rsgd-40.pt --log runs/rsgd.h5
      flatscope train --opt sgd --lr 0.05 --track lambda_max,trace --track-every 20 -o runs/mlp.pt --log runs/train.h5
      torchrun --nproc-per-node 3 -m flatscope train --opt rsgd --replicas 3 -o runs/mlp-rsgd.pt

    \b
    Under torchrun: rsgd puts its replicas on the ranks (--replicas at least the number of ranks) and
    esgd splits each minibatch across the ranks; every rank holds the same state and rank 0 writes.
    """
    method_kw = {k: rest.pop(k) for k in METHOD_PARAMS}
    extra = {k: v for k, v in method_kw.items() if v is not None}
    asked = resolve_device(rest.get("device", "auto"))
    run = Run(**dict(rest, device="cpu"))  # training runs on the CPU: under torchrun the gloo backend
    run.setup()
    if asked.type != "cpu":
        run.warn(f"flatscope train runs on the CPU; --device {rest.get('device', 'auto')} is ignored")
    ctx = click.get_current_context()
    explicit = {n for n in ctx.params if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE}
    if budget is not None and budget < 1:
        raise FlatscopeError(f"--budget must be at least 1, got {budget}")
    if budget is not None and budget_from is not None:
        raise FlatscopeError("give --budget or --budget-from, not both")
    if not 0 < epochs <= MAX_EPOCHS:
        raise FlatscopeError(f"--epochs must be positive and at most {MAX_EPOCHS:g}, got {epochs}")
    if budget is not None and budget > MAX_BUDGET:
        raise FlatscopeError(f"--budget must be at most {MAX_BUDGET:g} gradient evaluations, got {budget}")
    if batch_size < 1:
        raise FlatscopeError(f"--batch-size must be at least 1, got {batch_size}")
    if lr is not None and not lr > 0:
        raise FlatscopeError(f"--lr must be positive, got {lr}")
    if not 0 <= momentum < 1:
        raise FlatscopeError(f"--momentum must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise FlatscopeError(f"--weight-decay must be non-negative, got {weight_decay}")
    if os.path.isdir(out):
        raise FlatscopeError(f"-o {out} is a directory")
    check_checkpoint_output(out)
    folder = existing = os.path.dirname(os.path.abspath(out))
    while not os.path.isdir(existing):
        if os.path.exists(existing):
            raise FlatscopeError(f"cannot write {out}: {existing} is not a folder")
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        raise FlatscopeError(f"cannot write {out}: folder {existing} is not writable")
    if log_path is not None:
        store.check_output_path(log_path)
    track_measures = _check_track(track, track_every, track_samples, log_path)
    if budget_from is not None:
        src = load_checkpoint(budget_from).train or {}
        if not isinstance(src.get("grad_evals"), int):
            raise FlatscopeError(
                f"--budget-from {budget_from}: the checkpoint has no training record with a "
                "gradient-evaluation count (was it written by flatscope train?)"
            )
        budget = int(src["grad_evals"])
        if src.get("batch_size") not in (None, batch_size) and "batch_size" not in explicit:
            run.warn(
                f"{budget_from} was trained with batch size {src['batch_size']}, this run uses {batch_size}: "
                "equal evaluations, different epochs"
            )

    if resume is not None:
        model, data, loss, model_spec, data_spec, config, state = _resume(run, resume, explicit, extra, locals())
        opt = config.opt
        _check_distributed(opt)
    else:
        cls = methods.get(opt)
        resolve_params(opt, cls.PARAMS, extra)  # fail fast on bad hyperparameters
        _check_shared(opt, explicit)
        _check_distributed(opt)
        data_spec = {"name": data_name, "kwargs": data_kwargs or {}}
        data = load_data(data_spec, allow_import=is_factory_path(data_name))
        loss = make_loss(loss or ("ce" if data.classification else "mse"), allow_import=True)
        kwargs = dict(model_kwargs or {})
        if model_name in BUILTIN_MODELS:
            kwargs.setdefault("in_features", data.in_features)
            kwargs.setdefault("out_features", data.n_outputs)
        model_spec = {"name": model_name, "kwargs": kwargs}
        model = build_model(model_spec, allow_import=is_factory_path(model_name)).to(run.dtype)
        config = TrainConfig(
            opt=opt,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            schedule=schedule,
            batch_size=batch_size,
            epochs=epochs,
            budget=budget,
            seed=run.seed,
            save_every=save_every,
            extra=extra,
        )
        state = None
    hook, mon = None, None
    if track_measures is not None:
        if "pre_lambda_max" in track_measures and config.opt != "adam":
            raise FlatscopeError(
                f"--track pre_lambda_max needs an optimizer with second moments (--opt adam); "
                f"--opt {config.opt} has none"
            )
        mon, hook = _monitor(
            run, model, data, loss, track_measures, track_every, track_samples, log_path, out, resume is not None
        )
    if run.is_main:
        os.makedirs(folder, exist_ok=True)
    n_train = len(data.train)
    n_batches = -(-n_train // max(1, min(config.batch_size, n_train)))
    total = config.budget if config.budget is not None else int(round(config.epochs * n_batches))
    with run.progress(total, f"train {opt}") as advance:
        loss_obj = make_loss(loss)
        loss = loss_obj.name
        record = train(
            model,
            data,
            loss_obj,
            config,
            model_spec=model_spec,
            data_spec=data_spec,
            out=out,
            progress=advance,
            resume_state=state and state["resume"],
            history=state and state["history"],
            on_warning=run.warn,
            monitor=hook,
        )
    if mon is not None:
        cols = mon.columns()
        record["tracking"] = {
            "measures": track_measures,
            "every": track_every,
            "rows": len(mon.rows),
            "cost_s": float(cols["cost_s"].sum()) if mon.rows else 0.0,
            "hvps": int(cols["hvps"].sum()) if mon.rows else 0,
            "group": "/track",
            "log": os.path.abspath(log_path),
        }
    if resume is not None:
        record["resumed_from"] = {
            "path": os.path.abspath(resume),
            "sha256": state["sha256"],
            "grad_evals": state["grad_evals"],
        }
    record["world_size"] = distributed.world_size()
    if run.is_main:  # every rank holds the same result; rank 0 writes it
        save_checkpoint(out, model, model_spec, data_spec, loss, record)
    run.note(f"wrote {out}")
    h = record["history"]
    method_logs = {
        k: h[k][-1]
        for k in h
        if k not in ("epoch", "grad_evals", "wall_time_s", "train_loss", "train_acc", "test_loss", "test_acc")
    }
    payload = {
        "checkpoint": os.path.abspath(out),
        "optimizer": opt,
        "hparams": record["hparams"],
        "budget": record["budget"],
        "grad_evals": record["grad_evals"],
        "grad_evals_by_kind": record["grad_evals_by_kind"],
        "effective_epochs": record["effective_epochs"],
        "wall_time_s": record["wall_time_s"],
        "train_loss": h["train_loss"][-1],
        "train_acc": h["train_acc"][-1],
        "test_loss": (h.get("test_loss") or [None])[-1],
        "test_acc": (h.get("test_acc") or [None])[-1],
        "final": method_logs,
        "warnings": record["warnings"],
        "log": None,
        "tracking": record.get("tracking"),
    }
    if log_path is not None and run.is_main:
        payload["log"] = _write_log(run, log_path, out, record, payload, data_spec, loss)

    def human(console):
        console.print(
            f"trained {model_spec['name']} on {data_spec['name']} with {opt}: {record['grad_evals']} gradient "
            f"evaluations ({record['effective_epochs']:.1f} epochs; "
            + ", ".join(f"{k} {v}" for k, v in record["grad_evals_by_kind"].items() if v)
            + f") in {record['wall_time_s']:.1f} s"
        )
        line = f"train loss {payload['train_loss']:.4f}  acc {payload['train_acc']:.4f}"
        if payload["test_loss"] is not None:
            line += f"   test loss {payload['test_loss']:.4f}  acc {payload['test_acc']:.4f}"
        console.print(line)
        tr = record.get("tracking")
        if tr:
            last = mon.rows[-1] if mon.rows else {}
            vals = "  ".join(
                f"{k} {last[k]:.4g}"
                for k in ("lambda_max", "two_over_lr", "trace", "lambda_min", "pre_lambda_max", "grad_norm")
                if k in last
            )
            console.print(
                f"tracked {tr['rows']} steps into /track of {log_path}: {tr['hvps']} Hessian-vector products "
                f"in {tr['cost_s']:.1f} s (not in the gradient budget); last: {vals}"
            )
        if method_logs:
            console.print(
                "  ".join(f"{k} {v:.4g}" for k, v in method_logs.items() if not re.fullmatch(r"replica_dist_\d+", k))
            )

    run.emit(payload, human)


def _check_track(track, every: int, samples: int, log_path) -> list[str] | None:
    """The --track measures, validated before anything is computed (None without --track)."""
    from ...monitor import parse_measures

    if track is None:
        return None
    if every < 1:
        raise FlatscopeError(f"--track-every must be at least 1, got {every}")
    if samples < 1:
        raise FlatscopeError(f"--track-samples must be at least 1, got {samples}")
    if log_path is None:
        raise FlatscopeError("--track writes its rows to /track of a results file: give --log RESULTS.h5")
    parse_measures(track)
    return [m.strip() for m in track.split(",")]


def _monitor(run, model, data, loss, measures, every, samples, log_path, out, resumed):
    """The CurvatureMonitor of --track and the training loop's hook (rank 0 alone measures and writes)."""
    from ...monitor import CurvatureMonitor

    test = data.test
    mon = CurvatureMonitor(
        model,
        loss,
        data.train,
        every=every,
        measures=measures,
        log=log_path if run.is_main else None,
        samples=samples,
        test=test,
        seed=run.seed,
        provenance={"command": run.provenance()["command"], "checkpoint": os.path.abspath(out)},
        resume=resumed,
    )

    import torch

    def hook(step, method, lr):
        if run.is_main and mon.due(step):
            with torch.random.fork_rng(devices=[]):  # materializing a method's result draws nothing either
                result = method.result_model()
            mon.step(step, lr=lr, optimizer=getattr(method, "opt", None), model=result, force=True)

    return mon, hook


def _check_distributed(opt: str) -> None:
    if distributed.world_size() > 1 and opt not in DISTRIBUTED:
        raise FlatscopeError(
            f"--opt {opt} does not run under torchrun (it would train the same model on every rank); "
            f"use {' or '.join(DISTRIBUTED)}, or run {opt} in one process"
        )


def _check_shared(opt: str, explicit: set) -> None:
    uses = USES.get(opt, set(SHARED))
    bad = sorted(n for n in explicit & set(SHARED) if n not in uses)
    if bad:
        raise FlatscopeError(f"{', '.join('--' + n.replace('_', '-') for n in bad)} does not apply to --opt {opt}")


def _resume(run, path: str, explicit: set, extra: dict, given: dict):
    """Model, data and configuration of a resumed run; options that would change it are errors."""
    model_name = given["model_name"]
    raw = peek_checkpoint(path)  # no model built yet: a stored factory is imported only if the user named it
    stored_name = raw.get("model").get("name") if isinstance(raw.get("model"), dict) else None
    if "model_name" in explicit and model_name != stored_name:
        raise FlatscopeError(
            f"--model cannot change with --resume: {path} was trained with {stored_name!r}, not "
            f"{model_name!r}, and a resumed run keeps its checkpoint's model, data and loss"
        )
    ck = load_checkpoint(path, allow_import="model_name" in explicit and is_factory_path(model_name))
    rec = ck.train or {}
    if not isinstance(rec.get("resume"), dict) or not isinstance(rec.get("config"), dict) or ck.model_spec is None:
        raise FlatscopeError(f"{path} holds no resumable training state (it was not written by this flatscope train)")
    stored = TrainConfig.from_dict(rec["config"])
    stored_given = {
        "model_name": ck.model_spec.get("name"),
        "data_name": (ck.data_spec or {}).get("name"),
        "data_kwargs": (ck.data_spec or {}).get("kwargs") or None,
        "loss": ck.loss,
        "save_every": stored.save_every,
    }
    for name in ("model_name", "model_kwargs", "data_name", "data_kwargs", "loss", "save_every"):
        if name in explicit and (name == "model_kwargs" or given[name] != stored_given[name]):
            raise FlatscopeError(
                f"--{name.replace('_name', '').replace('_', '-')} cannot change with --resume: "
                "a resumed run keeps its checkpoint's model, data and loss"
            )
    for name in KEPT_ON_RESUME:
        if name in explicit:
            mine = run.seed if name == "seed" else given[name]
            if mine != getattr(stored, name):
                raise FlatscopeError(
                    f"--{name.replace('_', '-')} {mine} differs from the checkpoint's "
                    f"{getattr(stored, name)}: a resumed run keeps its configuration"
                )
    if extra:
        cls = methods.get(stored.opt)
        kept = resolve_params(stored.opt, cls.PARAMS, stored.extra)
        mine = resolve_params(stored.opt, cls.PARAMS, dict(stored.extra, **extra))
        for name in extra:
            if mine[name] != kept[name]:
                raise FlatscopeError(
                    f"--{name.replace('_', '-')} {mine[name]} differs from the checkpoint's "
                    f"{kept[name]}: a resumed run keeps its configuration"
                )
    if "dtype" in explicit and rec.get("dtype") and run.dtype_name != rec["dtype"]:
        raise FlatscopeError(f"--dtype {run.dtype_name} differs from the checkpoint's {rec['dtype']}")
    if given["budget"] is not None:
        stored.budget, stored.epochs = given["budget"], stored.epochs
    elif "epochs" in explicit:
        stored.budget, stored.epochs = None, given["epochs"]
    else:
        raise FlatscopeError("with --resume, give the total --epochs or --budget to train to")
    import torch

    model = ck.model.to(getattr(torch, rec.get("dtype", "float32")))
    data = load_data(ck.data_spec, allow_import="data_name" in explicit and is_factory_path(given["data_name"]))
    state = {
        "resume": rec["resume"],
        "history": rec.get("history") or {},
        "sha256": ck.sha256,
        "grad_evals": rec.get("grad_evals"),
    }
    return model, data, ck.loss, ck.model_spec, ck.data_spec, stored, state


def _write_log(run, log_path: str, out: str, record: dict, payload: dict, data_spec: dict, loss: str) -> str:
    import json

    import numpy as np

    tree = {
        "history": {k: np.asarray(v, dtype=np.float64) for k, v in record["history"].items()},
        "grad_evals_by_kind": {k: np.int64(v) for k, v in record["grad_evals_by_kind"].items()},
        "optimizer": record["optimizer"],
        "budget": np.int64(record["budget"]),
        "grad_evals": np.int64(record["grad_evals"]),
        "batches_per_epoch": np.int64(record["batches_per_epoch"]),
        "effective_epochs": np.float64(record["effective_epochs"]),
        "wall_time_s": np.float64(record["wall_time_s"]),
    }
    summary = {
        k: payload[k]
        for k in ("grad_evals", "effective_epochs", "wall_time_s", "train_loss", "train_acc", "test_loss", "test_acc")
    }
    summary.update({k: v for k, v in payload["final"].items() if not re.fullmatch(r"replica_dist_\d+", k)})
    prov = run.provenance()
    prov.update(
        {
            "checkpoint": os.path.abspath(out),
            "checkpoint_sha256": sha256_file(out),
            "seed": record["seed"],
            "data": json.dumps(data_spec),
            "loss": loss,
        }
    )
    with store.update(log_path) as f:
        store.write_analysis(
            f,
            "train",
            tree,
            kind="train",
            summary=summary,
            options={
                "optimizer": record["optimizer"],
                "hparams": record["hparams"],
                "config": record["config"],
                "warnings": record["warnings"],
            },
            provenance=prov,
        )
    run.note(f"wrote /train to {log_path}")
    return os.path.abspath(log_path)
