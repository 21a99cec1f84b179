"""Shared pieces of the realistic and scale benchmarks: models, data, the three tools' top-k runs, and
the one-tool-per-subprocess protocol that gives each tool its own peak RSS.

Models and data (all deterministic, nothing downloaded):

- ``resnet18``: the torchvision ResNet-18 architecture (BasicBlock, [2, 2, 2, 2], 10 classes,
  11,181,642 parameters; the state_dict keys and shapes are torchvision's), at its seeded
  initialization, eval mode (BatchNorm with its running statistics);
- ``gpt2``: a ``transformers.GPT2LMHeadModel`` built from a config (byte-level vocabulary of 256,
  tied embeddings), at its seeded initialization, dropout off;
- ``mlp``: a ReLU MLP on the digits' 64 features;
- image data: scikit-learn's digits (real, 1,797 images) upsampled to 3 x 32 x 32, tiled with
  one-pixel-shifted copies past 1,797;
- token data: the bytes of CPython's own ``LICENSE.txt`` (real English text, present in every
  CPython install), cut into non-overlapping sequences.

The tools, each on the same model, data batches and loss:

- ``flatscope``: :class:`flatscope.objective.Objective` + :func:`flatscope.linalg.lanczos` through
  :class:`flatscope.analyses.hessian.HessianOperator` (what ``flatscope hessian --top k`` runs);
- ``eigenthings``: hessian-eigenthings' ``HessianOperator`` (double backward; for GPT-2 its
  Hugging Face path ``hf_lm_loss``, the model's own ``labels`` loss) + its ``lanczos``;
- ``curvlinops``: curvlinops' ``HessianLinearOperator`` (forward-over-reverse) + ``scipy.sparse.linalg.eigsh``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VENV_PYTHON = os.environ.get("FLATSCOPE_BENCH_PYTHON", sys.executable)  # a venv with the competitors


# ------------------------------------------------------------------ models


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` (same modules, names, shapes and initialization scheme)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(64, 1)
        self.layer2 = self._layer(128, 2)
        self.layer3 = self._layer(256, 2)
        self.layer4 = self._layer(512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _layer(self, planes: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, down), BasicBlock(planes, planes)]
        self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def gpt2(n_embd: int, n_layer: int, n_head: int, n_positions: int = 128):
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=256,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def mlp(width: int, depth: int = 2, d_in: int = 64, d_out: int = 10) -> nn.Module:
    dims = [d_in] + [width] * depth
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(dims[-1], d_out))


class LogitsLM(nn.Module):
    """``ids -> logits[:, :-1]`` flattened to ``(N (T-1), V)``: the next-token loss as a plain
    ``CrossEntropyLoss`` on ``ids[:, 1:]``, for tools that take ``loss(model(X), y)``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        logits = self.lm(input_ids=ids).logits
        return logits[:, :-1].reshape(-1, logits.shape[-1])


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------ data


