"""Losses and metrics: what the objective averages over a split, and how a model's output is read.

A :class:`Loss` gives, for one batch, the mean loss and the number of terms it is a mean over
(samples; tokens for ``lm`` and for ``ce`` on sequences, ignored positions not counted). The
objective weights each batch by that count, so its value is the exact mean over the whole split:
by sample for ``ce``/``mse``/``bce``/custom losses, by counted token for ``lm``.

- ``ce``: cross-entropy on class labels; outputs ``(N, C)`` or ``(N, ..., C)`` against labels
  ``(N,)`` or ``(N, ...)``; ``label_smoothing``; targets equal to ``ignore_index`` (-100) are skipped.
- ``lm``: next-token cross-entropy: logits ``(N, T, V)`` at position t predict token t+1 of the
  targets ``(N, T)`` (usually the input ids); the mean is over non-ignored predicted tokens.
- ``bce``: binary cross-entropy with logits; targets 0/1 of the outputs' shape.
- ``mse``: mean squared error; integer targets are one-hot encoded against ``C`` outputs.
- ``pkg.module:fn``: ``fn(outputs, targets) -> mean loss`` (a 0-d tensor), imported only when named
  on the command line.

Accuracy is argmax accuracy (per counted token for ``lm``/sequence ``ce``), ``outputs > 0`` for
``bce``, and NaN for regression; a custom metric ``fn(outputs, targets) -> mean value`` replaces it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import FlatscopeError

BUILTIN_LOSSES = ("ce", "lm", "bce", "mse")
IGNORE_INDEX = -100


def extract_output(out, key: str | None = None) -> torch.Tensor:
    """The tensor a loss is taken of: the output itself, ``.logits`` / the first entry of a dict or
    ``ModelOutput``, the first element of a tuple; or entry ``key`` (a name, or an index for tuples)."""
    if key is not None:
        if isinstance(out, dict) or hasattr(out, "keys"):
            if key not in out.keys():
                raise FlatscopeError(f"the model output has no {key!r} (it has {', '.join(map(str, out.keys()))})")
            out = out[key]
        elif isinstance(out, (tuple, list)):
            try:
                out = out[int(key)]
            except (ValueError, IndexError):
                raise FlatscopeError(
                    f"--output {key!r}: the model returns a tuple of {len(out)}; give an index 0..{{}}".format(
                        len(out) - 1
                    )
                ) from None
        else:
            raise FlatscopeError(f"--output {key!r}: the model returns a single {type(out).__name__}")
    elif not isinstance(out, torch.Tensor):
        if isinstance(out, dict) or hasattr(out, "keys"):
            keys = list(out.keys())
            if "logits" in keys:
                out = out["logits"]
            elif keys:
                out = out[keys[0]]
        elif isinstance(out, (tuple, list)) and out:
            out = out[0]
    if not isinstance(out, torch.Tensor):
        raise FlatscopeError(f"the model output is a {type(out).__name__}, not a tensor; choose one with --output KEY")
    return out


class Loss:
    """A named loss: ``mean(out, y)``, ``count(y)`` and ``correct(out, y)`` for one batch."""

    name = "loss"
    accuracy = True

    def mean(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def count(self, out_or_none, y: torch.Tensor) -> int:
        return int(y.shape[0])

    def correct(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Correct predictions in the batch (float64), NaN where accuracy means nothing."""
        return torch.full((), float("nan"), dtype=torch.float64, device=out.device)

    def check(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """Raise a clear error when outputs and targets cannot go together (probed on one batch)."""

    def __repr__(self):
        return self.name


class CrossEntropy(Loss):
    name = "ce"

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX):
        if not 0.0 <= label_smoothing < 1.0:
            raise FlatscopeError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing, self.ignore_index = float(label_smoothing), int(ignore_index)

    def _flat(self, out, y):
        if y.dim() == 1 and out.dim() == 2:
            return out, y
        return out.reshape(-1, out.shape[-1]), y.reshape(-1)

    def check(self, out, y):
        if torch.is_floating_point(y):
            raise FlatscopeError("loss 'ce' needs integer class labels; use --loss mse or bce for float targets")
        if out.dim() < 2 or tuple(out.shape[:-1]) != tuple(y.shape):
            raise FlatscopeError(
                f"loss 'ce': outputs {list(out.shape)} do not fit labels {list(y.shape)} "
                "(outputs must be labels' shape + classes)"
            )
        valid = y[y != self.ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= out.shape[-1]):
            raise FlatscopeError(
                f"class labels range over {int(valid.min())}..{int(valid.max())} but the model has "
                f"{out.shape[-1]} outputs"
            )

    def mean(self, out, y):
        o, t = self._flat(out, y)
        return F.cross_entropy(o, t, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)

    def count(self, out, y):
        return int((y != self.ignore_index).sum())

    def correct(self, out, y):
        o, t = self._flat(out, y)
        keep = t != self.ignore_index
        return ((o.argmax(-1) == t) & keep).sum().to(torch.float64)


class NextToken(CrossEntropy):
    """Causal language modelling: logits at position t predict target t+1."""

    name = "lm"

    def _shift(self, out, y):
        return out[..., :-1, :], y[..., 1:]

    def check(self, out, y):
        if torch.is_floating_point(y) or y.dim() < 2:
            raise FlatscopeError(
                f"loss 'lm' needs integer token sequences as targets (N, T), got {list(y.shape)} "
                f"{str(y.dtype).replace('torch.', '')}"
            )
        if out.dim() != y.dim() + 1 or tuple(out.shape[:-1]) != tuple(y.shape):
            raise FlatscopeError(
                f"loss 'lm' needs sequence logits (N, T, vocab) for targets {list(y.shape)}, "
                f"got outputs {list(out.shape)}"
            )
        super().check(out, y)

    def mean(self, out, y):
        return super().mean(*self._shift(out, y))

    def count(self, out, y):
        return int((y[..., 1:] != self.ignore_index).sum())

    def correct(self, out, y):
        return super().correct(*self._shift(out, y))


