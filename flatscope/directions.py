"""Directions in parameter space for loss-landscape slices.

A slice is the loss along ``w(x) = w + x d`` (1-D) or ``w(x, y) = w + x d1 + y d2`` (2-D) around a
checkpoint's flat weights ``w``. This module makes the directions ``d``:

- :func:`random_directions`: Gaussian directions, normalized per filter (default), per layer or not at all
  (:func:`normalize_direction`), optionally orthogonalized;
- :func:`interpolation`: the line through two checkpoints or the plane through three;
- :func:`pca_directions`: the top principal directions of a training trajectory around its end point;
- :func:`read_hessian_eigenvectors`: the top Hessian eigenvectors saved by ``flatscope hessian
  --save-eigenvectors``;
- :func:`read_landscape_directions`: the directions of an earlier landscape run, to slice another
  checkpoint along the same plane.

Filter normalization follows Li et al. 2018, "Visualizing the loss landscape of neural nets" (the
paper whose landscapes Pittorino et al. 2021, arXiv:2006.07897, use): a
random direction has no natural scale, and networks with ReLU and BatchNorm are invariant to the scale
of a filter, so each filter ``d_i`` of the direction is rescaled to the norm of the same filter of the
weights, ``d_i <- d_i ||w_i|| / ||d_i||``. A filter is one slice along dimension 0 of a parameter
tensor: a row (output neuron) of a Linear weight, an output channel of a Conv weight. Parameters with
at most one dimension (biases, BatchNorm scales and shifts) are set to zero in the direction by
default (``bias_bn='zero'``), as in Li et al.; with ``bias_bn='include'`` each such vector is
normalized as one unit to the norm of the same vector of ``w``.

All vectors here are float64 torch tensors of shape ``(dim,)`` or ``(k, dim)`` on the CPU.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import FlatscopeError
from .params import ParamLayout

NORMALIZATIONS = ("filter", "layer", "none")
BIAS_BN = ("zero", "include")
KINDS = ("random", "interp", "hessian", "pca", "file")


@dataclass
class Directions:
    """``k`` directions (rows of ``vectors``) in the flat parameter space described by ``layout``.

    A point of the slice at coordinates ``c`` (shape ``(k,)``) is ``origin + c @ vectors``. For an
    interpolation, ``endpoints`` holds the other checkpoints' weights and the same point is computed as
    ``(1 - sum c) origin + c @ endpoints``, which is exactly each checkpoint at its own corner.
    """

    vectors: torch.Tensor
    layout: ParamLayout
    kind: str
    info: dict = field(default_factory=dict)  # normalization, seed, eigenvalues, explained variance ...
    endpoints: torch.Tensor | None = None  # interp only: (k, dim) checkpoint weights

    @property
    def k(self) -> int:
        return int(self.vectors.shape[0])

    def points(self, origin: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Flat weights at each row of ``coords`` (shape ``(m, k)``), computed in float64 into one new
        ``(m, dim)`` tensor (no second one for a sum)."""
        origin = origin.to(torch.float64)
        coords = coords.to(device=origin.device, dtype=torch.float64)
        if self.endpoints is not None:
            out = coords @ self.endpoints.to(device=origin.device, dtype=torch.float64)
            return out.addr_(1.0 - coords.sum(1), origin)  # + (1 - sum c) origin, row by row, in place
        return torch.addmm(origin.unsqueeze(0), coords, self.vectors.to(device=origin.device, dtype=torch.float64))

    def rounded(self, dtype: torch.dtype) -> "Directions":
        """The same directions rounded to ``dtype`` (what is stored is exactly what is used)."""
        self.vectors = self.vectors.to(dtype).to(torch.float64)
        return self


