"""Curvature tracking inside PyTorch Lightning: a ``Callback`` over :class:`flatscope.monitor.CurvatureMonitor`.

::

    from flatscope.integrations.lightning import CurvatureCallback
    trainer = L.Trainer(callbacks=[CurvatureCallback(loss="ce", data=(X, y), every=50, log="run.h5")])

The LightningModule itself is the measured model (``module(inputs)`` must give the outputs ``loss``
applies to; otherwise pass ``objective=``). The step is ``trainer.global_step`` (optimizer steps),
the learning rate and optimizer those of ``trainer.optimizers[0]``. Works with ``lightning`` (2.x)
or the older ``pytorch_lightning`` package, whichever is installed.
"""

from __future__ import annotations

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError("flatscope.integrations.lightning needs PyTorch Lightning: pip install lightning") from exc

from ..monitor import CurvatureMonitor


class CurvatureCallback(pl.Callback):
    """``CurvatureCallback(monitor=mon)`` or ``CurvatureCallback(**CurvatureMonitor arguments but model)``."""

    def __init__(self, monitor: CurvatureMonitor | None = None, **monitor_kwargs):
        super().__init__()
        if monitor is not None and monitor_kwargs:
            raise TypeError("give a monitor or the monitor's arguments, not both")
        self.monitor = monitor
        self._kwargs = monitor_kwargs

    @staticmethod
    def _opt(trainer):
        opts = getattr(trainer, "optimizers", None) or []
        return opts[0] if opts else None

    def _step(self, trainer, pl_module, step: int) -> None:
        if step == getattr(self, "_last", None):  # gradient accumulation: one measurement per optimizer step
            return
        self._last = step
        opt = self._opt(trainer)
        lr = float(opt.param_groups[0]["lr"]) if opt is not None else None
        if self.monitor is not None:
            self.monitor.step(step, lr=lr, optimizer=opt, model=pl_module)

    def on_train_start(self, trainer, pl_module):
        if self.monitor is None:
            self.monitor = CurvatureMonitor(pl_module, **self._kwargs)
        if trainer.global_step == 0:
            self._step(trainer, pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._step(trainer, pl_module, int(trainer.global_step))
