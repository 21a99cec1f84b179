"""The interface every training method implements, and plain SGD / Adam."""

from __future__ import annotations

from typing import Callable

import torch

from . import register


class Method:
    """Base class. Subclasses implement :meth:`step`; the rest has sensible defaults.

    - ``model``: the network being trained (its parameters are the result unless
      :meth:`result_model` says otherwise, as for replicated methods);
    - ``loss_fn(model, xb, yb) -> loss``: the training loss on a minibatch (train mode);
    - ``config``: the :class:`flatscope.training.TrainConfig`.
    """

    name = "base"

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, config):
        self.model, self.loss_fn, self.config = model, loss_fn, config

    def step(self, stream, lr: float) -> None:
        raise NotImplementedError

    def result_model(self) -> torch.nn.Module:
        return self.model

    def epoch_logs(self) -> dict[str, float]:
        """Extra scalars logged in the history each epoch (gamma, distances, ...)."""
        return {}

    def hparams(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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

    def __init__(self, model, loss_fn, config):
        super().__init__(model, loss_fn, config)
        self.opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                   nesterov=config.nesterov and config.momentum > 0,
                                   weight_decay=config.weight_decay)

    def hparams(self) -> dict:
        c = self.config
        return {"lr": c.lr, "momentum": c.momentum, "nesterov": c.nesterov, "weight_decay": c.weight_decay}


@register("adam")
class Adam(_TorchOptim):
    """Adam (torch.optim.Adam; --weight-decay is L2 as in torch)."""

    def __init__(self, model, loss_fn, config):
        super().__init__(model, loss_fn, config)
        self.opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def hparams(self) -> dict:
        return {"lr": self.config.lr, "weight_decay": self.config.weight_decay}
