"""Curvature tracking inside a Hugging Face ``transformers.Trainer``: a ``TrainerCallback`` over
:class:`flatscope.monitor.CurvatureMonitor`.

::

    from flatscope.integrations.hf_trainer import CurvatureCallback
    cb = CurvatureCallback(loss="ce", data=(X_eval, y_eval), every=50, measures=["lambda_max"], log="run.h5")
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()

The monitor calls ``model(inputs)`` on the evaluation inputs and applies ``loss`` to the output
(a tensor); for a model that takes keyword inputs or returns a ``ModelOutput``, pass
``objective=`` (a factory ``model -> Objective``) or a ready ``monitor=``. The step is the Trainer's
``state.global_step`` (optimizer steps: 0 before training, then 1, 2, ...), the learning rate the
scheduler's current one, and the optimizer (unwrapped from accelerate's wrapper) is read for the
stability threshold and ``pre_lambda_max``. Nothing of the Trainer's state is changed.
"""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "flatscope.integrations.hf_trainer needs Hugging Face transformers: pip install transformers"
    ) from exc

from ..monitor import CurvatureMonitor


def _unwrap(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


class CurvatureCallback(TrainerCallback):
    """``CurvatureCallback(monitor=mon)`` or ``CurvatureCallback(**CurvatureMonitor arguments but model)``:
    the monitor is then built on the Trainer's model when training begins."""

    def __init__(self, monitor: CurvatureMonitor | None = None, **monitor_kwargs):
        if monitor is not None and monitor_kwargs:
            raise TypeError("give a monitor or the monitor's arguments, not both")
        self.monitor = monitor
        self._kwargs = monitor_kwargs

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.monitor is None:
            self.monitor = CurvatureMonitor(model, **self._kwargs)
        if state.global_step == 0:
            self.monitor.step(
                0, lr=_lr(optimizer, kwargs.get("lr_scheduler")), optimizer=_unwrap(optimizer), model=model
            )

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.monitor is None:
            self.monitor = CurvatureMonitor(model, **self._kwargs)
        self.monitor.step(
            int(state.global_step), lr=_lr(optimizer, lr_scheduler), optimizer=_unwrap(optimizer), model=model
        )


def _lr(optimizer, scheduler) -> float | None:
    if scheduler is not None and hasattr(scheduler, "get_last_lr"):
        return float(scheduler.get_last_lr()[0])
    groups = getattr(_unwrap(optimizer), "param_groups", None)
    return float(groups[0]["lr"]) if groups else None