# ---------------------------------------------------------------------------------------- random
def normalize_direction(
    d: torch.Tensor, w: torch.Tensor, layout: ParamLayout, norm: str = "filter", bias_bn: str = "zero"
) -> torch.Tensor:
    """Rescale direction ``d`` against weights ``w`` (both flat); returns a new tensor.

    ``filter``: every slice along dim 0 of every tensor with 2+ dims gets its ``w`` slice's norm;
    ``layer``: every tensor gets its ``w`` tensor's norm; ``none``: unchanged. Tensors with at most one
    dimension are zeroed (``bias_bn='zero'``) or normalized as one unit (``'include'``; with ``none``
    they are left as drawn). A filter whose weights are all zero gets a zero direction.
    """
    if norm not in NORMALIZATIONS:
        raise FlatscopeError(f"unknown normalization {norm!r}; choose from {', '.join(NORMALIZATIONS)}")
    if bias_bn not in BIAS_BN:
        raise FlatscopeError(f"unknown --bias-bn {bias_bn!r}; choose from {', '.join(BIAS_BN)}")
    out = d.clone().to(torch.float64)
    w = w.to(torch.float64)
    for (_name, sl), shape in zip(layout.slices().items(), layout.shapes):
        dv, wv = out[sl], w[sl]
        if len(shape) <= 1:
            if bias_bn == "zero":
                dv.zero_()
            elif norm != "none":
                dv.mul_(_ratio(wv.norm(), dv.norm()))
            continue
        if norm == "filter":
            dm, wm = dv.view(shape[0], -1), wv.view(shape[0], -1)
            dm.mul_(_ratio(wm.norm(dim=1), dm.norm(dim=1)).unsqueeze(1))
        elif norm == "layer":
            dv.mul_(_ratio(wv.norm(), dv.norm()))
    return out


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


def random_directions(
    w: torch.Tensor,
    layout: ParamLayout,
    k: int,
    generator: torch.Generator,
    *,
    norm: str = "filter",
    bias_bn: str = "zero",
    orthogonalize: bool = False,
) -> Directions:
    """``k`` (1 or 2) Gaussian directions, normalized against ``w``.

    With ``orthogonalize`` (2-D only) the second direction's component along the first is removed and
    its length restored: the pair is then exactly orthogonal, and the second direction's per-filter
    norms match ``w``'s only approximately (random directions in high dimension are nearly orthogonal
    already: their cosine is of order ``1/sqrt(dim)``).
    """
    raw = torch.randn(k, layout.size, generator=generator, dtype=torch.float64)
    vecs = torch.stack([normalize_direction(raw[i], w, layout, norm, bias_bn) for i in range(k)])
    cosine = None
    if k == 2:
        n0, n1 = vecs[0].norm(), vecs[1].norm()
        cosine = float(vecs[0] @ vecs[1] / (n0 * n1)) if n0 > 0 and n1 > 0 else 0.0
        if orthogonalize and n0 > 0:
            v = vecs[1] - (vecs[1] @ vecs[0]) / (n0 * n0) * vecs[0]
            vecs[1] = v * (n1 / v.norm()) if v.norm() > 0 else v
    if float(vecs.norm()) == 0.0:
        raise FlatscopeError(
            "the random direction is zero: every normalized parameter of the model is zero "
            "(try --bias-bn include or --norm none)"
        )
    info = {"normalization": norm, "bias_bn": bias_bn, "orthogonalized": bool(orthogonalize and k == 2)}
    if cosine is not None:
        info["cosine_before_orthogonalization"] = cosine
    return Directions(vecs, layout, "random", info)


# ---------------------------------------------------------------------------------- interpolation
def interpolation(origin: torch.Tensor, others: list[torch.Tensor], layout: ParamLayout) -> Directions:
    """The line from ``origin`` to one other checkpoint, or the plane through it and two others.

    Coordinates are in units of the differences: ``x = 1`` is the second checkpoint, ``y = 1`` the third.
    """
    if not 1 <= len(others) <= 2:
        raise FlatscopeError("interpolation takes 2 or 3 checkpoints")
    ends = torch.stack([o.to(torch.float64) for o in others])
    vecs = ends - origin.to(torch.float64)
    for i, v in enumerate(vecs):
        if float(v.norm()) == 0.0:
            raise FlatscopeError(f"checkpoint {i + 2} has the same weights as the first: nothing to interpolate")
    info = {"distance": [float(v.norm()) for v in vecs]}
    if len(others) == 2:
        info["cosine"] = float(vecs[0] @ vecs[1] / (vecs[0].norm() * vecs[1].norm()))
    return Directions(vecs, layout, "interp", info, endpoints=ends)


