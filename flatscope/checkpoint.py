"""Reading and writing checkpoints without ever running code from them.

A flatscope checkpoint is a ``.pt`` dict that ``torch.load(..., weights_only=True)`` reads::

    {"format": "flatscope-checkpoint", "version": 1,
     "model": {"name": "mlp", "kwargs": {...}},        # built-in name or pkg.module:factory
     "state_dict": {...},                              # parameters and buffers
     "data": {"name": "digits", "kwargs": {...}},
     "loss": "ce",
     "train": {...}}                                   # optimizer, hyperparameters, seed, history,
                                                       # gradient evaluations, versions, wall time

Also accepted: a bare state_dict, or a dict holding ``state_dict`` / ``model_state_dict`` /
``model`` (with a model given by the caller), a ``.safetensors`` file of weights (with a model
given by the caller), a Hugging Face model folder (``config.json`` + safetensors weights, see
:mod:`flatscope.hf`), and a ``torch.export`` program (``.pt2``), which needs no model code.
Files are always loaded with ``weights_only=True``; a pickle that would need
anything else is refused before any of it runs. A ``.pt2`` archive is checked entry by entry
and its pickles are re-read with ``weights_only=True`` before ``torch.export.load`` sees it
(which would otherwise unpickle parts of it without that restriction); compiled code
(AOTInductor) is refused, and the graph may call only registered tensor operators.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field

import torch

from .errors import FlatscopeError
from .models import build_model, load_state_dict_strict
from .safe_files import check_regular_file, check_zip, max_params

FORMAT = "flatscope-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    path: str
    model: torch.nn.Module
    model_spec: dict | None
    data_spec: dict | None
    loss: str | None
    train: dict = field(default_factory=dict)
    kind: str = "flatscope"  # flatscope | state_dict | export
    sha256: str = ""
    raw: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # conversions made while loading, for the user

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_ZIP_MAGIC = b"PK\x03\x04"


def _sniff(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _safe_torch_load(path: str):
    head = _sniff(path)
    if head == _ZIP_MAGIC:
        check_zip(path)  # the declared sizes, before torch unpacks anything
    elif not head or head[0] != 0x80:  # neither torch's zip format nor a pickle (protocol 2+)
        raise FlatscopeError(f"{path} is not a PyTorch checkpoint (not a readable torch.save zip archive or pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        lines = text.strip().splitlines()
        if "weights_only" not in text.replace(" ", "_").lower() and "Weights only" not in text:
            raise FlatscopeError(
                f"{path} is not a readable PyTorch checkpoint: {lines[0] if lines else 'bad pickle'}"
            ) from None
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        detail = detail.split(" Please use")[0]
        raise FlatscopeError(
            f"refused to load {path}: it holds pickled objects that safe (weights_only) loading "
            f"does not allow, and flatscope never runs code from a checkpoint ({detail.strip()})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign or truncated files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlatscopeError(
            f"{path} is not a readable PyTorch checkpoint (truncated or another format?): {msg}"
        ) from None


# --------------------------------------------------------------------------- torch.export archives
# torch.export.load unpickles parts of a .pt2 with weights_only=False (sample inputs and constants as a
# fallback, "use_pickle" weights, custom and opaque objects) and loads AOTInductor shared libraries.
# So the archive is read into memory, checked entry by entry, its pickles are loaded with
# weights_only=True and written back from those safe objects, and only that copy reaches torch.
_PT2_PLAIN = ("archive_format", "archive_version", "byteorder", "version")
_PT2_PICKLES_LEGACY = ("serialized_state_dict.json", "serialized_constants.json", "serialized_example_inputs.json")


def _safe_pickle_bytes(data: bytes, path: str, entry: str) -> bytes:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure of the safe loader is a refusal
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0]).strip()
        detail = detail.split(" Please use")[0]
        raise FlatscopeError(
            f"refused to load {path}: its entry {entry} is a pickle that safe (weights_only) "
            f"loading does not allow, and flatscope never runs code from a checkpoint ({detail})"
        ) from None
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _payload_config(data: bytes, path: str, entry: str, *, constants: bool) -> None:
    try:
        config = json.loads(data.decode("utf-8")).get("config", {})
        items = list(config.items())
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise FlatscopeError(f"{path}: {entry} is not a valid payload config") from None
    for fqn, meta in items:
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise FlatscopeError(
                f"refused to load {path}: {entry} marks {fqn!r} as pickled (use_pickle), which "
                "torch would unpickle without weights_only; flatscope never runs code from a checkpoint"
            )
        name = str(meta.get("path_name", ""))
        if constants and not name.startswith("tensor_"):
            raise FlatscopeError(
                f"refused to load {path}: constant {fqn!r} is a pickled object ({name}), "
                "not a tensor; flatscope never runs code from a checkpoint"
            )


def _sanitized_export(path: str) -> io.BytesIO:
    """The archive at ``path``, checked, with every pickle re-written from a weights_only load."""
    infos = check_zip(path)
    with zipfile.ZipFile(path) as z:
        names = [i.filename for i in infos if not i.is_dir()]
        firsts = {n.split("/", 1)[0] for n in names}
        legacy = "version" in names or not (len(firsts) == 1 and all("/" in n for n in names))
        root = "" if legacy else next(iter(firsts)) + "/"
        if f"{root}archive_format" not in names and "serialized_exported_program.json" not in names:
            raise FlatscopeError(
                f"{path} is not a readable torch.export program (no archive_format entry; "
                "a torch.save checkpoint should be named .pt)"
            )
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as w:
            for name in names:
                rel = name[len(root) :]
                data = z.read(name)
                if (
                    rel in _PT2_PLAIN
                    or rel.startswith((".data/", "extra/"))
                    or (legacy and rel == "serialized_exported_program.json")
                ):
                    pass
                elif legacy and rel in _PT2_PICKLES_LEGACY:
                    data = _safe_pickle_bytes(data, path, name)
                elif not legacy and rel.startswith("models/") and rel.endswith(".json"):
                    pass
                elif not legacy and rel.startswith("data/sample_inputs/") and rel.endswith(".pt"):
                    data = _safe_pickle_bytes(data, path, name)
                elif not legacy and rel.startswith("data/weights/") and rel.endswith("_weights_config.json"):
                    _payload_config(data, path, name, constants=False)
                elif not legacy and rel.startswith("data/constants/") and rel.endswith("_constants_config.json"):
                    _payload_config(data, path, name, constants=True)
                elif not legacy and rel.startswith(("data/weights/weight_", "data/constants/tensor_")):
                    pass  # raw tensor bytes, read with frombuffer
                elif rel.startswith(("data/aotinductor/", "data/executorch/")):
                    raise FlatscopeError(
                        f"refused to load {path}: it holds compiled code ({name}); flatscope loads "
                        "only the exported graph and its weights"
                    )
                else:
                    raise FlatscopeError(
                        f"refused to load {path}: unexpected archive entry {name!r} (flatscope "
                        "loads only the entries of a plain torch.export.save program)"
                    )
                w.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    out.seek(0)
    return out


def _check_export_graph(ep, path: str) -> None:
    """Every call in the graph is a registered operator (or operator/math arithmetic), never a Python function."""
    import builtins
    import math as _math
    import operator

    allowed_modules = {operator.__name__, _math.__name__, builtins.__name__, "_operator"}
    modules = [m for m in ep.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    for gm in modules:
        for node in gm.graph.nodes:
            if node.op not in ("call_function", "call_method"):
                continue
            t = node.target
            if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
                continue
            if callable(t) and getattr(t, "__module__", None) in allowed_modules:
                continue
            if callable(t) and getattr(t, "__name__", "").startswith("sym_") and t is getattr(torch, t.__name__, None):
                continue
            name = getattr(t, "__qualname__", None) or str(t)
            raise FlatscopeError(
                f"refused to load {path}: its graph calls {getattr(t, '__module__', '?')}.{name}, "
                "which is not a tensor operator; flatscope runs only operator graphs"
            )


def _load_export(path: str) -> torch.nn.Module:
    import logging
    import warnings

    buf = _sanitized_export(path)
    quiet = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch.export.pt2_archive._package")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(buf)
    except FlatscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a foreign archive
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FlatscopeError(f"{path} is not a readable torch.export program: {first}") from None
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    _check_export_graph(ep, path)
    if ep.state_dict:
        validate_state_dict(dict(ep.state_dict), path)  # parameters and buffers (constants may be indices)
    module = ep.module()
    example = ep.example_inputs[0] if ep.example_inputs else ()
    if len(example) == 1 and isinstance(example[0], torch.Tensor) and example[0].dim() >= 1:
        x = example[0]
        probe = torch.zeros((x.shape[0] + 1, *x.shape[1:]), dtype=x.dtype)
        try:
            with torch.no_grad():
                module(probe)
        except Exception:  # noqa: BLE001 - a shape guard of the export
            raise FlatscopeError(
                f"{path} was exported with a fixed batch size {x.shape[0]}; flatscope evaluates "
                "whole data splits in batches, so export with a dynamic batch dimension: "
                "dynamic_shapes=({0: torch.export.Dim('batch')},)"
            ) from None
    return module


def _sha256_folder(path: str) -> str:
    """sha256 over the config and weight files of a model folder (names and contents, sorted)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and (name.endswith((".json", ".safetensors"))):
            h.update(name.encode())
            h.update(sha256_file(full).encode())
    return h.hexdigest()


