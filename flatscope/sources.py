"""Where the samples of one data split come from, batch by batch.

A :class:`Source` is one split: ``n`` samples, iterated in a fixed order as ``(inputs, targets)``
batches on the CPU, and indexable by sample (``take``) for minibatch methods. Inputs keep their
shape and dtype: an image batch stays ``N x C x H x W``, token ids stay integer, and ``inputs``
may be a tensor, a tuple of tensors (positional arguments of the model) or a dict of tensors
(keyword arguments, e.g. ``input_ids`` and ``attention_mask``). Targets are a tensor of any
shape whose first dimension is the sample.

- :class:`TensorSource`: tensors in memory (the data is small, or already loaded);
- :class:`MapSource`: a map-style ``torch.utils.data.Dataset`` streamed through a ``DataLoader``
  in index order, never concatenated in memory;
- :class:`H5Source`: arrays in an HDF5 file, read lazily by contiguous chunks, so a file larger
  than memory works;
- :class:`IterSource`: an iterable of batches (an ``IterableDataset`` loader); no random access.

:class:`flatscope.objective.Objective` moves each batch to its device and casts floating inputs to
its dtype (integer inputs such as token ids are kept).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from .errors import FlatscopeError

TARGET_KEYS = ("labels", "label", "targets", "target", "y")


# ---------------------------------------------------------------------------------------------- trees
def tree_map(fn: Callable[[torch.Tensor], Any], tree):
    """Apply ``fn`` to every tensor of a tensor, tuple/list or dict of tensors."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def tree_leaves(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tree_leaves(v)]
    if isinstance(tree, (tuple, list)):
        return [t for v in tree for t in tree_leaves(v)]
    return []


def tree_len(tree) -> int:
    leaves = tree_leaves(tree)
    if not leaves:
        raise FlatscopeError("a batch holds no tensors")
    return int(leaves[0].shape[0])


def to_device(tree, device, dtype: torch.dtype | None):
    """Move a tree to ``device``; floating tensors take ``dtype``, integer and bool ones keep theirs."""

    def move(t):
        if dtype is not None and torch.is_floating_point(t):
            return t.to(device=device, dtype=dtype)
        return t.to(device)

    return tree_map(move, tree)


def tree_cat(trees: list):
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(trees)
    if isinstance(first, dict):
        return {k: tree_cat([t[k] for t in trees]) for k in first}
    return type(first)(tree_cat([t[i] for t in trees]) for i in range(len(first)))


def describe(tree) -> str:
    """Shapes and dtypes of a batch, for error messages."""
    if isinstance(tree, torch.Tensor):
        return f"{list(tree.shape)} {str(tree.dtype).replace('torch.', '')}"
    if isinstance(tree, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in tree.items()) + "}"
    if isinstance(tree, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in tree) + ")"
    return type(tree).__name__


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as exc:
            raise FlatscopeError(f"{what}: cannot make a tensor from {type(x).__name__}: {exc}") from None
    if t.is_complex():
        raise FlatscopeError(f"{what}: complex values are not supported")
    if not (
        torch.is_floating_point(t)
        or t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
    ):
        raise FlatscopeError(f"{what}: unsupported dtype {t.dtype}")
    if t.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        t = t.long()
    return t


def split_item(item, *, target_key: str | None = None, input_key: str | None = None):
    """``(inputs, target)`` of one dataset item: an ``(input, target)`` pair or a dict.

    A dict's target is ``target_key`` (default: the first of labels/label/targets/target/y); the
    other entries are the model's keyword inputs, or only ``input_key`` when given. A dict with no
    target (a causal-LM corpus of ``input_ids``) gives ``target = None``: ``--loss lm`` then takes
    the inputs themselves as targets.
    """
    if isinstance(item, dict):
        item = dict(item)
        key = target_key or next((k for k in TARGET_KEYS if k in item), None)
        if target_key is not None and target_key not in item:
            raise FlatscopeError(f"dataset items have no key {target_key!r} (keys: {', '.join(map(str, item))})")
        target = item.pop(key) if key is not None else None
        if input_key is not None:
            if input_key not in item:
                raise FlatscopeError(f"dataset items have no key {input_key!r} (keys: {', '.join(map(str, item))})")
            inputs = item[input_key]
        else:
            inputs = item
        return inputs, target
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise FlatscopeError(
        f"a dataset item must be an (input, target) pair or a dict, not {type(item).__name__}"
        + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
    )


def _default_target(inputs, target):
    if target is not None:
        return target
    if isinstance(inputs, dict) and "input_ids" in inputs:
        return inputs["input_ids"]
    if isinstance(inputs, torch.Tensor) and not torch.is_floating_point(inputs):
        return inputs
    raise FlatscopeError("dataset items have no target (no labels/label/target key)")


