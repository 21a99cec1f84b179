"""Datasets and the data spec that travels in a checkpoint.

A data spec is ``{"name": SPEC, "kwargs": {...}}`` where ``SPEC`` is

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (real, offline), a fixed seeded
  stratified 75/25 train/test split, features standardized with train statistics;
- ``teacher``: synthetic teacher-student data (a random committee machine labels Gaussian inputs,
  as in the entropic-algorithms notes, ``shared/papers/entropic-algorithms-pittorino.md``);
- ``npz:PATH`` / ``h5:PATH``: arrays ``X``, ``y`` and optional ``X_test``, ``y_test``;
- ``pkg.module:factory``: a callable returning a :class:`Dataset` or such a dict of arrays
  (imported only when given on the command line).

Inputs are stored flat, ``(N, features)``. Integer targets are class labels (``ce``, or ``mse``
against one-hot targets); float targets are regression targets (``mse`` only, no accuracy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import FlatscopeError
from .models import _import_factory, is_factory_path

SPLITS = ("train", "test")


@dataclass
class Dataset:
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor | None
    y_test: torch.Tensor | None
    name: str = ""

    @property
    def classification(self) -> bool:
        return not torch.is_floating_point(self.y_train)

    @property
    def in_features(self) -> int:
        return int(self.X_train[0].numel())

    @property
    def n_outputs(self) -> int:
        if self.classification:
            ys = [self.y_train] + ([self.y_test] if self.y_test is not None else [])
            return int(max(int(y.max()) for y in ys)) + 1
        return 1 if self.y_train.dim() == 1 else int(self.y_train.shape[1])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "train":
            return self.X_train, self.y_train
        if name == "test":
            if self.X_test is None:
                raise FlatscopeError(f"the data {self.name!r} has no test split")
            return self.X_test, self.y_test
        raise FlatscopeError(f"unknown split {name!r}; choose train or test")

    def n_samples(self, split: str) -> int:
        return int(self.split(split)[0].shape[0])


def _as_tensors(X, y, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim < 2:
        raise FlatscopeError(f"{what}: X must have shape (N, features), got {X.shape}")
    if y.shape[0] != X.shape[0]:
        raise FlatscopeError(f"{what}: X has {X.shape[0]} rows but y has {y.shape[0]}")
    if not np.issubdtype(X.dtype, np.number):
        raise FlatscopeError(f"{what}: X is not numeric")
    Xt = torch.as_tensor(X.reshape(X.shape[0], -1), dtype=torch.float32)
    if np.issubdtype(y.dtype, np.integer) or y.dtype == bool:
        yt = torch.as_tensor(y.astype(np.int64))
        if yt.dim() != 1:
            raise FlatscopeError(f"{what}: integer labels y must be one-dimensional")
        if (yt < 0).any():
            raise FlatscopeError(f"{what}: class labels must be non-negative")
    elif np.issubdtype(y.dtype, np.floating):
        yt = torch.as_tensor(y, dtype=torch.float32)
    else:
        raise FlatscopeError(f"{what}: y has unsupported dtype {y.dtype}")
    if not torch.isfinite(Xt).all():
        raise FlatscopeError(f"{what}: X holds NaN or Inf")
    return Xt, yt


def _digits(test_size: float = 0.25, seed: int = 0, standardize: bool = True) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    X = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int64)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    if standardize:
        mean = Xtr.mean(axis=0)
        std = Xtr.std(axis=0)
        std[std == 0] = 1.0  # border pixels that are always 0
        Xtr = (Xtr - mean) / std
        Xte = (Xte - mean) / std
    a, b = _as_tensors(Xtr, ytr, "digits"), _as_tensors(Xte, yte, "digits")
    return Dataset(a[0], a[1], b[0], b[1], name="digits")


def _teacher(n_train: int = 1000, n_test: int = 1000, d: int = 100, hidden: int = 3, seed: int = 0) -> Dataset:
    """Teacher-student data: a committee machine sign(sum_k sign(w_k.x / sqrt d)) labels x ~ N(0, I)."""
    if hidden % 2 == 0:
        raise FlatscopeError("teacher: hidden must be odd so that the committee vote has no ties")
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((hidden, d))
    X = rng.standard_normal((n_train + n_test, d)).astype(np.float32)
    votes = np.sign(X @ W.T / np.sqrt(d)).sum(axis=1)
    y = (votes > 0).astype(np.int64)
    a = _as_tensors(X[:n_train], y[:n_train], "teacher")
    b = _as_tensors(X[n_train:], y[n_train:], "teacher")
    return Dataset(a[0], a[1], b[0], b[1], name="teacher")


def _from_arrays(arrays, what: str) -> Dataset:
    if "X" not in arrays or "y" not in arrays:
        raise FlatscopeError(f"{what}: needs arrays 'X' and 'y' (optional 'X_test', 'y_test')")
    Xtr, ytr = _as_tensors(arrays["X"], arrays["y"], what)
    Xte = yte = None
    if ("X_test" in arrays) != ("y_test" in arrays):
        raise FlatscopeError(f"{what}: give both 'X_test' and 'y_test' or neither")
    if "X_test" in arrays:
        Xte, yte = _as_tensors(arrays["X_test"], arrays["y_test"], what)
        if Xte.shape[1:] != Xtr.shape[1:]:
            raise FlatscopeError(f"{what}: X_test has {Xte.shape[1]} features, X has {Xtr.shape[1]}")
        if yte.dtype != ytr.dtype:
            raise FlatscopeError(f"{what}: y and y_test must both be integer labels or both floats")
    return Dataset(Xtr, ytr, Xte, yte, name=what)


def _npz(path: str) -> Dataset:
    if not os.path.isfile(path):
        raise FlatscopeError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:
        raise FlatscopeError(f"cannot read {path} as .npz: {exc}") from exc
    return _from_arrays(arrays, f"npz:{path}")


def _h5(path: str) -> Dataset:
    import h5py

    if not os.path.isfile(path):
        raise FlatscopeError(f"data file not found: {path}")
    if not h5py.is_hdf5(path):
        raise FlatscopeError(f"{path} is not an HDF5 file")
    with h5py.File(path, "r") as f:
        arrays = {k: f[k][()] for k in ("X", "y", "X_test", "y_test") if k in f}
    return _from_arrays(arrays, f"h5:{path}")


BUILTIN_DATA = ("digits", "teacher", "npz:PATH", "h5:PATH")


def load_data(spec: dict, *, allow_import: bool = False) -> Dataset:
    """Load the dataset named by ``{"name": SPEC, "kwargs": {...}}``."""
    name = spec.get("name")
    kwargs = dict(spec.get("kwargs") or {})
    if not isinstance(name, str) or not name:
        raise FlatscopeError("the data spec has no name")
    try:
        if name == "digits":
            return _digits(**kwargs)
        if name == "teacher":
            return _teacher(**kwargs)
    except TypeError as exc:
        raise FlatscopeError(f"data {name!r} rejected its arguments {kwargs}: {exc}") from exc
    if name.startswith("npz:"):
        return _npz(name[4:])
    if name.startswith("h5:"):
        return _h5(name[3:])
    if is_factory_path(name):
        if not allow_import:
            raise FlatscopeError(f"the checkpoint names the data factory {name!r}; flatscope imports code "
                                 f"only when you pass it yourself: add --data {name}")
        out = _import_factory(name)(**kwargs)
        if isinstance(out, Dataset):
            return out
        if isinstance(out, dict):
            return _from_arrays(out, name)
        raise FlatscopeError(f"data factory {name!r} returned {type(out).__name__}, not a Dataset or dict")
    raise FlatscopeError(f"unknown data {name!r}; built-ins are {', '.join(BUILTIN_DATA)}, or pkg.module:factory")


def subsample(X: torch.Tensor, y: torch.Tensor, max_samples: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of ``max_samples`` rows (all rows when ``None`` or larger than N)."""
    if max_samples is None:
        return X, y
    if max_samples < 1:
        raise FlatscopeError(f"--max-samples must be at least 1, got {max_samples}")
    n = X.shape[0]
    if max_samples >= n:
        return X, y
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=g)[:max_samples].sort().values
    return X[idx], y[idx]
