"""Checks that run on a file *before* anything in it is decompressed, allocated or executed.

Every loader in flatscope reads untrusted files: checkpoints, data files, results files, audit
suites. The rules, shared by all of them:

- only regular files are opened (a FIFO, socket or device at the path would block or stream
  forever), checked on the opened descriptor, not on the name;
- sizes are read from what the file *declares* (a zip directory, a ``.npy`` header, an HDF5
  dataspace) and compared with a limit before a byte is allocated;
- nothing may reach outside the file: an HDF5 external link, external raw storage or a virtual
  dataset is refused, and so is a dangling soft link;
- values must be real numbers: complex, object, string and empty arrays are refused.

The limits default to half the machine's physical memory (``FLATSCOPE_MAX_BYTES`` overrides it,
in bytes) and to 2**31 model parameters (``FLATSCOPE_MAX_PARAMS``).
"""

from __future__ import annotations

import math
import os
import stat
import zipfile

import numpy as np

from .errors import FlatscopeError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.isascii() or not value.strip().isdigit():
        raise FlatscopeError(f"{name}={value!r} must be a positive whole number")
    return int(value)


def _half_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def max_bytes() -> int:
    """The most bytes one file may declare (data, a checkpoint's tensors): ``FLATSCOPE_MAX_BYTES``."""
    return _env_int("FLATSCOPE_MAX_BYTES", _half_memory())


def max_params() -> int:
    """The most parameters a model may have before it is built: ``FLATSCOPE_MAX_PARAMS``."""
    return _env_int("FLATSCOPE_MAX_PARAMS", 2**31)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def check_regular_file(path: str, what: str = "file") -> int:
    """Refuse a missing path, a folder, or anything but a regular file; returns its size in bytes.

    The check is made on a descriptor opened with ``O_NONBLOCK`` (so a FIFO cannot block it), and
    the name is not followed once more in between.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FlatscopeError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise FlatscopeError(f"{path} is a directory, not a {what}") from None
    except OSError as exc:
        raise FlatscopeError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if stat.S_ISDIR(st.st_mode):
        raise FlatscopeError(f"{path} is a directory, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        raise FlatscopeError(f"{path} is {kind}, not a regular file; flatscope reads {what}s only from regular files")
    return st.st_size


def check_value_dtype(name: str, dtype: np.dtype, where: str) -> None:
    """Real numbers only: bool, integers and floats pass; complex, object, strings, records fail."""
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise FlatscopeError(f"{where}: {name} is complex-valued ({dtype}); flatscope needs real inputs and targets")
    if dtype.kind not in "biuf":
        raise FlatscopeError(f"{where}: {name} has dtype {dtype}, not a numeric array")


def check_zip(path: str, max_total: int | None = None) -> list[zipfile.ZipInfo]:
    """Read a zip file's directory (nothing is decompressed) and bound the declared sizes.

    Refuses entries whose names leave the archive, encrypted entries, a total declared
    (uncompressed) size above ``max_total`` bytes, and entries compressed more than 1000:1.
    """
    limit = max_bytes() if max_total is None else max_total
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise FlatscopeError(f"{path} is not a readable zip archive: {exc}") from None
    total = 0
    for info in infos:
        name = info.filename
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise FlatscopeError(f"{path}: archive entry {name!r} points outside the archive")
        if info.flag_bits & 0x1:
            raise FlatscopeError(f"{path}: archive entry {name!r} is encrypted")
        total += info.file_size
        if (
            info.compress_type != zipfile.ZIP_STORED
            and info.file_size > (1 << 20)
            and info.file_size > 1000 * max(info.compress_size, 1)
        ):
            raise FlatscopeError(
                f"{path}: archive entry {name!r} declares {human_bytes(info.file_size)} from "
                f"{human_bytes(info.compress_size)} compressed (a zip bomb?); refusing to unpack it"
            )
    if total > limit:
        raise FlatscopeError(
            f"{path} declares {human_bytes(total)} of content, above the limit of "
            f"{human_bytes(limit)} (FLATSCOPE_MAX_BYTES)"
        )
    return infos


def check_npz(
    path: str, max_total: int | None = None, *, allow_empty: bool = False
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of every array in an ``.npz``, read from the ``.npy`` headers only.

    Call before ``np.load(path, allow_pickle=False)``: the zip directory and each header must agree
    on the size, the total must be at most ``max_total`` bytes (default :func:`max_bytes`), and
    every array must hold real numbers (see :func:`check_value_dtype`) and, unless ``allow_empty``,
    at least one of them.
    """
    check_regular_file(path, "data file")
    limit = max_bytes() if max_total is None else max_total
    infos = check_zip(path, limit)
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    total = 0
    with zipfile.ZipFile(path) as z:
        for info in infos:
            if info.is_dir():
                continue
            key = info.filename.removesuffix(".npy")
            try:
                with z.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                    header_len = fh.tell()
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
                raise FlatscopeError(f"{path}: {info.filename} is not a .npy array: {exc}") from None
            if dtype.hasobject:
                raise FlatscopeError(f"{path}: {key} holds Python objects (a pickle); flatscope loads numbers only")
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes + header_len != info.file_size:
                raise FlatscopeError(
                    f"{path}: {key} declares shape {list(shape)} ({human_bytes(nbytes)}) but its "
                    f"entry holds {human_bytes(max(info.file_size - header_len, 0))}"
                )
            total += nbytes
            if total > limit:
                raise FlatscopeError(
                    f"{path}: the arrays declare {human_bytes(total)}, above the limit of "
                    f"{human_bytes(limit)} (FLATSCOPE_MAX_BYTES)"
                )
            check_value_dtype(key, dtype, path)
            if not allow_empty and math.prod(shape) == 0:
                raise FlatscopeError(f"{path}: {key} is empty (shape {list(shape)})")
            out[key] = (tuple(shape), dtype)
    return out