def digits_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real digits as 3 x 32 x 32 float32 images in [0, 1]; past 1,797 the images repeat,
    shifted right by one pixel per repetition."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.from_numpy(d.target.astype(np.int64))
    reps = [torch.roll(x, shifts=r, dims=3) for r in range(-(-n // len(x)))]
    return torch.cat(reps)[:n].contiguous(), y.repeat(len(reps))[:n].contiguous()


def digits_features(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy((d.data[:n] / 16.0).astype(np.float32)), torch.from_numpy(d.target[:n].astype(np.int64))


def text_tokens(n_seq: int, seq_len: int) -> torch.Tensor:
    """``(n_seq, seq_len)`` byte tokens of CPython's LICENSE.txt (13,936 bytes), consecutive; where the
    interpreter has no LICENSE.txt, of flatscope's own source files (sorted by path)."""
    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not lic.exists():  # an interpreter without it (some images): flatscope's own sources, in sorted order
        src = sorted((ROOT / "flatscope").rglob("*.py"))
        raw = b"".join(f.read_bytes() for f in src)
    else:
        raw = lic.read_bytes()
    need = n_seq * seq_len
    if len(raw) < need:
        raise SystemExit(f"LICENSE.txt has {len(raw)} bytes, {need} needed")
    return torch.from_numpy(np.frombuffer(raw[:need], dtype=np.uint8).astype(np.int64)).reshape(n_seq, seq_len)


# ------------------------------------------------------------------ the tools' top-k runs


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_flatscope(
    model,
    X,
    y,
    loss: str,
    k: int,
    batch_size: int,
    *,
    dtype=torch.float32,
    tol: float = 1e-5,
    max_iter: int | None = None,
    max_basis: int | None = None,
    basis_dtype=None,
):
    from flatscope.analyses.hessian import HessianOperator
    from flatscope.linalg import lanczos
    from flatscope.objective import Objective

    dev = X.device  # the worker moved model and data to the spec's device
    from flatscope.memory import basis_dtype as default_basis_dtype

    basis_dtype = basis_dtype or default_basis_dtype(dtype)  # the CLI's: float32 vectors for a float32 model
    obj = Objective(model, X, y, loss=loss, batch_size=batch_size, dtype=dtype, hvp_mode="exact", device=dev)
    op = HessianOperator(obj)
    r = lanczos(op, obj.dim, k, seed=0, tol=tol, max_iter=max_iter, max_basis=max_basis, dtype=basis_dtype, device=dev)
    res = [float(x) for x in r.residuals] if getattr(r, "residuals", None) is not None else None
    return dict(
        eigenvalues=[float(v) for v in r.eigenvalues],
        hvps=int(r.n_matvec),
        residuals=res,
        converged=bool(r.all_converged),
        hvp_mode=op.mode,
    )


class _Counted:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, v):
        self.n += 1
        return self.fn(v)


def run_eigenthings(model, X, y, loss: str, k: int, batch_size: int, *, steps: int = 40):
    import hessian_eigenthings as he

    model = model.eval()
    if loss == "lm":
        batches = [
            {"input_ids": X[i : i + batch_size], "labels": X[i : i + batch_size]} for i in range(0, len(X), batch_size)
        ]
        loss_fn = he.hf_lm_loss() if hasattr(he, "hf_lm_loss") else he.loss_fns.huggingface.hf_lm_loss()
    else:
        batches = [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(X), batch_size)]
        loss_fn = he.supervised_loss(nn.CrossEntropyLoss())
    op = he.HessianOperator(model, batches, loss_fn)
    c = _Counted(op.matvec)
    lop = he.LambdaOperator(c, size=op.size, device=op.device, dtype=op.dtype)
    r = he.lanczos(lop, k=k, which="LA", seed=0, max_iter=steps)
    return dict(
        eigenvalues=[float(v) for v in r.eigenvalues],
        hvps=c.n,
        residuals=[float(v) for v in r.residuals],
        converged=bool(r.converged.all()),
    )


def run_curvlinops(model, X, y, loss: str, k: int, batch_size: int):
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    model = model.eval()
    if loss == "lm":
        model = LogitsLM(model)
        data = [(X[i : i + batch_size], X[i : i + batch_size, 1:].reshape(-1)) for i in range(0, len(X), batch_size)]
    else:
        data = [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(X), batch_size)]
    params = [p for p in model.parameters() if p.requires_grad]
    H = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, data, check_deterministic=False)
    Hs = H.to_scipy()
    c = _Counted(lambda v: Hs @ v)
    A = LinearOperator(Hs.shape, matvec=c, dtype=Hs.dtype)
    vals = eigsh(
        A,
        k=k,
        which="LA",
        return_eigenvectors=False,
        v0=np.random.default_rng(0).standard_normal(Hs.shape[0]).astype(Hs.dtype),
    )
    return dict(eigenvalues=sorted((float(v) for v in vals), reverse=True), hvps=c.n)


