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
``model`` (with a model given by the caller), and a ``torch.export`` program (``.pt2``), which
needs no model code. Files are always loaded with ``weights_only=True``; a pickle that would need
anything else is refused before any of it runs.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from dataclasses import dataclass, field

import torch

from .errors import FlatscopeError
from .models import build_model, load_state_dict_strict

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
    kind: str = "flatscope"          # flatscope | state_dict | export
    sha256: str = ""
    raw: dict = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_torch_load(path: str):
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive ("PK\x03\x04"); the legacy format is a pickle (protocol >= 2: 0x80)
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise FlatscopeError(f"{path} is not a PyTorch checkpoint: it is neither a zip archive (torch.save) nor a "
                             f"pickle (it starts with {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise FlatscopeError(f"refused to load {path}: it holds pickled objects that safe (weights_only) loading "
                             f"does not allow, and flatscope never runs code from a checkpoint ({detail.strip()})") from None
    except Exception as exc:  # torch raises many types for foreign or truncated files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlatscopeError(f"{path} is not a readable PyTorch checkpoint (truncated or another format?): {msg}") from None


def _load_export(path: str) -> torch.nn.Module:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(path)
    except Exception as exc:
        raise FlatscopeError(f"{path} is not a readable torch.export program: {str(exc).splitlines()[0]}") from None
    module = ep.module()
    example = ep.example_inputs[0] if ep.example_inputs else ()
    if len(example) == 1 and isinstance(example[0], torch.Tensor) and example[0].dim() >= 1:
        x = example[0]
        probe = torch.zeros((x.shape[0] + 1, *x.shape[1:]), dtype=x.dtype)
        try:
            with torch.no_grad():
                module(probe)
        except Exception:
            raise FlatscopeError(f"{path} was exported with a fixed batch size {x.shape[0]}; flatscope evaluates "
                                 "whole data splits in batches, so export with a dynamic batch dimension: "
                                 "dynamic_shapes=({0: torch.export.Dim('batch')},)") from None
    return module


def _check_finite(model: torch.nn.Module, path: str) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if torch.is_floating_point(t) and not torch.isfinite(t).all():
            raise FlatscopeError(f"{path}: {name} holds NaN or Inf (pass --allow-nonfinite to analyze it anyway)")


def load_checkpoint(path: str, *, model_spec: dict | None = None, allow_import: bool = False,
                    allow_nonfinite: bool = False) -> Checkpoint:
    """Load a checkpoint safely.

    ``model_spec`` (from ``--model``/``--model-kwargs``) overrides the stored one and is required for a
    bare state_dict; ``allow_import`` permits importing a ``pkg.module:factory`` model, which the CLI
    grants only for a factory the user typed.
    """
    if not os.path.exists(path):
        raise FlatscopeError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise FlatscopeError(f"{path} is a directory, not a checkpoint")
    digest = sha256_file(path)
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
        if not isinstance(version, int) or version > VERSION:
            raise FlatscopeError(f"{path}: checkpoint format version {version!r} is newer than this flatscope reads ({VERSION})")
        spec = model_spec or obj.get("model")
        state = obj.get("state_dict")
        kind = "flatscope"
        data_spec, loss, train = obj.get("data"), obj.get("loss"), obj.get("train") or {}
    else:
        state = None
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
        if state is None and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = obj
        if state is None:
            raise FlatscopeError(f"{path} is neither a flatscope checkpoint nor a state_dict "
                                 f"(top-level keys: {', '.join(map(str, list(obj)[:6]))})")
        if model_spec is None:
            raise FlatscopeError(f"{path} is a bare state_dict: name its architecture with --model NAME "
                                 "(and --model-kwargs JSON)")
        spec, kind, data_spec, loss, train = model_spec, "state_dict", None, None, {}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FlatscopeError(f"{path}: the state_dict must map names to tensors")
    if not isinstance(spec, dict):
        raise FlatscopeError(f"{path}: no model spec stored; pass --model")
    model = build_model(spec, allow_import=allow_import)
    load_state_dict_strict(model, state)
    if not allow_nonfinite:
        _check_finite(model, path)
    model.eval()
    return Checkpoint(path, model, spec, data_spec, loss, train, kind=kind, sha256=digest, raw=obj)


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temporary file beside ``path``, then rename: never a half-written checkpoint."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str, model: torch.nn.Module, model_spec: dict, data_spec: dict, loss: str,
                    train: dict, extra: dict | None = None) -> None:
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    obj = {"format": FORMAT, "version": VERSION, "model": model_spec, "state_dict": state,
           "data": data_spec, "loss": loss, "train": train}
    if extra:
        obj.update(extra)
    atomic_torch_save(obj, path)
