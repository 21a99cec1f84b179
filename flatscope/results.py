"""The HDF5 results store.

One file holds many analyses as groups (``/hessian``, ``/local_energy``, ``/local_entropy``,
``/landscape/<name>``, ...). Each analysis group carries the attrs

- ``kind``: which analysis wrote it (the plot registry dispatches on it);
- ``summary``: JSON of its headline numbers (``flatscope show`` prints them);
- ``options``: JSON of the options it ran with;
- provenance: ``flatscope_version``, ``torch_version``, ``command``, ``checkpoint``,
  ``checkpoint_sha256``, ``seed``, ``device``, ``dtype``, ``wall_time_s``, ``timestamp``,
  ``peak_memory_bytes`` (and ``peak_memory_of``: the CUDA allocator's peak, or the process' peak RSS).

Every write goes through :func:`update`: the existing file is copied to a temporary file in the
same folder, changed there, flushed, and renamed over the original. A crash, kill or Ctrl-C at any
moment leaves either the old file or the new one, never a damaged one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterator

import h5py
import numpy as np

from .errors import FlatscopeError


def check_output_path(path: str) -> None:
    """Fail early (before any computation) if ``path`` cannot take results."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise FlatscopeError(f"output path {path} is a directory")
    if not os.path.isdir(directory):
        raise FlatscopeError(f"cannot write {path}: folder {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise FlatscopeError(f"cannot write {path}: folder {directory} is not writable")
    if os.path.exists(path) and not os.path.isfile(path):
        raise FlatscopeError(f"{path} exists and is not a regular file; refusing to touch it")
    if os.path.exists(path) and not h5py.is_hdf5(path):
        raise FlatscopeError(f"{path} exists and is not an HDF5 file; refusing to touch it")
    if os.path.exists(path) and (not os.access(path, os.W_OK) or not os.stat(path).st_mode & 0o222):
        raise FlatscopeError(f"{path} is read-only; refusing to rewrite it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


_TMP = re.compile(r"^\.tmp-(\d+)-(.*)-[^-]+\.(h5|pt)$")


def _tmp_prefix(path: str) -> str:
    return f".tmp-{os.getpid()}-{os.path.basename(path)[:100]}-"


def clean_stale_temporaries(path: str, *, locked: bool = False) -> list[str]:
    """Remove the temporaries that killed writers left beside ``path``; returns what was removed.

    A temporary is named ``.tmp-<pid>-<results name>-XXXX.h5``. With the writer lock of ``path``
    held (``locked``) every temporary of that results file is stale (no other writer can be busy);
    otherwise, and for other files in the folder, only those whose process is gone.
    """
    directory = os.path.dirname(os.path.abspath(path))
    mine = os.path.basename(path)[:100]
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TMP.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        if (locked and m.group(2) == mine) or not _pid_alive(pid):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except OSError:
                pass
    return removed


@contextlib.contextmanager
def writer_lock(path: str) -> Iterator[None]:
    """Hold the exclusive writer lock of results file ``path`` (a lock file ``.<name>.lock`` beside it).

    ``fcntl.flock`` on a separate file: the kernel drops the lock when its holder dies (kill -9
    included), so a crashed writer never blocks the next one, and the lock survives the rename
    that replaces the results file. The holder removes the lock file before releasing it (a waiter
    that then finds its file gone takes the new one), so nothing is left behind. Where ``fcntl``
    does not exist (Windows) writes are not serialised.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise FlatscopeError(f"cannot write {path}: cannot create its lock file {lock}: {exc.strerror}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed this lock file while we waited: take the new one
    try:
        yield
    finally:
        try:
            os.unlink(lock)  # still holding it, so no one else has it; waiters retry on the new file
        except OSError:
            pass
        os.close(fd)


@contextlib.contextmanager
def update(path: str) -> Iterator[h5py.File]:
    """Open ``path`` for changes that land atomically when the block exits without error.

    Writers are serialised by :func:`writer_lock`: the copy, the changes and the rename happen under
    it, so two processes adding different analyses to one file both keep theirs.
    """
    check_output_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    with writer_lock(path):
        clean_stale_temporaries(path, locked=True)
        check_output_path(path)  # again: another writer may have created it meanwhile
        try:
            fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".h5", dir=directory)
        except OSError as exc:
            raise FlatscopeError(f"cannot write {path}: {exc.strerror}") from None
        os.close(fd)
        try:
            if os.path.exists(path):
                shutil.copyfile(path, tmp)
                mode = "r+"
            else:
                mode = "w"
            with h5py.File(tmp, mode) as f:
                yield f
                f.flush()
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            if os.path.exists(path):
                shutil.copymode(path, tmp)
            else:
                os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _attr_value(v: Any):
    if isinstance(v, (str, int, float, bool, np.integer, np.floating, np.bool_)):
        return v
    return json.dumps(to_jsonable(v))


def write_tree(group: h5py.Group, tree: dict) -> None:
    """Write a nested dict: dicts become groups, arrays/lists/numbers datasets, strings attrs."""
    for key, value in tree.items():
        if value is None:
            continue
        if isinstance(value, dict):
            write_tree(group.create_group(key), value)
        elif isinstance(value, str):
            group.attrs[key] = value
        else:
            arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
            if arr.dtype == object:
                raise TypeError(f"cannot store {key!r} of object dtype")
            group.create_dataset(key, data=arr)


def write_analysis(
    f: h5py.File,
    name: str,
    tree: dict,
    *,
    kind: str,
    summary: dict,
    options: dict,
    provenance: dict,
    warnings: list[str] | None = None,
) -> h5py.Group:
    """Replace group ``name`` with ``tree`` plus the standard attrs.

    ``warnings`` (the messages the run raised about these numbers: sampler heating, low ESS,
    non-convergence, ...) go to the attr ``warnings`` as a JSON list, unless the tree sets it itself.
    """
    if name in f:
        del f[name]
    g = f.create_group(name)
    write_tree(g, tree)
    g.attrs["kind"] = kind
    g.attrs["summary"] = json.dumps(to_jsonable(summary))
    g.attrs["options"] = json.dumps(to_jsonable(options))
    for k, v in provenance.items():
        if v is not None:
            g.attrs[k] = _attr_value(v)
    if warnings is not None and "warnings" not in g.attrs:
        g.attrs["warnings"] = json.dumps([str(w) for w in warnings])
    return g


def other_checkpoint(path: str, sha256: str) -> tuple[str, str, str] | None:
    """The first analysis in results file ``path`` of a checkpoint other than ``sha256``.

    Returns ``(group, checkpoint path, its sha256)``, or None when every analysis that records its
    checkpoint is of this one (or the file holds none).
    """
    with open_results(path) as f:
        for name, g in find_analyses(f):
            other = g.attrs.get("checkpoint_sha256")
            if other is not None and str(other) != sha256:
                return f"/{name}", str(g.attrs.get("checkpoint", "?")), str(other)
    return None


def stored_warnings(group: h5py.Group) -> list[str]:
    """The warnings stored with an analysis group (attr ``warnings``, a JSON list; [] when none)."""
    raw = group.attrs.get("warnings")
    if raw is None:
        return []
    try:
        out = json.loads(raw)
    except (TypeError, ValueError):
        return [str(raw)]
    return (
        [str(w.get("message", w)) if isinstance(w, dict) else str(w) for w in out]
        if isinstance(out, list)
        else [str(out)]
    )


def read_tree(group: h5py.Group) -> dict:
    """The inverse of :func:`write_tree`; string attrs come back under their names too."""
    out: dict = {}
    for k, v in group.attrs.items():
        out[k] = v.decode() if isinstance(v, bytes) else (v.item() if isinstance(v, np.generic) else v)
    for k, item in group.items():
        out[k] = read_tree(item) if isinstance(item, h5py.Group) else item[()]
    return out


def find_analyses(f: h5py.File) -> list[tuple[str, h5py.Group]]:
    """(path, group) of every group that carries a ``kind`` attr, in file order."""
    found: list[tuple[str, h5py.Group]] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and "kind" in obj.attrs:
            found.append((name, obj))

    f.visititems(visit)
    return found


def open_results(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise FlatscopeError(f"results file not found: {path}")
    if not h5py.is_hdf5(path):
        raise FlatscopeError(f"{path} is not an HDF5 results file")
    return h5py.File(path, "r")


def to_jsonable(x: Any):
    """numpy/torch values to plain JSON types; NaN and Inf become null."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if np.isfinite(x) else None
    if isinstance(x, bytes):
        return x.decode()
    return x