class _Missing(FlatscopeError):
    pass


def _check_h5_path(f, name: str, where: str, depth: int = 0) -> None:
    """Every link on the way to ``name`` stays inside the file and resolves."""
    import h5py

    if depth > 16:
        raise FlatscopeError(f"{where}: soft links around {name!r} nest too deeply (a cycle?)")
    parts = [p for p in name.split("/") if p]
    cur = ""
    for part in parts:
        parent, cur = cur or "/", cur + "/" + part
        link = f[parent].get(part, getlink=True)
        if link is None:
            raise _Missing(f"{where}: no {cur!r} in the file")
        if isinstance(link, h5py.ExternalLink):
            raise FlatscopeError(
                f"{where}: {cur!r} is an external link to {link.filename}:{link.path}; "
                "flatscope reads nothing outside the file it was given"
            )
        if isinstance(link, h5py.SoftLink):
            target = link.path if link.path.startswith("/") else parent.rstrip("/") + "/" + link.path
            try:
                _check_h5_path(f, target, where, depth + 1)
            except _Missing:
                raise FlatscopeError(f"{where}: {cur!r} is a dangling soft link (to {link.path!r})") from None


def check_h5_dataset(f, name: str, max_total: int | None = None, *, allow_empty: bool = False):
    """The dataset ``name`` of the open ``h5py.File`` ``f``, checked before any of it is read.

    Refused: a missing name, an external or dangling soft link on the way, a group or named type
    where a dataset should be, a virtual dataset, external raw storage, non-numeric or complex
    values, an empty dataset (unless ``allow_empty``), and more than ``max_total`` declared bytes.
    """
    import h5py

    where = getattr(f, "filename", "the HDF5 file")
    limit = max_bytes() if max_total is None else max_total
    _check_h5_path(f, name, where)
    obj = f[name]
    if isinstance(obj, h5py.Group):
        raise FlatscopeError(f"{where}: {name!r} is a group, not a dataset")
    if not isinstance(obj, h5py.Dataset):
        raise FlatscopeError(f"{where}: {name!r} is a {type(obj).__name__}, not a dataset")
    if obj.is_virtual:
        raise FlatscopeError(
            f"{where}: {name!r} is a virtual dataset that maps other files; "
            "flatscope reads nothing outside the file it was given"
        )
    if obj.external:
        raise FlatscopeError(
            f"{where}: {name!r} keeps its data in external files "
            f"({', '.join(str(e[0]) for e in obj.external[:2])}); refusing to read them"
        )
    if obj.shape is None:
        raise FlatscopeError(f"{where}: {name!r} has no data (a null dataspace)")
    check_value_dtype(name, obj.dtype, where)
    nbytes = math.prod(obj.shape) * obj.dtype.itemsize
    if nbytes > limit:
        raise FlatscopeError(
            f"{where}: {name!r} declares shape {list(obj.shape)} ({human_bytes(nbytes)}), above "
            f"the limit of {human_bytes(limit)} (FLATSCOPE_MAX_BYTES)"
        )
    if not allow_empty and obj.size == 0:
        raise FlatscopeError(f"{where}: {name!r} is empty (shape {list(obj.shape)})")
    return obj


def check_count(what: str, value, *, minimum: int = 1, maximum: int | None = None) -> int:
    """A whole number in ``[minimum, maximum]`` (bool, float and non-finite values refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        else:
            raise FlatscopeError(f"{what} must be a whole number, got {value!r}")
    value = int(value)
    if value < minimum:
        raise FlatscopeError(f"{what} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise FlatscopeError(f"{what} must be at most {maximum}, got {value}")
    return value


def check_allocation(what: str, n_values: int, bytes_per_value: int = 8) -> None:
    """Refuse an option that would make an analysis allocate more than :func:`max_bytes`."""
    need = int(n_values) * int(bytes_per_value)
    limit = max_bytes()
    if need > limit:
        raise FlatscopeError(
            f"{what} would need {human_bytes(need)} of memory, above the limit of "
            f"{human_bytes(limit)} (FLATSCOPE_MAX_BYTES); ask for fewer"
        )