# ------------------------------------------------------------------ one tool per subprocess


def worker_main(build, argv=None) -> None:
    """``python SCRIPT --worker JSONSPEC``: build the case, run one tool, print one JSON line.
    ``wall_s`` and ``cpu_s`` (this process's CPU time, robust to a shared machine's load) cover the
    tool's run from its first call (one-time imports included, e.g. ``torch._dynamo``, which
    ``torch.func`` pulls in on first use), not the building of the model and data.

    ``build(spec) -> (model, X, y, loss)``; ``spec`` holds ``case``, ``tool``, ``k``, ``batch_size``
    and the tool's keyword arguments under ``kw``."""
    spec = json.loads(argv if argv is not None else sys.argv[sys.argv.index("--worker") + 1])
    torch.set_num_threads(int(spec.get("threads", 1)))
    model, X, y, loss = build(spec)
    device = torch.device(spec.get("device", "cpu"))
    if device.type != "cpu":  # e.g. "cuda": the tools run where model and data are
        model, X, y = model.to(device), X.to(device), y.to(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = current_rss_mb()
    tool = spec["tool"]
    kw = dict(spec.get("kw", {}))
    if "dtype" in kw:
        kw["dtype"] = getattr(torch, kw["dtype"])
    if "basis_dtype" in kw:
        kw["basis_dtype"] = getattr(torch, kw["basis_dtype"])
    fn = {"flatscope": run_flatscope, "eigenthings": run_eigenthings, "curvlinops": run_curvlinops}[tool]
    t, c = time.perf_counter(), time.process_time()
    try:
        out = fn(model, X, y, loss, spec["k"], spec["batch_size"], **kw)
        out["ok"] = True
    except Exception as exc:  # the failure is the result
        first = (str(exc).strip().splitlines() or [""])[0]
        out = dict(ok=False, error=f"{type(exc).__name__}: {first[:300]}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["gpu"] = torch.cuda.get_device_name(device)
    out.update(
        wall_s=time.perf_counter() - t,
        cpu_s=time.process_time() - c,
        base_rss_mb=base,
        peak_rss_mb=peak_rss_mb(),
        n_params=n_params(model),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    print("RESULT " + json.dumps(out), flush=True)


def spawn(script: str, spec: dict, timeout: float | None = None, python: str | None = None) -> dict:
    """Run ``script --worker spec`` in a fresh interpreter (the benchmark venv's, which sees the system
    packages and adds the competitors); the result's JSON, or the failure (exit status, last line)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads", 1)), PYTHONPATH=str(ROOT))
    py = python or (VENV_PYTHON if Path(VENV_PYTHON).exists() else sys.executable)
    t = time.perf_counter()
    try:
        p = subprocess.run(
            [py, script, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return dict(ok=False, error=f"timed out after {timeout:.0f} s", wall_s=time.perf_counter() - t)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    sig = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
    return dict(ok=False, error=f"{sig}: {tail[:300]}", wall_s=time.perf_counter() - t)


def run_and_append(script: str, spec: dict, out: str, timeout: float | None = None) -> dict:
    """:func:`spawn` one run, report it on stderr, and append it (with its spec) to the JSON-lines ``out``."""
    r = spawn(script, spec, timeout=timeout)
    r["spec"] = spec
    brief = {k: r.get(k) for k in ("ok", "wall_s", "hvps", "peak_rss_mb", "error")}
    print(f"  -> {json.dumps(brief)}", file=sys.stderr, flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(r) + "\n")
    return r


def rel_err(vals, ref) -> float:
    vals = np.sort(np.asarray(vals, dtype=np.float64))[::-1][: len(ref)]
    ref = np.asarray(ref, dtype=np.float64)
    if len(vals) < len(ref) or not np.all(np.isfinite(vals)):
        return float("nan")
    return float(np.max(np.abs(vals - ref) / np.abs(ref)))