def _load_safetensors(path: str) -> dict:
    """A safetensors file as a state_dict (the format holds tensors only: nothing to run)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise FlatscopeError(".safetensors checkpoints need the safetensors package: pip install safetensors") from None
    try:
        return load_file(path, device="cpu")
    except Exception as exc:
        raise FlatscopeError(f"{path} is not a readable safetensors file: {str(exc).splitlines()[0]}") from None


def _fill_tied(model: torch.nn.Module, state: dict) -> dict:
    """safetensors files store a tied tensor once: fill the other names from the model's own aliases."""
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k not in state]
    if not missing:
        return state
    by_ptr: dict[int, str] = {}
    for k, t in own.items():
        if k in state:
            by_ptr.setdefault(t.data_ptr(), k)
    out = dict(state)
    for k in missing:
        src = by_ptr.get(own[k].data_ptr())
        if src is not None:
            out[k] = state[src]
    return out


# --------------------------------------------------------------------------- state_dict policy
CONVERTED_DTYPES = (torch.float16, torch.bfloat16)
# Integer entries a model legitimately holds (BatchNorm's step counter); any other must be floating.
INTEGER_KEYS = ("num_batches_tracked",)


def validate_state_dict(
    state, path: str, *, max_numel: int | None = None, integer_keys: tuple[str, ...] = INTEGER_KEYS
) -> tuple[dict, list[str]]:
    """Check a loaded state_dict and return ``(state, notes)``; refuse what flatscope cannot analyze.

    Keys must be strings; values dense (strided) CPU-loadable tensors, not meta, sparse or quantized;
    floating point and not complex (integer/bool tensors only under keys ending in ``integer_keys``);
    at most ``max_numel`` elements in all (default :func:`flatscope.safe_files.max_params`).
    float16 and bfloat16 tensors are converted to float32 explicitly, and each conversion is reported
    in ``notes`` (float32 and float64 are kept; the analysis casts to its --dtype).
    """
    limit = max_params() if max_numel is None else max_numel
    if not isinstance(state, dict) or not state:
        raise FlatscopeError(f"{path}: the state_dict must be a non-empty mapping of names to tensors")
    out: dict = {}
    converted: dict[str, int] = {}
    total = 0
    for k, v in state.items():
        if not isinstance(k, str):
            raise FlatscopeError(f"{path}: state_dict key {k!r} is a {type(k).__name__}, not a parameter name")
        if not isinstance(v, torch.Tensor):
            raise FlatscopeError(f"{path}: state_dict entry {k!r} is a {type(v).__name__}, not a tensor")
        if v.layout != torch.strided:
            raise FlatscopeError(
                f"{path}: {k!r} is a {str(v.layout).replace('torch.', '')} tensor; flatscope needs "
                "dense weights (call .to_dense() before saving)"
            )
        if v.device.type == "meta":
            raise FlatscopeError(f"{path}: {k!r} is a meta tensor (a shape without values); nothing to analyze")
        if v.is_quantized:
            raise FlatscopeError(f"{path}: {k!r} is quantized ({v.dtype}); flatscope analyzes floating weights")
        if v.is_complex():
            raise FlatscopeError(
                f"{path}: {k!r} is complex ({str(v.dtype).replace('torch.', '')}); flatscope "
                "analyzes real floating weights"
            )
        if not v.is_floating_point():
            if not k.endswith(integer_keys):
                raise FlatscopeError(
                    f"{path}: {k!r} holds {str(v.dtype).replace('torch.', '')} values; flatscope "
                    "analyzes floating-point weights (float32, float64; float16/bfloat16 converted)"
                )
        elif v.dtype in CONVERTED_DTYPES:
            name = str(v.dtype).replace("torch.", "")
            converted[name] = converted.get(name, 0) + 1
            v = v.to(torch.float32)
        total += v.numel()
        if total > limit:
            raise FlatscopeError(f"{path}: the state_dict holds more than {limit} values (FLATSCOPE_MAX_PARAMS)")
        out[k] = v
    notes = [f"{path}: converted {n} {name} tensor(s) to float32 for the analysis" for name, n in converted.items()]
    return out, notes


