"""Built-in models and the model spec that travels in a checkpoint.

A model spec is ``{"name": NAME, "kwargs": {...}}``. ``NAME`` is a built-in (``mlp``, ``cnn``,
``cnn1d``, ``resnet``, ``linear``) or ``pkg.module:factory``; a factory is imported only when the user
names it on the command line (:func:`build_model` with ``allow_import=True``), never because a
checkpoint says so.

Every built-in takes inputs of shape ``(N, in_features)`` or ``(N, C, H, W)`` (``cnn1d``: ``(N, C, L)``)
and reshapes internally. ``torchvision:NAME`` builds a torchvision architecture (``--model-kwargs`` such as
``{"num_classes": 10}``, no pretrained weights); ``hf:DIR`` builds the architecture of a local Hugging
Face folder from its config (see :mod:`flatscope.hf`).
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Any, Callable

import torch
from torch import nn

from .errors import FlatscopeError

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
}


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise FlatscopeError(f"unknown activation {name!r}; choose from {', '.join(_ACTIVATIONS)}") from None


def _image_shape(in_features: int, in_shape: list[int] | tuple[int, ...] | None) -> tuple[int, int, int]:
    if in_shape is not None:
        shape = tuple(int(s) for s in in_shape)
        if len(shape) != 3 or math.prod(shape) != in_features:
            raise FlatscopeError(f"in_shape {list(shape)} does not hold {in_features} features")
        return shape  # type: ignore[return-value]
    side = math.isqrt(in_features)
    if side * side != in_features:
        raise FlatscopeError(f"cannot infer a square image from {in_features} features; pass in_shape=[C,H,W]")
    return (1, side, side)


class MLP(nn.Module):
    """Fully connected network: ``in_features -> widths... -> out_features``."""

    def __init__(
        self,
        in_features: int = 64,
        out_features: int = 10,
        widths=(64, 64),
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for w in widths:
            layers += [nn.Linear(prev, int(w)), _activation(activation)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            prev = int(w)
        layers.append(nn.Linear(prev, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


class CNN(nn.Module):
    """Small LeNet-style network for 1x8x8 (digits) or 1x28x28 inputs."""

    def __init__(
        self,
        in_features: int = 64,
        out_features: int = 10,
        channels=(8, 16),
        hidden: int = 32,
        in_shape=None,
        activation: str = "relu",
    ):
        super().__init__()
        self.in_shape = _image_shape(in_features, in_shape)
        c, h, w = self.in_shape
        c1, c2 = (int(x) for x in channels)
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1),
            _activation(activation),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            _activation(activation),
            nn.MaxPool2d(2),
        )
        flat = c2 * (h // 4) * (w // 4)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), _activation(activation), nn.Linear(hidden, out_features)
        )

    def forward(self, x):
        return self.head(self.features(x.reshape(-1, *self.in_shape)))


class CNN1D(nn.Module):
    """Small 1-D CNN for signals such as MNIST-1D's (1 channel of 40 samples; Greydanus 2020, "Scaling down
    deep learning", arXiv:2011.14439): two blocks of ``Conv1d(kernel, padding kernel // 2)``, activation and
    ``MaxPool1d(2)`` (length L -> L // 4), then ``Linear(hidden)``, activation, ``Linear(out_features)``. ``in_shape=[C, L]``
    (default ``[1, in_features]``)."""

    def __init__(
        self,
        in_features: int = 40,
        out_features: int = 10,
        channels=(8, 16),
        hidden: int = 32,
        kernel: int = 5,
        in_shape=None,
        activation: str = "relu",
    ):
        super().__init__()
        shape = (1, int(in_features)) if in_shape is None else tuple(int(s) for s in in_shape)
        if len(shape) != 2 or math.prod(shape) != in_features:
            raise FlatscopeError(f"in_shape {list(shape)} does not hold {in_features} features as [C, L]")
        self.in_shape = shape
        c, length = shape
        if length < 4:
            raise FlatscopeError(f"cnn1d needs signals of at least 4 samples (two poolings by 2), got {length}")
        c1, c2 = (int(x) for x in channels)
        k = int(kernel)
        if k < 1 or k % 2 == 0:
            raise FlatscopeError(f"cnn1d needs an odd kernel (so that padding kernel // 2 keeps the length), got {k}")
        self.features = nn.Sequential(
            nn.Conv1d(c, c1, k, padding=k // 2),
            _activation(activation),
            nn.MaxPool1d(2),
            nn.Conv1d(c1, c2, k, padding=k // 2),
            _activation(activation),
            nn.MaxPool1d(2),
        )
        flat = c2 * (length // 4)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), _activation(activation), nn.Linear(hidden, out_features)
        )

    def forward(self, x):
        return self.head(self.features(x.reshape(-1, *self.in_shape)))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet with BatchNorm (two stages of basic blocks), so BN handling is exercised."""

    def __init__(self, in_features: int = 64, out_features: int = 10, width: int = 8, blocks: int = 1, in_shape=None):
        super().__init__()
        self.in_shape = _image_shape(in_features, in_shape)
        c = self.in_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages = []
        cin = width
        for i, cout in enumerate((width, 2 * width)):
            for b in range(int(blocks)):
                stages.append(_Block(cin, cout, stride=2 if (i > 0 and b == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, out_features)

    def forward(self, x):
        x = self.stages(self.stem(x.reshape(-1, *self.in_shape)))
        return self.head(x.mean(dim=(2, 3)))


class FlatLinear(nn.Linear):
    """``nn.Linear`` on flattened inputs (so that image-shaped data works; same state_dict keys)."""

    def forward(self, x):
        return super().forward(x.flatten(1) if x.dim() > 2 else x)


def _linear(in_features: int = 64, out_features: int = 1, bias: bool = True) -> nn.Module:
    return FlatLinear(in_features, out_features, bias=bias)


def _torchvision_model(name: str, **kwargs) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, **kwargs)``: the architecture only (weights come
    from the checkpoint; nothing is downloaded)."""
    try:
        import torchvision
    except Exception:
        raise FlatscopeError("torchvision:NAME models need torchvision: pip install 'flatscope[vision]'") from None
    if kwargs.get("weights") not in (None, "None"):
        raise FlatscopeError(
            "torchvision models are built without pretrained weights (nothing is downloaded); "
            "the weights come from the checkpoint"
        )
    kwargs.pop("weights", None)
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except (ValueError, KeyError):
        raise FlatscopeError(f"torchvision has no model {name!r}") from None


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "cnn1d": CNN1D,
    "resnet": ResNet,
    "linear": _linear,
}


LIBRARY_PREFIXES = ("torchvision:", "hf:")


def is_factory_path(name: str) -> bool:
    """A ``pkg.module:factory`` path (user code, imported only when typed), not a built-in or a
    library model (``torchvision:NAME``, ``hf:DIR``)."""
    return (
        isinstance(name, str) and ":" in name and name not in BUILTIN_MODELS and not name.startswith(LIBRARY_PREFIXES)
    )


def _import_factory(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise FlatscopeError(f"factory path {path!r} must look like 'pkg.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError or anything the module raises on import
        raise FlatscopeError(f"cannot import {module_name!r} for factory {path!r}: {exc}") from exc
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise FlatscopeError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise FlatscopeError(f"{path!r} is not callable")
    return fn


def _check_kwargs(name: str, kwargs) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise FlatscopeError(
            f"model {name!r}: kwargs must be a mapping of names to values, not {type(kwargs).__name__}"
        )
    return dict(kwargs)


def _construct(factory: Callable[..., Any], name: str, kwargs: dict, builtin: bool) -> nn.Module:
    try:
        model = factory(**kwargs)
    except FlatscopeError:
        raise
    except (TypeError, ValueError, OverflowError, KeyError, IndexError, ZeroDivisionError, RuntimeError) as exc:
        if not builtin and not isinstance(exc, TypeError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FlatscopeError(f"model {name!r} rejected its arguments {kwargs}: {first}") from exc
    if not isinstance(model, nn.Module):
        raise FlatscopeError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(
    spec: dict, *, allow_import: bool = False, fits: dict | None = None, max_params: int | None = None
) -> nn.Module:
    """Build a model from ``{"name": ..., "kwargs": {...}}``.

    ``allow_import`` must be true for a ``pkg.module:factory`` name; the CLI sets it only when the
    factory was given on the command line. The model is first built on the meta device (no memory):
    it must have at most ``max_params`` values (default :func:`flatscope.safe_files.max_params`) and,
    with ``fits`` (a state_dict), take exactly its keys and shapes; only then is it built for real.
    A factory that cannot be built on the meta device is built directly.
    """
    from .safe_files import max_params as default_max

    if not isinstance(spec, dict):
        raise FlatscopeError(f"the model spec is a {type(spec).__name__}, not {{\"name\": ..., \"kwargs\": {{...}}}}")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise FlatscopeError("the model spec has no name")
    kwargs = _check_kwargs(name, spec.get("kwargs"))
    if name.startswith("hf:"):
        if kwargs:
            raise FlatscopeError("hf:DIR models take their configuration from DIR/config.json, not --model-kwargs")
        from .hf import build_hf_model

        return build_hf_model(name[3:], load_weights=False)
    builtin = name in BUILTIN_MODELS
    if builtin:
        factory = BUILTIN_MODELS[name]
    elif name.startswith("torchvision:"):
        factory = functools.partial(_torchvision_model, name.partition(":")[2])
    elif is_factory_path(name):
        if not allow_import:
            raise FlatscopeError(
                f"the checkpoint names the model factory {name!r}; flatscope imports code only when you "
                f"pass it yourself: add --model {name}"
            )
        factory = _import_factory(name)
    else:
        raise FlatscopeError(
            f"unknown model {name!r}; built-ins are {', '.join(BUILTIN_MODELS)}, or give pkg.module:factory"
        )
    limit = default_max() if max_params is None else max_params
    try:
        with torch.device("meta"):
            shadow = _construct(factory, name, kwargs, builtin)
    except FlatscopeError:
        raise
    except Exception:  # a user factory that needs real memory to build
        if builtin:
            raise
        shadow = None
    if shadow is not None:
        n = sum(t.numel() for t in shadow.state_dict().values())
        if n > limit:
            raise FlatscopeError(
                f"model {name!r} with {kwargs} would hold {n:,} values, above the limit of "
                f"{limit:,} (FLATSCOPE_MAX_PARAMS); nothing was allocated"
            )
        if fits is not None:
            check_state_dict_fits(shadow.state_dict(), fits)
    return _construct(factory, name, kwargs, builtin)


def check_state_dict_fits(own: dict, state_dict: dict) -> None:
    """Fail with a message that names the first missing, unexpected or mis-shaped keys."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shaped = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else ""))
    if unexpected:
        problems.append("unexpected " + ", ".join(map(str, unexpected[:3])) + (" ..." if len(unexpected) > 3 else ""))
    if shaped:
        k = shaped[0]
        problems.append(
            f"mis-shaped {k} (checkpoint {list(state_dict[k].shape)}, model {list(own[k].shape)})"
            + (f" and {len(shaped) - 1} more" if len(shaped) > 1 else "")
        )
    if problems:
        raise FlatscopeError("the state_dict does not fit the model: " + "; ".join(problems))


def load_state_dict_strict(model: nn.Module, state_dict: dict) -> None:
    """Load ``state_dict`` into ``model``, failing with a message that names the first bad keys."""
    check_state_dict_fits(model.state_dict(), state_dict)
    model.load_state_dict(state_dict, strict=True)