# ------------------------------------------------------------------------------------------- PCA
def pca_directions(trajectory: list[torch.Tensor], w: torch.Tensor, layout: ParamLayout, k: int = 2) -> Directions:
    """Top ``k`` principal directions of the trajectory ``w_t`` around the end point ``w``.

    The matrix ``M`` has rows ``w_t - w``; its top right singular vectors span the ``k``-dimensional
    subspace through ``w`` closest to the trajectory (not mean-centered: the plane must pass through
    ``w``, the point the landscape is drawn around). ``explained_variance_ratio[i] = s_i^2 / sum_j s_j^2``
    and the path's coordinates are ``M @ V^T`` (the directions are orthonormal). Each direction's sign is
    chosen so that the first checkpoint (the initialization) has a negative coordinate.
    """
    if len(trajectory) < 3:
        raise FlatscopeError(f"PCA directions need at least 3 trajectory checkpoints, got {len(trajectory)}")
    M = torch.stack([t.to(torch.float64) for t in trajectory]) - w.to(torch.float64)
    if float(M.abs().max()) == 0.0:
        raise FlatscopeError("every trajectory checkpoint equals the analyzed weights: no trajectory to analyze")
    _, s, Vh = torch.linalg.svd(M, full_matrices=False)
    V = Vh[:k].clone()
    coords = M @ V.T
    for i in range(k):
        if coords[0, i] > 0:
            V[i], coords[:, i] = -V[i], -coords[:, i]
    energy = s**2
    ratio = (energy / energy.sum()).tolist()
    info = {"explained_variance_ratio": ratio[:k], "explained_variance_ratio_all": ratio, "path": coords.numpy()}
    return Directions(V, layout, "pca", info)


# ----------------------------------------------------------------------------------- from files
def _layout_from_attr(value, where: str) -> ParamLayout:
    try:
        d = json.loads(value) if isinstance(value, (str, bytes)) else value
        return ParamLayout.from_attrs(d)
    except Exception as exc:
        raise FlatscopeError(f"{where}: the stored parameter layout is unreadable ({exc})") from None


def _open(path: str):
    from .results import open_results

    return open_results(path)


def read_hessian_eigenvectors(path: str, layout: ParamLayout, k: int) -> Directions:
    """The top ``k`` eigenvectors stored by ``flatscope hessian --save-eigenvectors`` in ``path``.

    Reads ``/hessian/eigenvectors`` (shape ``(n, dim)``, rows by descending eigenvalue, unit norm),
    ``/hessian/eigenvalues`` and the group attr ``layout``; checks the layout against ``layout``.
    """
    hint = (
        "run `flatscope hessian CHECKPOINT --save-eigenvectors` first (it writes them to the results file), "
        "or point --hessian-from at a file that holds them"
    )
    if not os.path.exists(path):
        raise FlatscopeError(f"no Hessian eigenvectors: {path} does not exist; {hint}")
    with _open(path) as f:
        if "hessian" not in f or "eigenvectors" not in f["hessian"]:
            raise FlatscopeError(f"no Hessian eigenvectors in {path} (/hessian/eigenvectors is missing); {hint}")
        g = f["hessian"]
        if "layout" not in g.attrs:
            raise FlatscopeError(f"{path}: /hessian has eigenvectors but no parameter layout attr")
        stored = _layout_from_attr(g.attrs["layout"], path)
        layout.check_same(stored, what=f"Hessian eigenvectors in {path}")
        vecs = np.asarray(g["eigenvectors"][()], dtype=np.float64)
        vals = np.asarray(g["eigenvalues"][()], dtype=np.float64) if "eigenvalues" in g else None
    if vecs.ndim != 2 or vecs.shape[1] != layout.size:
        raise FlatscopeError(f"{path}: /hessian/eigenvectors has shape {list(vecs.shape)}, expected (k, {layout.size})")
    if vecs.shape[0] < k:
        raise FlatscopeError(
            f"{path} holds {vecs.shape[0]} Hessian eigenvector(s) but a {k}-D slice needs {k}; "
            f"rerun `flatscope hessian --save-eigenvectors` with at least {k}"
        )
    info = {"source": os.path.abspath(path)}
    if vals is not None:
        info["eigenvalues"] = vals[:k].tolist()
    return Directions(torch.as_tensor(vecs[:k].copy()), layout, "hessian", info)