def _check_spec(spec, path: str, what: str) -> dict:
    if not isinstance(spec, dict):
        raise FlatscopeError(
            f"{path}: the stored {what} spec is a {type(spec).__name__}, not {{\"name\": ..., \"kwargs\": {{...}}}}"
        )
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise FlatscopeError(f"{path}: the stored {what} spec has no name")
    kwargs = spec.get("kwargs")
    if kwargs is not None and (not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs)):
        raise FlatscopeError(
            f"{path}: the stored {what} kwargs must be a mapping of names to values, not {type(kwargs).__name__}"
        )
    return spec


def _check_finite(model: torch.nn.Module, path: str) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if torch.is_floating_point(t) and not torch.isfinite(t).all():
            raise FlatscopeError(f"{path}: {name} holds NaN or Inf (pass --allow-nonfinite to analyze it anyway)")


def peek_checkpoint(path: str) -> dict:
    """The stored dict of a flatscope ``.pt`` checkpoint (safely loaded), without building its model.

    For deciding what a command may do (e.g. whether the user named the stored factory) before any
    factory is imported.
    """
    check_regular_file(path, "checkpoint")
    obj = _safe_torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise FlatscopeError(f"{path} is not a flatscope checkpoint")
    return obj


def load_checkpoint(
    path: str, *, model_spec: dict | None = None, allow_import: bool = False, allow_nonfinite: bool = False
) -> Checkpoint:
    """Load a checkpoint safely.

    ``model_spec`` (from ``--model``/``--model-kwargs``) overrides the stored one and is required for a
    bare state_dict; ``allow_import`` permits importing a ``pkg.module:factory`` model, which the CLI
    grants only for a factory the user typed. Only regular files are read (see
    :mod:`flatscope.safe_files`); the state_dict passes :func:`validate_state_dict`, and the model is
    built on the meta device and checked against it before any parameter memory is allocated.
    """
    if os.path.isdir(path):
        from .hf import build_hf_model, is_hf_folder

        if not is_hf_folder(path):
            raise FlatscopeError(
                f"{path} is a directory, not a checkpoint (nor a Hugging Face folder with config.json)"
            )
        if model_spec is not None:
            raise FlatscopeError(f"{path} is a Hugging Face folder: its config names the architecture; drop --model")
        model = build_hf_model(path)
        if not allow_nonfinite:
            _check_finite(model, path)
        return Checkpoint(path, model, {"name": f"hf:{path}"}, None, None, kind="hf", sha256=_sha256_folder(path))
    check_regular_file(path, "checkpoint")
    digest = sha256_file(path)
    if path.endswith(".safetensors"):
        state = _load_safetensors(path)
        if model_spec is None:
            raise FlatscopeError(
                f"{path} holds weights only: name its architecture with --model NAME (and --model-kwargs JSON)"
            )
        state, notes = validate_state_dict(state, path)
        model = build_model(model_spec, allow_import=allow_import)  # tied names are filled in below
        load_state_dict_strict(model, _fill_tied(model, state))
        if not allow_nonfinite:
            _check_finite(model, path)
        model.eval()
        return Checkpoint(path, model, model_spec, None, None, kind="safetensors", sha256=digest, notes=notes)
    if path.endswith(".pt2"):
        model = _load_export(path)
        if not allow_nonfinite:
            _check_finite(model, path)
        return Checkpoint(path, model, None, None, None, kind="export", sha256=digest)

    obj = _safe_torch_load(path)
    if not isinstance(obj, dict):
        raise FlatscopeError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state_dict")

    if obj.get("format") == FORMAT:
        version = obj.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
            raise FlatscopeError(
                f"{path}: checkpoint format version {version!r} is newer than this flatscope reads ({VERSION})"
            )
        spec = model_spec or obj.get("model")
        if spec is None:
            raise FlatscopeError(f"{path}: no model spec stored; pass --model")
        spec = _check_spec(spec, path, "model")
        state = obj.get("state_dict")
        kind = "flatscope"
        data_spec, loss, train = obj.get("data"), obj.get("loss"), obj.get("train") or {}
        if data_spec is not None:
            data_spec = _check_spec(data_spec, path, "data")
        if loss is not None and not isinstance(loss, str):
            raise FlatscopeError(f"{path}: the stored loss is a {type(loss).__name__}, not a loss name")
        if not isinstance(train, dict):
            raise FlatscopeError(f"{path}: the stored training record is a {type(train).__name__}, not a mapping")
    else:
        state = None
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
        if state is None and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = obj
        if state is None:
            raise FlatscopeError(
                f"{path} is neither a flatscope checkpoint nor a state_dict "
                f"(top-level keys: {', '.join(map(str, list(obj)[:6]))})"
            )
        if model_spec is None:
            raise FlatscopeError(
                f"{path} is a bare state_dict: name its architecture with --model NAME (and --model-kwargs JSON)"
            )
        spec, kind, data_spec, loss, train = model_spec, "state_dict", None, None, {}
    state, notes = validate_state_dict(state, path)
    model = build_model(spec, allow_import=allow_import, fits=state)
    wide = {v.dtype for v in state.values() if v.is_floating_point()}
    if wide == {torch.float64}:
        model = model.to(torch.float64)  # keep float64 weights exact; the analysis casts to its --dtype
    load_state_dict_strict(model, state)
    if not allow_nonfinite:
        _check_finite(model, path)
    model.eval()
    return Checkpoint(path, model, spec, data_spec, loss, train, kind=kind, sha256=digest, raw=obj, notes=notes)


