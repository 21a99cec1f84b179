"""Hugging Face model folders, loaded without running code from them.

A folder written by ``save_pretrained`` holds ``config.json`` and weights. flatscope builds the
architecture named in the config from the installed ``transformers`` package
(``trust_remote_code`` is never passed: a config that asks for remote code, ``auto_map``, is
refused) and reads only safetensors weights (``model.safetensors`` or a sharded index); pickled
``pytorch_model.bin`` weights are refused, since unpickling can run code.
"""

from __future__ import annotations

import json
import os

import torch

from .errors import FlatscopeError


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise FlatscopeError(f"{path}/config.json is not readable JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise FlatscopeError(f"{path}/config.json is not a JSON object")
    if cfg.get("auto_map"):
        raise FlatscopeError(
            f"{path} needs remote code (config.json has auto_map); flatscope never runs code from "
            "a model folder (trust_remote_code is not passed)"
        )
    return cfg


def build_hf_model(path: str, *, load_weights: bool = True) -> torch.nn.Module:
    """The model of a local Hugging Face folder, with its safetensors weights (or randomly initialized
    from the config when ``load_weights`` is false: the weights then come from a flatscope checkpoint)."""
    if not is_hf_folder(path):
        raise FlatscopeError(f"hf:{path}: not a Hugging Face model folder (no config.json)")
    cfg = _config(path)
    try:
        import transformers
    except ImportError:
        raise FlatscopeError("Hugging Face models need transformers: pip install 'flatscope[hf]'") from None
    files = set(os.listdir(path))
    has_st = "model.safetensors" in files or "model.safetensors.index.json" in files
    if load_weights and not has_st:
        if {"pytorch_model.bin", "pytorch_model.bin.index.json"} & files:
            raise FlatscopeError(
                f"{path} holds only pickled pytorch_model.bin weights, which can run code when read; "
                "re-save it with save_pretrained(..., safe_serialization=True)"
            )
        raise FlatscopeError(f"{path} holds no model.safetensors weights")
    transformers.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        raise FlatscopeError(f"{path}: transformers cannot read its config: {str(exc).splitlines()[0]}") from None
    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    try:
        if load_weights:
            model = cls.from_pretrained(
                path, config=config, use_safetensors=True, trust_remote_code=False, local_files_only=True
            )
        else:
            model = cls(config) if cls is not transformers.AutoModel else cls.from_config(config)
    except Exception as exc:
        raise FlatscopeError(
            f"{path}: cannot build {archs[0] if archs else 'the model'}: {str(exc).splitlines()[0]}"
        ) from None
    model.eval()
    return model
