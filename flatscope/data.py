"""Datasets and the data spec that travels in a checkpoint.

A data spec is ``{"name": SPEC, "kwargs": {...}}`` where ``SPEC`` is

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (real, offline), a fixed seeded
  stratified 75/25 train/test split, features standardized with train statistics, stored flat
  ``(N, 64)`` (the built-in models reshape themselves);
- ``mnist1d``: MNIST-1D (Greydanus 2020, "Scaling down deep learning", arXiv:2011.14439),
  generated locally by the ``mnist1d`` package (extra ``mnist1d``): 4,000/1,000 signals of 40 samples;
- ``teacher``: synthetic teacher-student data (a random committee machine labels Gaussian inputs,
  as in Pittorino et al. 2021, "Entropic gradient descent algorithms and wide flat minima",
  arXiv:2006.07897);
- ``npz:PATH``: arrays ``X``, ``y`` and optional ``X_test``, ``y_test``, shapes kept;
- ``h5:PATH``: the same datasets in an HDF5 file, read lazily by chunks (larger than memory is fine);
- ``torchvision:NAME``: a torchvision dataset already on disk (``--data-kwargs '{"root": DIR}'``;
  never downloaded), images as float tensors ``C x H x W`` (extra ``vision``);
- ``hf-disk:PATH``: a Hugging Face ``datasets`` folder written by ``save_to_disk`` (extra ``hf``);
  its ``train``/``test`` splits, columns as model keyword inputs, ``labels``/``label`` as target;
- ``pkg.module:factory``: a callable returning a :class:`Dataset`, a ``torch.utils.data.Dataset``
  (map-style, ``(input, target)`` items or dicts; streamed, never concatenated), a dict
  ``{"train": ..., "test": ...}`` of those, an ``(X, y)`` tuple, or a dict of arrays
  (imported only when given on the command line).

Inputs keep their shape and dtype: images stay ``N x C x H x W``, integer inputs (token ids) stay
integer. Integer targets are class labels (any shape: per-token labels), float targets are
regression targets.
"""

from __future__ import annotations

import functools

import os

import numpy as np
import torch

from .errors import FlatscopeError
from .models import _import_factory, is_factory_path
from .safe_files import check_allocation, check_count, check_h5_dataset, check_npz, check_regular_file
from .sources import H5Source, MapSource, Source, TensorSource, tree_leaves

SPLITS = ("train", "test")


class Dataset:
    """A train split and an optional test split, each a :class:`~flatscope.sources.Source`.

    ``Dataset(X_train, y_train, X_test, y_test)`` holds tensors in memory;
    ``Dataset(train=source, test=source)`` holds any sources (streamed datasets, HDF5 files).
    """

    def __init__(
        self,
        X_train=None,
        y_train=None,
        X_test=None,
        y_test=None,
        name: str = "",
        *,
        train: Source | None = None,
        test: Source | None = None,
    ):
        self.name = name
        if train is None:
            if X_train is None or y_train is None:
                raise FlatscopeError(f"{name or 'data'}: no training split")
            train = TensorSource(X_train, y_train, name or "train")
        if test is None and X_test is not None:
            test = TensorSource(X_test, y_test, name or "test")
        self.train, self.test = train, test

    # in-memory views (what the built-in data and small factories give)
    def _mem(self, src, what):
        if src is None:
            return None
        if not isinstance(src, TensorSource):
            raise FlatscopeError(f"the data {self.name!r} is streamed; {what} needs it in memory")
        return src

    @property
    def X_train(self):
        return self._mem(self.train, "this").inputs

    @property
    def y_train(self):
        return self._mem(self.train, "this").targets

    @property
    def X_test(self):
        s = self._mem(self.test, "this")
        return None if s is None else s.inputs

    @property
    def y_test(self):
        s = self._mem(self.test, "this")
        return None if s is None else s.targets

    def source(self, name: str) -> Source:
        if name == "train":
            return self.train
        if name == "test":
            if self.test is None:
                raise FlatscopeError(f"the data {self.name!r} has no test split")
            return self.test
        raise FlatscopeError(f"unknown split {name!r}; choose train or test")

    def split(self, name: str):
        """``(X, y)`` of a split held in memory (streamed splits: use :meth:`source`)."""
        src = self._mem(self.source(name), "split()")
        return src.inputs, src.targets

    def n_samples(self, split: str) -> int:
        return len(self.source(split))

    @property
    def classification(self) -> bool:
        _, y = self.train.first(1)
        return not torch.is_floating_point(y)

    @property
    def in_features(self) -> int:
        x, _ = self.train.first(1)
        leaves = tree_leaves(x)
        return int(leaves[0][0].numel())

    @property
    def n_outputs(self) -> int:
        if self.classification:
            ys = []
            for src in (self.train, self.test):
                if src is None:
                    continue
                if isinstance(src, TensorSource):
                    ys.append(int(src.targets.max()))
                else:
                    classes = getattr(getattr(src, "dataset", None), "classes", None)
                    if classes is not None:
                        ys.append(len(classes) - 1)
                    else:
                        ys.append(max(int(y.max()) for _, y in src.batches(1024)))
            return max(ys) + 1
        _, y = self.train.first(1)
        return 1 if y.dim() == 1 else int(y[0].numel())