def check_checkpoint_output(path: str) -> None:
    """Refuse to overwrite anything but a writable flatscope checkpoint at ``path`` (a link is followed).

    So ``train -o`` never replaces a results file, a data file or any other file, and never a
    read-only one; a symlink stays a link (the checkpoint is written to its target).
    """
    target = os.path.realpath(path)
    if os.path.isdir(target):
        raise FlatscopeError(f"-o {path} is a directory")
    if not os.path.lexists(target):
        return
    if not os.path.exists(target):
        raise FlatscopeError(f"-o {path}: a dangling link")
    size = check_regular_file(target, "checkpoint")
    if not os.access(target, os.W_OK) or not os.stat(target).st_mode & 0o222:
        raise FlatscopeError(f"refusing to overwrite {path}: the file is read-only")
    try:
        ok = size > 0 and _sniff(target) == _ZIP_MAGIC and peek_checkpoint(target) is not None
    except FlatscopeError:
        ok = False
    if not ok:
        raise FlatscopeError(
            f"refusing to overwrite {path}: it exists and is not a flatscope checkpoint "
            "(choose another -o or remove the file yourself)"
        )


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temporary file beside ``path``, then rename: never a half-written checkpoint.

    A symlink at ``path`` is kept (its target is replaced), and so are the permissions of a file
    being replaced.
    """
    from .results import _tmp_prefix, clean_stale_temporaries

    if os.path.islink(path):
        path = os.path.realpath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    clean_stale_temporaries(path)  # those of killed writers
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".pt", dir=directory)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        if os.path.exists(path):
            shutil.copymode(path, tmp)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(
    path: str,
    model: torch.nn.Module,
    model_spec: dict,
    data_spec: dict,
    loss: str,
    train: dict,
    extra: dict | None = None,
) -> None:
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_spec,
        "state_dict": state,
        "data": data_spec,
        "loss": loss,
        "train": train,
    }
    if extra:
        obj.update(extra)
    atomic_torch_save(obj, path)
