"""``flatscope info``: what a checkpoint holds."""

from __future__ import annotations

import os

import click

from ...results import to_jsonable
from ..common import analysis_options, pass_run


def describe(run) -> dict:
    ck = run.checkpoint
    info = {
        "checkpoint": os.path.abspath(ck.path),
        "sha256": ck.sha256,
        "kind": ck.kind,
        "model": ck.model_spec,
        "n_params": ck.n_params,
        "n_trainable": ck.n_params,
        "n_frozen": sum(p.numel() for p in ck.model.parameters() if not p.requires_grad),
        "parameters": [
            {"name": n, "shape": list(p.shape), "trainable": bool(p.requires_grad)}
            for n, p in ck.model.named_parameters()
        ],
        "data": None,
        "loss": None,
        "metrics": {},
    }
    if run.data_name is None and not ck.data_spec:
        info["note"] = "no data is known for this checkpoint: pass --data SPEC (and --loss) for metrics"
    else:
        info["data"], info["loss"] = run.data_spec(), run.loss_name
        data = run.data
        info["n_train"] = len(data.train)
        info["n_test"] = 0 if data.test is None else len(data.test)
        for split in ("train", "test"):
            if split == "test" and data.test is None:
                continue
            loss, acc = run.objective(split).evaluate()
            info["metrics"][split] = {"loss": loss, "accuracy": acc}
    t = ck.train or {}
    if t:
        info["training"] = {
            k: t.get(k)
            for k in (
                "optimizer",
                "hparams",
                "seed",
                "batch_size",
                "budget",
                "grad_evals",
                "effective_epochs",
                "wall_time_s",
                "versions",
            )
        }
        info["training"]["history"] = t.get("history")
    return to_jsonable(info)


@click.command("info")
@analysis_options
@pass_run(writes=False)
def command(run):
    """Describe a checkpoint: model, parameters, data, loss, train/test metrics, training record.

    \b
    Example:
      flatscope info sample_checkpoints/mlp-sgd.pt
      flatscope info sample_checkpoints/mlp-sgd.pt --json
    """
    info = describe(run)

    def human(console):
        from rich.table import Table

        console.print(f"[bold]{run.checkpoint.path}[/bold]  ({info['kind']}, sha256 {info['sha256'][:12]}...)")
        m = info["model"] or {}
        console.print(f"model   {m.get('name', '(torch.export program)')} {m.get('kwargs', '')}")
        frozen = f", {info['n_frozen']:,} frozen" if info["n_frozen"] else ""
        console.print(f"params  {info['n_params']:,} trainable{frozen} in {len(info['parameters'])} tensors")
        if info["data"]:
            console.print(
                f"data    {info['data']['name']} {info['data'].get('kwargs') or ''}  "
                f"({info.get('n_train')} train / {info.get('n_test')} test), loss {info['loss']}"
            )
        if info["metrics"]:
            t = Table("split", "loss", "accuracy")
            for split, v in info["metrics"].items():
                t.add_row(split, f"{v['loss']:.5g}", "-" if v["accuracy"] is None else f"{v['accuracy']:.4f}")
            console.print(t)
        tr = info.get("training")
        if tr:
            console.print(
                f"trained {tr['optimizer']} {tr['hparams']}, seed {tr['seed']}, batch {tr['batch_size']}: "
                f"{tr['grad_evals']} gradient evaluations ({tr['effective_epochs']:.1f} epochs), "
                f"{tr['wall_time_s']:.1f} s, torch {tr['versions']['torch']}"
            )
        if info.get("note"):
            console.print(f"note: {info['note']}")

    run.emit(info, human)