def _as_tensors(X, y, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrays to tensors with their shapes kept: float inputs float32, integer inputs int64 (token
    ids), integer targets int64 labels (any shape), float targets float32."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim < 1 or X.shape[0] == 0:
        raise FlatscopeError(f"{what}: X is empty (shape {X.shape})")
    if X.ndim < 2:
        raise FlatscopeError(f"{what}: X must have shape (N, ...) with a sample axis and features, got {X.shape}")
    if y.ndim == 0:
        raise FlatscopeError(f"{what}: y is a scalar; it needs one target per sample")
    if y.shape[0] != X.shape[0]:
        raise FlatscopeError(f"{what}: X has {X.shape[0]} rows but y has {y.shape[0]}")
    if np.iscomplexobj(X) or np.iscomplexobj(y):
        raise FlatscopeError(f"{what}: complex values are not supported")
    if X.dtype == bool or np.issubdtype(X.dtype, np.integer):
        Xt = torch.as_tensor(X.astype(np.int64))
    elif np.issubdtype(X.dtype, np.floating):
        Xt = torch.as_tensor(X.astype(np.float32))
    else:
        raise FlatscopeError(f"{what}: X is not numeric (dtype {X.dtype})")
    if np.issubdtype(y.dtype, np.integer) or y.dtype == bool:
        yt = torch.as_tensor(y.astype(np.int64))
        if ((yt < 0) & (yt != -100)).any():
            raise FlatscopeError(f"{what}: class labels must be non-negative (or -100 to ignore)")
    elif np.issubdtype(y.dtype, np.floating):
        yt = torch.as_tensor(y.astype(np.float32))
        if not torch.isfinite(yt).all():
            raise FlatscopeError(f"{what}: y holds NaN or Inf")
    else:
        raise FlatscopeError(f"{what}: y has unsupported dtype {y.dtype}")
    if torch.is_floating_point(Xt) and not torch.isfinite(Xt).all():
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
    n_train = check_count("teacher: n_train", n_train, minimum=1)
    n_test = check_count("teacher: n_test", n_test, minimum=1)
    d = check_count("teacher: d", d, minimum=1)
    hidden = check_count("teacher: hidden", hidden, minimum=1)
    check_allocation("teacher data", (n_train + n_test) * d + hidden * d, 4)
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
    if not isinstance(arrays, dict) or "X" not in arrays or "y" not in arrays:
        raise FlatscopeError(f"{what}: needs arrays 'X' and 'y' (optional 'X_test', 'y_test')")
    Xtr, ytr = _as_tensors(arrays["X"], arrays["y"], what)
    Xte = yte = None
    if ("X_test" in arrays) != ("y_test" in arrays):
        raise FlatscopeError(f"{what}: give both 'X_test' and 'y_test' or neither")
    if "X_test" in arrays:
        Xte, yte = _as_tensors(arrays["X_test"], arrays["y_test"], what + " (test)")
        if Xte.shape[1:] != Xtr.shape[1:]:
            raise FlatscopeError(f"{what}: X_test has sample shape {list(Xte.shape[1:])}, X {list(Xtr.shape[1:])}")
        if yte.dtype != ytr.dtype:
            raise FlatscopeError(f"{what}: y and y_test must both be integer labels or both floats")
    return Dataset(Xtr, ytr, Xte, yte, name=what)


def _npz(path: str) -> Dataset:
    """Arrays of an .npz, after its zip directory and .npy headers were checked (sizes, dtypes)
    without decompressing anything (:func:`flatscope.safe_files.check_npz`)."""
    if not os.path.exists(path):
        raise FlatscopeError(f"data file not found: {path}")
    headers = check_npz(path)
    for key in ("X", "X_test"):
        if key in headers and len(headers[key][0]) == 0:
            raise FlatscopeError(f"npz:{path}: {key!r} is a scalar, not (N, ...) samples")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise FlatscopeError(f"{path} is a single .npy array, not an .npz archive of X and y")
            arrays = {k: f[k] for k in f.files if k in ("X", "y", "X_test", "y_test")}
    except FlatscopeError:
        raise
    except Exception as exc:
        raise FlatscopeError(f"cannot read {path} as .npz: {exc}") from exc
    return _from_arrays(arrays, f"npz:{path}")


def _h5(path: str) -> Dataset:
    import h5py

    if not os.path.isfile(path):
        raise FlatscopeError(f"data file not found: {path}")
    if not h5py.is_hdf5(path):
        raise FlatscopeError(f"{path} is not an HDF5 file")
    check_regular_file(path, "data file")
    with h5py.File(path, "r") as f:
        keys = set(f.keys())
        for k in sorted(keys & {"X", "y", "X_test", "y_test"}):
            check_h5_dataset(f, k)  # no links out of the file, no virtual/external storage, sizes bounded
    if "X" not in keys or "y" not in keys:
        raise FlatscopeError(f"h5:{path}: needs datasets 'X' and 'y' (optional 'X_test', 'y_test')")
    if ("X_test" in keys) != ("y_test" in keys):
        raise FlatscopeError(f"h5:{path}: give both 'X_test' and 'y_test' or neither")
    train = H5Source(path, "X", "y")
    test = H5Source(path, "X_test", "y_test") if "X_test" in keys else None
    return Dataset(train=train, test=test, name=f"h5:{path}")


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(seed: int, num_samples: int, train_split: float) -> dict:
    """The generated MNIST-1D arrays, once per process (generation takes seconds; ``correlate`` loads the
    data of every checkpoint). Read-only, so that no caller can change the cached copy."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise FlatscopeError("the mnist1d data needs the mnist1d package: pip install 'flatscope[mnist1d]'") from None
    args = get_dataset_args()
    args.seed, args.num_samples, args.train_split = seed, num_samples, train_split
    d = make_dataset(args)
    out = {
        "X": d["x"].astype(np.float32),
        "y": np.asarray(d["y"]),
        "X_test": d["x_test"].astype(np.float32),
        "y_test": np.asarray(d["y_test"]),
    }
    for a in out.values():
        a.setflags(write=False)
    return out


def _mnist1d(seed: int = 42, num_samples: int = 5000, train_split: float = 0.8) -> Dataset:
    """MNIST-1D generated locally by the ``mnist1d`` package (no download)."""
    arrays = _mnist1d_arrays(int(seed), int(num_samples), float(train_split))
    return _from_arrays({k: v.copy() for k, v in arrays.items()}, "mnist1d")


def _torchvision(name: str, root: str | None = None, **kwargs) -> Dataset:
    """A torchvision dataset already on disk, images as float tensors in [0, 1] (never downloaded)."""
    try:
        import torchvision
        from torchvision.transforms import functional as TF
    except Exception:
        raise FlatscopeError("torchvision:NAME needs torchvision: pip install 'flatscope[vision]'") from None
    if root is None:
        raise FlatscopeError(f"torchvision:{name} needs --data-kwargs '{{\"root\": DIR}}' with the dataset on disk")
    if kwargs.pop("download", False):
        raise FlatscopeError("flatscope never downloads data: drop download=true and put the dataset under root")
    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise FlatscopeError(f"torchvision has no dataset {name!r}")

    def make(train: bool):
        try:
            return cls(root=root, train=train, download=False, transform=TF.to_tensor, **kwargs)
        except TypeError:
            split = "train" if train else "test"
            return cls(root=root, split=split, download=False, transform=TF.to_tensor, **kwargs)

    try:
        train, test = make(True), make(False)
    except FlatscopeError:
        raise
    except Exception as exc:
        raise FlatscopeError(f"torchvision:{name} under {root}: {str(exc).splitlines()[0]}") from None
    return Dataset(
        train=MapSource(train, name=f"torchvision:{name}"),
        test=MapSource(test, name=f"torchvision:{name}"),
        name=f"torchvision:{name}",
    )


class _HFRows:
    """A Hugging Face dataset as a map-style dataset of dict items (torch tensors)."""

    def __init__(self, ds, columns):
        self.ds = ds.with_format("torch", columns=columns)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return dict(self.ds[int(i)])


def _hf_disk(
    path: str, columns: list[str] | None = None, target: str | None = None, train: str = "train", test: str = "test"
) -> Dataset:
    """A ``datasets`` folder written by ``save_to_disk``: splits ``train``/``test`` (a single dataset is
    the train split); ``columns`` are the model's keyword inputs (default: every numeric column but
    the target), ``target`` the label column (default labels/label; none for --loss lm)."""
    try:
        import datasets
    except ImportError:
        raise FlatscopeError("hf-disk:PATH needs the datasets package: pip install 'flatscope[hf]'") from None
    if not os.path.isdir(path):
        raise FlatscopeError(f"hf-disk:{path}: not a folder")
    try:
        obj = datasets.load_from_disk(path)
    except Exception as exc:
        raise FlatscopeError(
            f"hf-disk:{path}: not a dataset saved with save_to_disk ({str(exc).splitlines()[0]})"
        ) from None
    splits = dict(obj) if isinstance(obj, datasets.DatasetDict) else {train: obj}
    if train not in splits:
        raise FlatscopeError(f"hf-disk:{path} has no split {train!r} (it has {', '.join(splits)})")
    sample = splits[train]
    if target is None:
        target = next((k for k in ("labels", "label") if k in sample.column_names), None)
    if columns is None:
        columns = [
            c
            for c in sample.column_names
            if c != target
            and str(sample.features[c].dtype if hasattr(sample.features[c], "dtype") else "list")
            not in ("string", "large_string")
        ]
    missing = [c for c in columns + ([target] if target else []) if c not in sample.column_names]
    if missing:
        raise FlatscopeError(f"hf-disk:{path}: no column {missing[0]!r} (columns: {', '.join(sample.column_names)})")
    cols = columns + ([target] if target else [])

    def source(ds):
        return MapSource(_HFRows(ds, cols), target_key=target, name=f"hf-disk:{path}")

    return Dataset(
        train=source(splits[train]), test=source(splits[test]) if test in splits else None, name=f"hf-disk:{path}"
    )


def _from_factory(out, name: str) -> Dataset:
    from torch.utils.data import Dataset as TorchDataset

    def src(x, what):
        if isinstance(x, Source):
            return x
        if isinstance(x, TorchDataset) or (
            hasattr(x, "__getitem__")
            and hasattr(x, "__len__")
            and not isinstance(x, (dict, tuple, list, np.ndarray, torch.Tensor))
        ):
            return MapSource(x, name=f"{name} ({what})")
        if isinstance(x, (tuple, list)) and len(x) == 2:
            X, y = _as_tensors(*(t.numpy() if isinstance(t, torch.Tensor) else t for t in x), f"{name} ({what})")
            return TensorSource(X, y, name)
        raise FlatscopeError(
            f"data factory {name!r}: its {what} split is a {type(x).__name__}, not a Dataset or an (X, y) pair"
        )

    if isinstance(out, Dataset):
        return out
    if isinstance(out, dict) and "train" in out:
        extra = set(out) - {"train", "test"}
        if extra:
            raise FlatscopeError(f"data factory {name!r} returned unknown splits {sorted(extra)}; use train and test")
        test = out.get("test")
        return Dataset(train=src(out["train"], "train"), test=None if test is None else src(test, "test"), name=name)
    if isinstance(out, dict):
        return _from_arrays({k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}, name)
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], (np.ndarray, torch.Tensor)):
        return Dataset(train=src(out, "train"), name=name)
    if isinstance(out, (TorchDataset, Source)) or (
        hasattr(out, "__getitem__") and hasattr(out, "__len__") and not isinstance(out, (tuple, list, str))
    ):
        return Dataset(train=src(out, "train"), name=name)
    raise FlatscopeError(
        f"data factory {name!r} returned {type(out).__name__}; return a torch Dataset, "
        "{'train': ..., 'test': ...}, an (X, y) tuple, a dict of arrays or a flatscope Dataset"
    )


BUILTIN_DATA = ("digits", "mnist1d", "teacher", "npz:PATH", "h5:PATH", "torchvision:NAME", "hf-disk:PATH")


def load_data(spec: dict, *, allow_import: bool = False) -> Dataset:
    """Load the dataset named by ``{"name": SPEC, "kwargs": {...}}``."""
    if not isinstance(spec, dict):
        raise FlatscopeError(f"the data spec must be a dict with a name, not {type(spec).__name__}")
    name = spec.get("name")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise FlatscopeError(f"the data spec's kwargs must be a JSON object, not {type(kwargs).__name__}")
    kwargs = dict(kwargs)
    if not isinstance(name, str) or not name:
        raise FlatscopeError("the data spec has no name")
    try:
        if name == "digits":
            return _digits(**kwargs)
        if name == "teacher":
            return _teacher(**kwargs)
        if name == "mnist1d":
            return _mnist1d(**kwargs)
        if name.startswith("torchvision:"):
            return _torchvision(name.partition(":")[2], **kwargs)
        if name.startswith("hf-disk:"):
            return _hf_disk(name.partition(":")[2], **kwargs)
    except TypeError as exc:
        raise FlatscopeError(f"data {name!r} rejected its arguments {kwargs}: {exc}") from exc
    if name.startswith("npz:"):
        return _npz(name[4:])
    if name.startswith("h5:"):
        return _h5(name[3:])
    if is_factory_path(name):
        if not allow_import:
            raise FlatscopeError(
                f"the checkpoint names the data factory {name!r}; flatscope imports code "
                f"only when you pass it yourself: add --data {name}"
            )
        try:
            out = _import_factory(name)(**kwargs)
        except FlatscopeError:
            raise
        except TypeError as exc:
            raise FlatscopeError(f"data factory {name!r} rejected its arguments {kwargs}: {exc}") from None
        return _from_factory(out, name)
    raise FlatscopeError(f"unknown data {name!r}; built-ins are {', '.join(BUILTIN_DATA)}, or pkg.module:factory")


def subsample_source(src: Source, max_samples: int | None, seed: int) -> Source:
    """A seeded random subset of ``max_samples`` samples of a split, in index order."""
    if max_samples is None:
        return src
    if max_samples < 1:
        raise FlatscopeError(f"--max-samples must be at least 1, got {max_samples}")
    n = len(src)
    if max_samples >= n:
        return src
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=g)[:max_samples].sort().values
    return src.subset(idx)


def subsample(
    X: torch.Tensor, y: torch.Tensor, max_samples: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
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