def split_group_ref(ref: str) -> tuple[str, str | None]:
    """``FILE`` or ``FILE:NAME`` (NAME a landscape name such as ``random-2d``)."""
    if os.path.exists(ref) or ":" not in ref:
        return ref, None
    path, name = ref.rsplit(":", 1)
    return path, (name.strip("/").removeprefix("landscape/") or None)


def landscape_names(f) -> list[str]:
    return sorted(k for k in f["landscape"].keys()) if "landscape" in f else []


def read_landscape_directions(ref: str, layout: ParamLayout) -> tuple[Directions, dict]:
    """Directions (and the stored coordinates) of a landscape group in a results file.

    ``ref`` is ``FILE`` (which must hold exactly one landscape) or ``FILE:NAME``. Returns the
    directions and ``{"name", "x", "y"}`` of the stored slice (``y`` is ``None`` for 1-D).
    """
    path, name = split_group_ref(ref)
    if not os.path.exists(path):
        raise FlatscopeError(f"--directions-from: {path} does not exist")
    with _open(path) as f:
        names = landscape_names(f)
        if not names:
            raise FlatscopeError(f"--directions-from: {path} holds no landscape")
        if name is None:
            if len(names) > 1:
                raise FlatscopeError(
                    f"--directions-from: {path} holds several landscapes ({', '.join(names)}); pick one as {path}:NAME"
                )
            name = names[0]
        if name not in names:
            raise FlatscopeError(f"--directions-from: no landscape {name!r} in {path} (it holds {', '.join(names)})")
        g = f["landscape"][name]
        if "directions" not in g or "vectors" not in g["directions"]:
            raise FlatscopeError(f"--directions-from: /landscape/{name} in {path} stores no directions")
        dg = g["directions"]
        stored = _layout_from_attr(dg.attrs.get("layout", "null"), path)
        layout.check_same(stored, what=f"directions in {path}")
        vecs = np.asarray(dg["vectors"][()], dtype=np.float64)
        x = np.asarray(g["x"][()]) if "x" in g else None
        y = np.asarray(g["y"][()]) if "y" in g else None
        source_kind = str(dg.attrs.get("method", "random"))
    info = {"source": f"{os.path.abspath(path)}:{name}", "source_kind": source_kind}
    return Directions(torch.as_tensor(vecs), layout, "file", info), {"name": name, "x": x, "y": y}


# ---------------------------------------------------------------------------------- trajectories
_EPOCH = re.compile(r"epoch-(\d+)")


def trajectory_files(folder: str) -> list[str]:
    """The ``.pt`` files of a trajectory folder, in epoch order (``epoch-XXXX[-final].pt``)."""
    if not os.path.isdir(folder):
        raise FlatscopeError(f"trajectory folder not found: {folder} (train with --save-every K to make one)")
    files = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".pt") and not n.startswith(".")]

    def key(p):
        name = os.path.basename(p)
        m = _EPOCH.search(name)
        return (int(m.group(1)) if m else 1 << 30, name.endswith("-final.pt"), name)

    return sorted(files, key=key)
