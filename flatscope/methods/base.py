"""The interface every training method implements, and plain SGD / Adam."""

from __future__ import annotations

from typing import Callable

import torch

from . import register
from ._flat import Param, resolve_params


class Method:
    """Base class. Subclasses implement :meth:`step`; the rest has sensible defaults.

    - ``model``: the network being trained; :meth:`result_model` writes the method's result into
      it (the center for replicated methods, the outer iterate for two-loop methods) and returns it;
    - ``loss_fn(model, xb, yb) -> loss``: the training loss on a minibatch (train mode); ``model``
      may be any callable ``x -> outputs``;
    - ``config``: the :class:`flatscope.training.TrainConfig`; method hyperparameters come from
      ``config.extra`` and are declared in :attr:`PARAMS` (validated, defaults filled in: ``self.p``).

    Budget contract: one call of :meth:`step` consumes exactly :attr:`evals_per_step` evaluations
    from the stream (``stream.next`` / ``stream.charge``), so the training loop can stop any method
    at a budget without overshooting. Methods draw every random number from their own generators
    (saved in :meth:`state_dict`), so a resumed run continues bit for bit.
    """

    name = "base"
    summary = ""  # one line for --help
    PARAMS: dict[str, Param] = {}
    default_lr: float | None = 0.05  # None: the method has no learning rate
    evals_per_step = 1

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, config):
        self.model, self.loss_fn, self.config = model, loss_fn, config
        self.p = resolve_params(self.name, self.PARAMS, dict(config.extra or {}))
        self.lr = (config.lr if config.lr is not None else self.default_lr) if self.default_lr is not None else None
        self._warn: Callable[[str, str], None] | None = None
        self.stream = None

    # -- called by the training loop
    def setup(self, stream) -> None:
        """Once, before the first step (and before :meth:`load_state_dict` on resume)."""
        self.stream = stream

    def step(self, stream, lr: float) -> None:
        raise NotImplementedError

    def result_model(self) -> torch.nn.Module:
        return self.model

    def epoch_logs(self) -> dict[str, float]:
        """Extra scalars logged in the history each epoch (gamma, distances, ...)."""
        return {}

    def hparams(self) -> dict:
        out = dict(self.p)
        if self.lr is not None:
            out["lr"] = self.lr
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def extra_record(self) -> dict:
        """Extra entries for the checkpoint's training record (e.g. the replicas)."""
        return {}

    def warn(self, key: str, message: str) -> None:
        if self._warn is not None:
            self._warn(key, message)


class _TorchOptim(Method):
    def _grad_step(self, stream, lr: float) -> None:
        xb, yb = stream.next()
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        self.loss_fn(self.model, xb, yb).backward()
        self.opt.step()

    def step(self, stream, lr: float) -> None:
        self._grad_step(stream, lr)

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])


@register("sgd")
class SGD(_TorchOptim):
    """Minibatch SGD with optional (Nesterov) momentum and weight decay."""

    summary = "minibatch SGD, (Nesterov) momentum, weight decay"

    def __init__(self, model, loss_fn, config):
        super().__init__(model, loss_fn, config)
        self.opt = torch.optim.SGD(
            model.parameters(),
            lr=self.lr,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )

    def hparams(self) -> dict:
        c = self.config
        return {"lr": self.lr, "momentum": c.momentum, "nesterov": c.nesterov, "weight_decay": c.weight_decay}


@register("adam")
class Adam(_TorchOptim):
    """Adam (torch.optim.Adam; --weight-decay is L2 as in torch)."""

    summary = "Adam (torch.optim.Adam)"
    default_lr = 1e-3

    def __init__(self, model, loss_fn, config):
        super().__init__(model, loss_fn, config)
        self.opt = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=config.weight_decay)

    def hparams(self) -> dict:
        return {"lr": self.lr, "weight_decay": self.config.weight_decay}