class BinaryCrossEntropy(Loss):
    name = "bce"

    def check(self, out, y):
        if out.numel() != y.numel():
            raise FlatscopeError(f"loss 'bce': outputs {list(out.shape)} and targets {list(y.shape)} differ in size")
        if y.numel() and (float(y.min()) < 0 or float(y.max()) > 1):
            raise FlatscopeError("loss 'bce' needs targets in [0, 1]")

    def mean(self, out, y):
        return F.binary_cross_entropy_with_logits(out, y.reshape(out.shape).to(out.dtype))

    def correct(self, out, y):
        hit = (out > 0) == (y.reshape(out.shape) > 0.5)
        return hit.reshape(hit.shape[0], -1).all(-1).sum().to(torch.float64)


class MeanSquared(Loss):
    name = "mse"

    def _target(self, out, y):
        if torch.is_floating_point(y):
            return y.reshape(out.shape).to(out.dtype)
        return F.one_hot(y, out.shape[-1]).to(out.dtype)

    def check(self, out, y):
        if torch.is_floating_point(y):
            if out.numel() != y.numel():
                raise FlatscopeError(
                    f"loss 'mse': outputs {list(out.shape)} and targets {list(y.shape)} differ in size"
                )
        elif y.dim() != 1 or out.dim() != 2 or int(y.min()) < 0 or int(y.max()) >= out.shape[-1]:
            raise FlatscopeError(
                f"loss 'mse' with class labels needs outputs (N, C) and labels 0..C-1; got "
                f"outputs {list(out.shape)}, labels {list(y.shape)} up to {int(y.max())}"
            )

    def mean(self, out, y):
        return F.mse_loss(out, self._target(out, y))

    def correct(self, out, y):
        if torch.is_floating_point(y):
            return super().correct(out, y)
        return (out.argmax(-1) == y).sum().to(torch.float64)


class CustomLoss(Loss):
    """``fn(outputs, targets) -> mean loss`` of a user's module; the mean is taken to be by sample."""

    accuracy = False

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def mean(self, out, y):
        v = self.fn(out, y)
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            raise FlatscopeError(
                f"loss {self.name!r} returned {type(v).__name__}"
                + (f" of shape {list(v.shape)}" if isinstance(v, torch.Tensor) else "")
                + ", not a scalar tensor"
            )
        return v.reshape(())

    def check(self, out, y):
        try:
            v = self.mean(out, y)
        except FlatscopeError:
            raise
        except Exception as exc:
            raise FlatscopeError(f"loss {self.name!r} failed on the first batch: {type(exc).__name__}: {exc}") from None
        if not torch.isfinite(v.detach()).all():
            raise FlatscopeError(f"loss {self.name!r} returned a non-finite value ({float(v)}) on the first batch")


class Metric:
    """``fn(outputs, targets) -> mean value`` over a batch, weighted by samples (replaces accuracy)."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def __call__(self, out, y) -> torch.Tensor:
        try:
            v = self.fn(out, y)
        except FlatscopeError:
            raise
        except Exception as exc:
            raise FlatscopeError(f"metric {self.name!r} failed: {type(exc).__name__}: {exc}") from None
        v = torch.as_tensor(v)
        if v.numel() != 1:
            raise FlatscopeError(f"metric {self.name!r} returned shape {list(v.shape)}, not a scalar")
        v = v.detach().reshape(()).to(torch.float64)
        if not torch.isfinite(v):
            raise FlatscopeError(f"metric {self.name!r} returned a non-finite value ({float(v)})")
        return v


def make_loss(spec, *, label_smoothing: float = 0.0, allow_import: bool = False) -> Loss:
    """A :class:`Loss` from a name (``ce``, ``lm``, ``bce``, ``mse``, ``pkg.module:fn``) or a Loss."""
    if isinstance(spec, Loss):
        return spec
    if callable(spec):
        return CustomLoss(spec, getattr(spec, "__name__", "custom"))
    if not isinstance(spec, str) or not spec:
        raise FlatscopeError(f"unknown loss {spec!r}; choose from {', '.join(BUILTIN_LOSSES)} or pkg.module:fn")
    if spec == "ce":
        return CrossEntropy(label_smoothing)
    if label_smoothing and spec != "lm":
        raise FlatscopeError("--label-smoothing applies to --loss ce or lm only")
    if spec == "lm":
        return NextToken(label_smoothing)
    if spec == "bce":
        return BinaryCrossEntropy()
    if spec == "mse":
        return MeanSquared()
    if ":" in spec:
        if not allow_import:
            raise FlatscopeError(
                f"the checkpoint names the loss {spec!r}; flatscope imports code only when you "
                f"pass it yourself: add --loss {spec}"
            )
        from .models import _import_factory

        return CustomLoss(_import_factory(spec), spec)
    raise FlatscopeError(f"unknown loss {spec!r}; choose from {', '.join(BUILTIN_LOSSES)} or pkg.module:fn")


def make_metric(spec, *, allow_import: bool = False) -> Metric | None:
    if spec is None or isinstance(spec, Metric):
        return spec
    if callable(spec):
        return Metric(spec, getattr(spec, "__name__", "metric"))
    if isinstance(spec, str) and ":" in spec:
        if not allow_import:
            raise FlatscopeError(f"the metric {spec!r} is imported only when you pass --metric {spec} yourself")
        from .models import _import_factory

        return Metric(_import_factory(spec), spec)
    raise FlatscopeError(f"--metric must be pkg.module:fn, got {spec!r}")
