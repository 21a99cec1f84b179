"""What every benchmark prints about the machine it ran on (RESULTS.md keeps it with each figure)."""

from __future__ import annotations

import platform
import subprocess

import torch


def cpu_name() -> str:
    """The CPU model as lscpu reports it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown CPU"


def machine() -> str:
    """CPU, torch version, thread count and GPU, in one line."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), {dev}"