# ---------------------------------------------------------------------------------------------- sources
class Source:
    """One data split. Subclasses implement ``__len__``, ``batches``, and (if random access) ``take``."""

    in_memory = False
    random_access = True

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def n(self) -> int:
        return len(self)

    def batches(self, batch_size: int) -> Iterator[tuple[Any, torch.Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def take(self, idx: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """The samples ``idx`` (a 1-D LongTensor) as one batch."""
        raise FlatscopeError(f"{type(self).__name__} has no random access; this analysis needs a map-style dataset")

    def subset(self, idx) -> "Source":
        raise FlatscopeError(f"{type(self).__name__} cannot be subsampled; use a map-style dataset")

    def shard(self, start: int, stop: int) -> "Source":
        return self.subset(torch.arange(start, stop))

    def first(self, k: int = 1):
        """The first ``k`` samples (to probe the model's outputs)."""
        return self.take(torch.arange(min(k, len(self))))


class TensorSource(Source):
    in_memory = True

    def __init__(self, inputs, targets: torch.Tensor, name: str = "data"):
        self.inputs = (
            tree_map(lambda t: _as_tensor(t, name), inputs)
            if not isinstance(inputs, torch.Tensor)
            else _as_tensor(inputs, name)
        )
        self.targets = _as_tensor(targets, name)
        n = tree_len(self.inputs)
        if n == 0:
            raise FlatscopeError(f"{name}: the split is empty")
        for leaf in tree_leaves(self.inputs):
            if leaf.shape[0] != n:
                raise FlatscopeError(f"{name}: inputs hold {n} and {leaf.shape[0]} samples")
        if self.targets.dim() == 0 or self.targets.shape[0] != n:
            raise FlatscopeError(f"{name}: {n} inputs but targets of shape {list(self.targets.shape)}")
        for leaf in tree_leaves(self.inputs):
            if torch.is_floating_point(leaf) and not torch.isfinite(leaf).all():
                raise FlatscopeError(f"{name}: inputs hold NaN or Inf")
        self._n = n
        self.name = name

    def __len__(self):
        return self._n

    def batches(self, batch_size):
        for s in range(0, self._n, batch_size):
            yield tree_map(lambda t: t[s : s + batch_size], self.inputs), self.targets[s : s + batch_size]

    def take(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return tree_map(lambda t: t[idx.to(t.device)], self.inputs), self.targets[idx.to(self.targets.device)]

    def subset(self, idx):
        x, y = self.take(idx)
        return TensorSource(x, y, self.name)

    def to(self, device, dtype) -> "TensorSource":
        """The same samples on ``device`` (floating inputs in ``dtype``); batches then stay there."""
        out = object.__new__(TensorSource)
        out.inputs = to_device(self.inputs, device, dtype)
        tgt_dtype = dtype if torch.is_floating_point(self.targets) else None
        out.targets = to_device(self.targets, device, tgt_dtype)
        out._n, out.name = self._n, self.name
        return out


class MapSource(Source):
    """A map-style dataset, streamed in index order by a ``DataLoader``."""

    def __init__(
        self,
        dataset,
        indices=None,
        *,
        workers: int = 0,
        collate_fn=None,
        target_key=None,
        input_key=None,
        name: str = "dataset",
    ):
        self.dataset = dataset
        try:
            total = len(dataset)
        except TypeError:
            raise FlatscopeError(f"{name}: a map-style dataset must have a length") from None
        self.indices = torch.arange(total) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        if len(self.indices) == 0:
            raise FlatscopeError(f"{name}: the split is empty")
        self.workers, self.collate_fn = int(workers), collate_fn
        self.target_key, self.input_key, self.name = target_key, input_key, name

    def __len__(self):
        return len(self.indices)

    def _collate(self, items):
        if self.collate_fn is not None:
            batch = self.collate_fn(items)
            if isinstance(batch, dict) or (isinstance(batch, (tuple, list)) and len(batch) == 2):
                x, y = split_item(batch, target_key=self.target_key, input_key=self.input_key)
            else:
                raise FlatscopeError(
                    f"{self.name}: the collate function returned {type(batch).__name__}, "
                    "not an (inputs, targets) pair or a dict"
                )
            return x, _default_target(x, y)
        from torch.utils.data import default_collate

        pairs = [split_item(it, target_key=self.target_key, input_key=self.input_key) for it in items]
        try:
            x = default_collate([p[0] for p in pairs])
            y = None if pairs[0][1] is None else default_collate([p[1] for p in pairs])
        except Exception as exc:
            raise FlatscopeError(f"{self.name}: cannot stack dataset items into a batch: {exc}") from None
        x = tree_map(lambda t: _as_tensor(t, self.name), x)
        y = _as_tensor(_default_target(x, y), self.name)
        return x, y

    def _loader(self, idx, batch_size):
        from torch.utils.data import DataLoader, Subset

        return DataLoader(
            Subset(self.dataset, idx.tolist()),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=self._collate,
        )

    def batches(self, batch_size):
        try:
            yield from self._loader(self.indices, batch_size)
        except FlatscopeError:
            raise
        except (IndexError, KeyError, TypeError, ValueError) as exc:
            raise FlatscopeError(f"{self.name}: reading an item failed: {type(exc).__name__}: {exc}") from None

    def take(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        return self._collate([self.dataset[int(i)] for i in self.indices[idx]])

    def subset(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return MapSource(
            self.dataset,
            self.indices[idx],
            workers=self.workers,
            collate_fn=self.collate_fn,
            target_key=self.target_key,
            input_key=self.input_key,
            name=self.name,
        )


class H5Source(Source):
    """Datasets ``X`` and ``y`` (or ``X_test``/``y_test``) of an HDF5 file, read by contiguous chunks."""

    def __init__(self, path: str, x_key: str, y_key: str, indices=None, name: str | None = None):
        import h5py

        self.path, self.x_key, self.y_key = path, x_key, y_key
        self.name = name or f"h5:{path}"
        with h5py.File(path, "r") as f:
            for k in (x_key, y_key):
                if not isinstance(f.get(k, getlink=False), h5py.Dataset):
                    raise FlatscopeError(f"{self.name}: {k!r} is not a dataset")
            n, ny = f[x_key].shape[0] if f[x_key].ndim else 0, f[y_key].shape[0] if f[y_key].ndim else 0
            if n == 0:
                raise FlatscopeError(f"{self.name}: {x_key!r} is empty")
            if ny != n:
                raise FlatscopeError(f"{self.name}: {x_key!r} has {n} rows but {y_key!r} has {ny}")
            for k in (x_key, y_key):
                kind = f[k].dtype.kind
                if kind not in "fiub":
                    raise FlatscopeError(f"{self.name}: {k!r} has unsupported dtype {f[k].dtype}")
        self.indices = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self._file = None

    def _f(self):
        import h5py

        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file

    def __getstate__(self):  # DataLoader workers / deepcopy: reopen the file there
        d = dict(self.__dict__)
        d["_file"] = None
        return d

    def __len__(self):
        return len(self.indices)

    def _read(self, idx: np.ndarray):
        f = self._f()
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) and np.all(np.diff(idx) == 1):
            sl = slice(int(idx[0]), int(idx[-1]) + 1)
            x, y = f[self.x_key][sl], f[self.y_key][sl]
        else:
            order = np.argsort(idx, kind="stable")
            uniq, inv = np.unique(idx[order], return_inverse=True)
            xs, ys = f[self.x_key][uniq], f[self.y_key][uniq]
            back = np.empty_like(order)
            back[order] = np.arange(len(order))
            x, y = xs[inv][back], ys[inv][back]
        x, y = _as_tensor(x, self.name), _as_tensor(y, self.name)
        if torch.is_floating_point(x) and not torch.isfinite(x).all():
            raise FlatscopeError(f"{self.name}: {self.x_key!r} holds NaN or Inf")
        return x, y

    def batches(self, batch_size):
        idx = self.indices.numpy()
        for s in range(0, len(idx), batch_size):
            yield self._read(idx[s : s + batch_size])

    def take(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        return self._read(self.indices[idx].numpy())

    def subset(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return H5Source(self.path, self.x_key, self.y_key, self.indices[idx], self.name)


class IterSource(Source):
    """Batches from a re-iterable (a ``DataLoader`` over an ``IterableDataset``); one counting pass."""

    random_access = False

    def __init__(self, loader, name: str = "loader", target_key=None, input_key=None):
        self.loader, self.name = loader, name
        self.target_key, self.input_key = target_key, input_key
        self._n = None

    def _pairs(self):
        for batch in self.loader:
            x, y = split_item(batch, target_key=self.target_key, input_key=self.input_key)
            yield x, _as_tensor(_default_target(x, y), self.name)

    def __len__(self):
        if self._n is None:
            self._n = sum(int(y.shape[0]) for _, y in self._pairs())
            if self._n == 0:
                raise FlatscopeError(f"{self.name}: the loader yields no samples")
        return self._n

    def batches(self, batch_size):  # the loader's own batching
        yield from self._pairs()

    def first(self, k: int = 1):
        x, y = next(iter(self._pairs()))
        return tree_map(lambda t: t[:k], x), y[:k]


def as_source(data, targets=None, *, name: str = "data", workers: int = 0) -> Source:
    """A :class:`Source` from tensors ``(X, y)``, a ``Dataset``, a ``DataLoader`` or a Source."""
    if isinstance(data, Source):
        return data
    from torch.utils.data import DataLoader, IterableDataset

    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            return IterSource(data, name=name)
        from torch.utils.data import SequentialSampler

        if not isinstance(data.sampler, SequentialSampler):
            raise FlatscopeError("the DataLoader shuffles; flatscope needs a deterministic order (shuffle=False)")
        collate = None if data.collate_fn.__module__.startswith("torch.utils.data") else data.collate_fn
        return MapSource(data.dataset, workers=data.num_workers, collate_fn=collate, name=name)
    if isinstance(data, IterableDataset):
        raise FlatscopeError("an IterableDataset has no length or order; wrap it in a DataLoader with batch_size")
    if (
        targets is None
        and hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not isinstance(data, (torch.Tensor, np.ndarray, dict, tuple, list))
    ):
        return MapSource(data, workers=workers, name=name)
    if targets is None:
        raise FlatscopeError(f"{name}: give targets with the inputs, or a Dataset of (input, target) items")
    return TensorSource(data, targets, name=name)
