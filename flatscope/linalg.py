"""Numerical linear algebra on an abstract symmetric operator given only by its products.

Everything here works on a ``matvec`` callable: it takes a tensor ``V`` of shape ``(b, dim)`` (b
vectors as rows; float64, or float32 with ``dtype=torch.float32`` to halve the memory) and returns
``A V`` row by row, shape ``(b, dim)``, for a symmetric ``A``. It may compute in lower precision (a
float32 Hessian-vector product); outputs are cast to the vectors' dtype, and every small projected
eigenproblem, quadrature rule and true residual is float64. The same
functions therefore run on explicit matrices (tests: :func:`dense_matvec`) and on Hessians
(:mod:`flatscope.analyses.hessian`).

- :func:`lanczos`: extremal eigenpairs (top-k or bottom-k) by block Lanczos with full
  reorthogonalization and thick restart, Ritz residuals ``||A v - lambda v||`` and converged flags.
- :func:`slq`: stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019):
  Ritz nodes and weights per probe and a Gaussian-broadened spectral density on a grid.
- :func:`trace`: Hutchinson's estimator (Rademacher probes) or Hutch++ (Meyer, Musco, Musco &
  Woodruff 2021), with a standard error, and the same estimate restricted to blocks of coordinates.

Every inner product, norm and random draw goes through a :class:`VectorSpace` (``space=``). The
default holds whole vectors in this process. :class:`ShardedSpace` holds one contiguous slice
``[start, stop)`` of every vector per rank (``--shard-params`` under torchrun; or several, one per
parameter under FSDP2): a ``matvec`` then
maps slices to slices, inner products are local sums all-reduced, and random vectors are drawn
block by block of coordinates, so that any number of ranks (one included) draws the same vectors.

A ``matvec`` output holding NaN or Inf stops the computation: the result keeps everything computed
from the products before it and records the number of the product that failed (``nonfinite_at``).

Stable entry point for other analyses (e.g. landscape directions along the top Hessian eigenvectors)::

    from flatscope.linalg import lanczos
    res = lanczos(obj.hvp, obj.dim, k=2, seed=0)   # obj.hvp accepts (b, dim) blocks
    res.eigenvalues      # numpy (2,), descending
    res.eigenvectors     # torch (2, dim) float64, unit norm, rows ordered like eigenvalues
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import FlatscopeError

Matvec = Callable[[torch.Tensor], torch.Tensor]
WHICH = ("largest", "smallest")


def dense_matvec(A) -> Matvec:
    """A ``matvec`` for an explicit symmetric matrix (numpy or torch): ``V -> V @ A``."""
    At = torch.as_tensor(np.asarray(A) if not isinstance(A, torch.Tensor) else A, dtype=torch.float64)

    def mv(V: torch.Tensor) -> torch.Tensor:
        return V.to(At.device, torch.float64) @ At

    return mv


def _apply(matvec: Matvec, V: torch.Tensor) -> torch.Tensor:
    out = matvec(V)
    if out.shape != V.shape:
        raise FlatscopeError(f"matvec returned shape {tuple(out.shape)} for input {tuple(V.shape)}")
    # V's dtype or wider (a float32 basis takes float32 products as they come: no float64 copy of a block)
    return out.to(V.device, torch.promote_types(V.dtype, out.dtype))


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def _rademacher(n: int, dim: int, gen: torch.Generator, device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` Rademacher rows (+-1) from ``gen``; drawing them in several calls gives the same rows."""
    z = torch.randint(0, 2, (n, dim), generator=gen, dtype=torch.int8).to(device=device, dtype=dtype)
    return z.mul_(2).sub_(1)


ACC_CHUNK = 1 << 16  # coordinates per float64 chunk of an accumulated inner product


def _gram64(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A B^T`` accumulated in float64, whatever the rows' dtype. A float32 inner product of length n
    summed in float32 is off by about ``eps32 sqrt(n)`` relative (2e-4 at n = 10^7): enough to spoil
    the orthogonality of a Lanczos basis and bias every Ritz value by as much. Here chunks of
    :data:`ACC_CHUNK` coordinates are widened to float64 (exactly) and multiplied there, so no float64
    copy of a whole block is made."""
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return A @ B.T
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=A.device)
    for s in range(0, A.shape[-1], ACC_CHUNK):
        out += A[:, s : s + ACC_CHUNK].double() @ B[:, s : s + ACC_CHUNK].double().T
    return out


def _dots64(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Row-wise ``sum_i A[..., i] B[..., i]``, accumulated in float64 as :func:`_gram64`."""
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return torch.sum(A * B, dim=-1)
    out = torch.zeros(A.shape[:-1], dtype=torch.float64, device=A.device)
    for s in range(0, A.shape[-1], ACC_CHUNK):
        out += torch.sum(A[..., s : s + ACC_CHUNK].double() * B[..., s : s + ACC_CHUNK].double(), dim=-1)
    return out


def _rowsum64(X: torch.Tensor) -> torch.Tensor:
    """Row sums of ``X`` (..., n) accumulated in float64 by chunks."""
    if X.dtype == torch.float64:
        return X.sum(dim=-1)
    out = torch.zeros(X.shape[:-1], dtype=torch.float64, device=X.device)
    for s in range(0, X.shape[-1], ACC_CHUNK):
        out += X[..., s : s + ACC_CHUNK].double().sum(dim=-1)
    return out


def _bgram64(B: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``B[p] @ W[p]`` for a batch of bases ``B`` (p, m, n) and vectors ``W`` (p, n): (p, m), in float64."""
    if B.dtype == torch.float64 and W.dtype == torch.float64:
        return torch.bmm(B, W.unsqueeze(2)).squeeze(2)
    out = torch.zeros(B.shape[0], B.shape[1], dtype=torch.float64, device=B.device)
    for s in range(0, B.shape[-1], ACC_CHUNK):
        out += torch.bmm(B[..., s : s + ACC_CHUNK].double(), W[:, s : s + ACC_CHUNK].double().unsqueeze(2)).squeeze(2)
    return out


class VectorSpace:
    """Vectors of ``R^dim`` held whole in this process (the default of every function here).

    Inner products and norms are accumulated in float64 for every dtype (:func:`_gram64`) and
    returned in the dtype of the rows (or ``dtype``): the vectors may be float32, their inner products
    are exact to float32's relative precision, independent of ``dim``.

    Rows of a ``(b, local_dim)`` tensor are vectors; :meth:`gram`, :meth:`dots` and :meth:`norms`
    are their inner products and norms; :meth:`randn` and :meth:`rademacher` draw random vectors from
    a generator. :class:`ShardedSpace` overrides them for vectors sliced across ranks.
    """

    sharded = False

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.start, self.stop = 0, self.dim

    @property
    def local_dim(self) -> int:
        return self.stop - self.start

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor of local partial sums over the ranks (identity here)."""
        return t

    def gram(self, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``A B^T``: the inner products of the rows of ``A`` with those of ``B``."""
        return self.reduce(_gram64(A, B)).to(dtype or A.dtype)

    def dots(self, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Row-wise inner products ``sum_i A[r, i] B[r, i]``."""
        return self.reduce(_dots64(A, B)).to(dtype or A.dtype)

    def bgram(self, B: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """``(p, m)``: the inner products of each ``W[p]`` with the rows of its own basis ``B[p]``."""
        return self.reduce(_bgram64(B, W)).to(B.dtype)

    def norms(self, A: torch.Tensor) -> torch.Tensor:
        """Row-wise Euclidean norms."""
        if A.dtype == torch.float64:
            return torch.linalg.norm(A, dim=-1)
        return torch.sqrt(_dots64(A, A)).to(A.dtype)

    def all_finite(self, x: torch.Tensor) -> bool:
        return _finite(x)

    def randn(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` standard Gaussian vectors (float64, CPU), rows."""
        return torch.randn(n, self.dim, generator=gen, dtype=torch.float64)

    def rademacher(self, n: int, gen: torch.Generator, device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return _rademacher(n, self.dim, gen, device, dtype)

    def orthonormal_rows(self, W: torch.Tensor, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, R)``: orthonormal rows ``P`` and upper-triangular ``R`` with ``W = R^T P`` (Householder
        QR in float64; below float64, Gram-Schmidt twice with float64-accumulated inner products, as a
        float32 QR's own length-n sums would lose orthogonality at large n, in ``W`` itself when
        ``overwrite``)."""
        if W.dtype != torch.float64:
            return _cgs2_rows(self, W, overwrite)
        q, r = torch.linalg.qr(W.T)
        return q.T.contiguous(), r

    def orthonormalize_rows_(self, W: torch.Tensor) -> torch.Tensor:
        """``W``'s rows made orthonormal in place and returned: classical Gram-Schmidt, twice per row
        ("twice is enough"; the span of a QR of ``W``), with no copy of ``W``. A row in the span of the
        previous ones (to rounding) becomes zero. Hutch++ turns its sketch into its basis this way,
        holding ``r`` vectors where a QR would hold ``3 r`` (input, factor, transposed copy)."""
        size = self.norms(W)
        for j in range(W.shape[0]):
            for _ in range(2):
                if j:
                    c = self.gram(W[:j], W[j : j + 1])[:, 0]
                    W[j] -= c.to(W.dtype) @ W[:j]
            nrm = self.norms(W[j : j + 1])[0]
            if float(nrm) > 1e-12 * float(size[j]):
                W[j] /= nrm
            else:
                W[j] = 0.0
        return W

    def local_block(self, sl: slice) -> slice:
        """The part of the global coordinate range ``sl`` held here, in local coordinates."""
        lo, hi = max(sl.start, self.start), min(sl.stop, self.stop)
        return slice(lo - self.start, max(hi, lo) - self.start)

    def locate(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(held, local)`` for global coordinates ``g``: which are held here, and their local index."""
        return (g >= self.start) & (g < self.stop), g - self.start


RANDOM_BLOCK = 1 << 16  # coordinates per random block of a sharded draw


class ShardedSpace(VectorSpace):
    """Vectors of ``R^dim`` of which this rank holds the coordinates ``[start, stop)``, or the union of
    several such ``ranges`` (sorted, disjoint), stored one after the other in that order (FSDP2: each
    parameter's dim-0 chunk, :mod:`flatscope.fsdp`). Because the local order follows the global one,
    the held part of any global coordinate range is one contiguous local range (:meth:`local_block`).

    Inner products and norms are local sums passed to ``reduce`` (an all-reduce sum over the ranks:
    :func:`flatscope.distributed.all_reduce_sum`). A random draw first takes one 62-bit key from the
    generator (the same on every rank), then fills coordinates ``[j B, (j + 1) B)`` (``B`` =
    :data:`RANDOM_BLOCK`) from a generator seeded by ``(key, j)``, of which each rank keeps its
    coordinates: the vectors depend on the seed only, not on the number of ranks or on how the
    coordinates are dealt to them, and no rank draws more than its coordinates plus two partial blocks
    per range. ``start``/``stop`` are the span of the held coordinates. Orthonormalization is Gram-Schmidt row by row, twice
    (each row one all-reduce per pass), which gives the same span as a Householder QR.
    With ``reduce=None`` (one process) it is the reference a sharded run is compared with.
    """

    sharded = True

    def __init__(
        self,
        dim: int,
        start: int = 0,
        stop: int | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        ranges: Sequence[tuple[int, int]] | None = None,
    ):
        super().__init__(dim)
        stop = self.dim if stop is None else stop
        spans = [(int(start), int(stop))] if ranges is None else [(int(a), int(b)) for a, b in ranges if b > a]
        last = 0
        for a, b in spans:
            if not last <= a <= b <= dim:
                raise FlatscopeError(f"bad shard [{a}, {b}) of a {dim}-vector (ranges must be sorted and disjoint)")
            last = b
        self.ranges = spans
        # the span of the held coordinates (one range: exactly them)
        self.start, self.stop = (spans[0][0], spans[-1][1]) if spans else (0, 0)
        self._local = sum(b - a for a, b in spans)
        self._reduce = reduce

    @property
    def local_dim(self) -> int:
        return self._local

    def _held_below(self, x: int) -> int:
        """How many held coordinates are ``< x``: the local index of global coordinate ``x`` if held."""
        return sum(min(max(x - a, 0), b - a) for a, b in self.ranges)

    def local_block(self, sl: slice) -> slice:
        return slice(self._held_below(sl.start), self._held_below(sl.stop))

    def locate(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        held = torch.zeros(g.shape, dtype=torch.bool, device=g.device)
        local = torch.zeros_like(g)
        offset = 0
        for a, b in self.ranges:
            here = (g >= a) & (g < b)
            held |= here
            local = torch.where(here, g - a + offset, local)
            offset += b - a
        return held, local

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t if self._reduce is None else self._reduce(t)

    def norms(self, A: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.clamp_min(self.dots(A, A), 0.0))

    def all_finite(self, x: torch.Tensor) -> bool:
        bad = torch.logical_not(torch.isfinite(x).all()).to(torch.float64).reshape(1)
        return float(self.reduce(bad)[0]) == 0.0

    def _blocks(self, n: int, gen: torch.Generator, draw: Callable[[int, int, torch.Generator], torch.Tensor]):
        key = int(torch.randint(0, 2**62, (1,), generator=gen))
        out = torch.empty(n, self.local_dim, dtype=torch.float64)
        offset, drawn, block = 0, -1, out[:, :0]
        for start, stop in self.ranges:  # sorted: block indices never decrease, so one block is kept
            for j in range(start // RANDOM_BLOCK, -(-stop // RANDOM_BLOCK)):
                lo, hi = j * RANDOM_BLOCK, min((j + 1) * RANDOM_BLOCK, self.dim)
                if j != drawn:
                    seed = int(np.random.SeedSequence([key, j]).generate_state(1, np.uint64)[0] >> np.uint64(1))
                    block, drawn = draw(n, hi - lo, torch.Generator().manual_seed(seed)), j
                a, b = max(lo, start), min(hi, stop)
                out[:, offset + a - start : offset + b - start] = block[:, a - lo : b - lo]
            offset += stop - start
        return out

    def randn(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self._blocks(n, gen, lambda r, c, g: torch.randn(r, c, generator=g, dtype=torch.float64))

    def rademacher(self, n: int, gen: torch.Generator, device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        z = self._blocks(n, gen, lambda r, c, g: torch.randint(0, 2, (r, c), generator=g, dtype=torch.int8).double())
        return (z * 2 - 1).to(device, dtype)

    def orthonormal_rows(self, W: torch.Tensor, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return _cgs2_rows(self, W, overwrite)


def _cgs2_rows(space: "VectorSpace", W: torch.Tensor, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, R)`` with ``W = R^T P``: Gram-Schmidt row by row, twice (each row one reduction per pass in
    a sharded space), which gives the span of a Householder QR. A row in the span of the previous
    ones (to rounding) becomes zero. Every update is in place: in a copy of ``W``, or with
    ``overwrite`` in ``W`` itself (then ``P`` is ``W``)."""
    b = W.shape[0]
    size = space.norms(W)
    P = W if overwrite else W.clone()
    R = torch.zeros(b, b, dtype=torch.float64, device=W.device)
    for j in range(b):
        for _ in range(2):
            if j:
                c = space.gram(P[:j], P[j : j + 1], dtype=torch.float64)[:, 0]
                P[j].addmv_(P[:j].T, c.to(P.dtype), alpha=-1)
                R[:j, j] += c
        nrm = space.norms(P[j : j + 1])[0]
        R[j, j] = nrm
        if float(nrm) > 1e-12 * float(size[j]):
            P[j].div_(nrm)
        else:
            P[j].zero_()
    return P, R.to(W.dtype)


def _orthonormalize(
    W: torch.Tensor, Q: torch.Tensor, gen: torch.Generator, breakdown: float, space: VectorSpace | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``W`` made orthonormal and orthogonal to the rows of ``Q`` (assumed orthonormal).

    Returns ``(P, R)`` with ``W - proj_Q(W) = R^T P`` (``R`` upper triangular, b x b). Classical
    Gram-Schmidt run twice ("twice is enough"), then a Householder QR of the block. A direction whose
    norm collapses below ``breakdown`` (the Krylov space has become invariant) is replaced by a
    random vector orthogonal to everything, with its coupling left at the tiny computed value.
    """
    space = space if space is not None else VectorSpace(W.shape[1])
    owned = False  # W is the caller's until the first projection makes a new tensor
    for _ in range(2):
        if Q.shape[0]:
            G = space.gram(W, Q)
            W = W.addmm_(G, Q, alpha=-1) if owned else torch.addmm(W, G, Q, alpha=-1)
            owned = True
    P, r = space.orthonormal_rows(W, overwrite=owned)  # W = r^T P
    bad = torch.abs(torch.diagonal(r)) <= breakdown
    if bool(bad.any()):
        for j in torch.nonzero(bad).flatten().tolist():
            for _attempt in range(3):
                x = space.randn(1, gen)[0].to(W.device, W.dtype)
                for _ in range(2):
                    if Q.shape[0]:
                        x = x - space.gram(x[None], Q)[0] @ Q
                    others = torch.cat([P[:j], P[j + 1 :]])
                    x = x - space.gram(x[None], others)[0] @ others
                nx = space.norms(x[None])[0]
                if nx > 1e-8:
                    P[j] = x / nx
                    break
            else:  # the whole space is spanned: nothing orthogonal is left
                P[j] = 0.0
    return P, r


@dataclass
class EigResult:
    """Ritz pairs from :func:`lanczos`.

    ``eigenvalues`` are ordered from the requested end inward (descending for ``largest``,
    ascending for ``smallest``); ``eigenvectors`` rows (unit norm, float64) follow the same order
    (in a :class:`ShardedSpace`: this rank's slices of them).
    ``residuals[i] = ||A v_i - lambda_i v_i||`` computed with one extra block product (or, if that
    product failed or ``true_residuals=False``, the Lanczos estimate); ``converged[i]`` is
    ``residuals[i] <= tol * scale`` where ``scale = max |Ritz value|`` estimates ``||A||_2``.
    ``status`` is ``converged``, ``max_iter``, ``nonfinite`` or ``exhausted`` (the basis spans the
    whole space, so the Ritz pairs are exact).
    """

    eigenvalues: np.ndarray
    eigenvectors: torch.Tensor
    residuals: np.ndarray
    converged: np.ndarray
    n_matvec: int
    which: str
    tol: float
    scale: float
    status: str
    n_restarts: int = 0
    nonfinite_at: int | None = None
    estimated_residuals: np.ndarray = field(default_factory=lambda: np.zeros(0))
    history: list = field(default_factory=list)  # (n_matvec, k-th wanted Ritz value, max rel. residual)

    @property
    def all_converged(self) -> bool:
        return bool(len(self.converged)) and bool(np.all(self.converged))


def lanczos(
    matvec: Matvec,
    dim: int,
    k: int = 6,
    which: str = "largest",
    *,
    tol: float = 1e-5,
    max_iter: int | None = None,
    block_size: int = 1,
    max_basis: int | None = None,
    seed: int = 0,
    v0: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    true_residuals: bool = True,
    callback: Callable[[int], None] | None = None,
    space: VectorSpace | None = None,
) -> EigResult:
    """The ``k`` largest (or smallest, most negative) eigenpairs of a symmetric operator.

    Block Lanczos with full reorthogonalization (every new block is orthogonalized twice against the
    whole basis, so no spurious copies appear) and thick restart (Wu & Simon 2000): when the basis
    reaches ``max_basis`` vectors it is compressed to the best Ritz vectors and the Krylov process
    continues from the current residual block. The projected matrix is the Rayleigh quotient
    ``Q^T A Q`` assembled from the computed coefficients. The residual of a Ritz pair is estimated
    at every step from the coupling to the next block; the run stops when the ``k`` wanted pairs
    all satisfy ``estimate <= tol * scale`` (``scale`` = largest |Ritz value| = an estimate of
    ``||A||_2``), and their true residuals are then computed with one block product.

    Arguments:
        matvec: ``V (b, dim) float64 -> A V (b, dim)``; may compute in float32.
        dim: the operator's dimension.
        k: how many eigenpairs, ``1 <= k <= dim``.
        which: ``"largest"`` (algebraically largest) or ``"smallest"`` (algebraically smallest).
        tol: relative residual tolerance (see above). Eigenvalue errors are bounded by the residual,
            and for an isolated eigenvalue by ``residual**2 / gap``.
        max_iter: the most products ``A v`` to spend, counting each vector of a block
            (default ``max(300, 30 k)``); a basis that reaches ``dim`` vectors ends the run early
            with exact Ritz pairs.
        block_size: vectors per Lanczos block; a single-vector Krylov space holds one copy of an
            exactly repeated eigenvalue, so use ``block_size >= multiplicity`` to resolve exact
            degeneracy. ``1`` spends the fewest products on distinct eigenvalues.
        max_basis: basis size that triggers a thick restart; the basis is one buffer of
            ``(max_basis + block_size) * dim`` entries of ``dtype``, never copied (a restart combines
            its rows in place), and the result adds ``k`` rows: memory ``(max_basis + block_size + k +
            c) * dim`` entries, ``c`` a few blocks of work vectors.
            Default: no restart while the basis fits in 512 MiB (``2**26 / dim`` vectors), and at
            least ``3 k + 30`` vectors. Restarting only ever costs products (measured in
            benchmarks/RESULTS.md), so it is a memory bound, not a speed-up.
        seed, v0: the start block is ``v0`` (rows) or Gaussian from ``torch.Generator(seed)``.
        dtype: precision of the basis and of the returned eigenvectors (float64; float32 halves the
            memory; the small eigenproblem and the true residuals stay float64).
        device: where the basis lives (default: ``v0``'s device or CPU).
        true_residuals: compute ``||A v - lambda v||`` explicitly at the end (``k`` more products).
        callback: called with the number of products after each block (progress bars).
        space: where the vectors live (default: whole in this process); with a
            :class:`ShardedSpace` ``matvec``, ``v0`` and the eigenvectors are this rank's slices.

    Returns:
        :class:`EigResult`. A run that stops before convergence (``max_iter`` or a non-finite
        product) still returns its best Ritz pairs with ``converged`` False where they fall short.
    """
    if which not in WHICH:
        raise FlatscopeError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    if not 1 <= k <= dim:
        raise FlatscopeError(f"cannot compute {k} eigenvalues of an operator of dimension {dim}")
    if block_size < 1:
        raise FlatscopeError(f"block_size must be at least 1, got {block_size}")
    if not tol > 0:
        raise FlatscopeError(f"tol must be positive, got {tol}")
    b = min(int(block_size), dim)
    if max_iter is None:
        max_iter = max(300, 30 * k)
    max_iter = int(max_iter)
    if max_iter < k:
        raise FlatscopeError(f"max_iter={max_iter} is below k={k}: Lanczos needs at least k products")
    if max_basis is None:
        max_basis = max(3 * k + 30, min(max_iter, 2**26 // max(dim, 1)))
    m_max = min(dim, max(int(max_basis), k + 2 * b))
    device = torch.device(device) if device is not None else (v0.device if v0 is not None else torch.device("cpu"))
    fdt = dtype
    gen = torch.Generator().manual_seed(int(seed))
    largest = which == "largest"
    sp = space if space is not None else VectorSpace(dim)
    if sp.dim != dim:
        raise FlatscopeError(f"the vector space has dimension {sp.dim}, the operator {dim}")
    ld = sp.local_dim

    def randn(n: int) -> torch.Tensor:
        return sp.randn(n, gen).to(device, fdt)

    if v0 is not None:
        P0 = v0.reshape(-1, ld).to(device, fdt)[:b]
        if P0.shape[0] < b:
            P0 = torch.cat([P0, randn(b - P0.shape[0])])
    else:
        P0 = randn(b)
    # basis rows whose products are known (via T): a view of one buffer, so that the basis is never copied
    Qbuf = torch.empty(min(dim, m_max + b), ld, dtype=fdt, device=device)
    Q = Qbuf[:0]

    def stage(P: torch.Tensor, Q: torch.Tensor, Qbuf: torch.Tensor) -> torch.Tensor:
        """The pending block written into the buffer's rows after ``Q`` (where it goes once multiplied)
        and returned as a view of them, so that it is not held twice during the products."""
        m, bb = Q.shape[0], P.shape[0]
        if m + bb > Qbuf.shape[0]:
            return P
        rows = Qbuf[m : m + bb]
        if P.data_ptr() != rows.data_ptr():
            rows.copy_(P.clone() if P.untyped_storage().data_ptr() == Qbuf.untyped_storage().data_ptr() else P)
        return rows

    P = stage(_orthonormalize(P0, Q, gen, 0.0, sp)[0], Q, Qbuf)  # pending block: next to be multiplied
    del P0
    T = np.zeros((0, 0))  # Q A Q^T
    E = np.zeros((P.shape[0], 0))  # P A Q^T: couples Ritz vectors to P
    n_mv, n_restarts, status, nonfinite_at = 0, 0, "max_iter", None
    history: list = []

    def wanted(th: np.ndarray) -> np.ndarray:
        return np.argsort(-th if largest else th, kind="stable")[:k]

    while True:
        if Q.shape[0] >= dim or P.shape[0] == 0:
            status = "exhausted"
            break
        bb = P.shape[0]
        if n_mv + bb > max_iter:
            status = "max_iter"
            break
        AP = _apply(matvec, P).to(fdt)
        n_mv += bb
        if not sp.all_finite(AP):
            nonfinite_at = n_mv - bb + 1
            status = "nonfinite"
            break
        m = Q.shape[0]
        if m + bb > Qbuf.shape[0]:  # cannot happen with the restart below; kept as a safe fallback
            Qbuf = torch.cat([Qbuf[:m], torch.empty(bb, ld, dtype=fdt, device=device)])
        stage(P, Q, Qbuf)  # already there unless the buffer had no room for it
        Q = Qbuf[: m + bb]
        C = sp.gram(Q, AP, dtype=torch.float64).cpu().numpy()  # new columns of Q A Q^T
        Tn = np.zeros((m + bb, m + bb))
        Tn[:m, :m] = T
        Tn[:, m:] = C
        Tn[m:, :m] = C[:m].T
        Tn[m:, m:] = 0.5 * (C[m:] + C[m:].T)
        T = Tn
        theta, S = np.linalg.eigh(T)
        scale = max(float(np.max(np.abs(theta))), np.finfo(float).tiny)
        if Q.shape[0] < dim:
            held = [AP]  # handed over: the projection's first result replaces it, freed then
            del AP
            P, R = _orthonormalize(held.pop(), Q, gen, 1e-12 * scale, sp)
            keep = (sp.norms(P) > 0.5).cpu().numpy()
            P = P if keep.all() else P[torch.as_tensor(keep, device=device)]
            E = np.zeros((P.shape[0], Q.shape[0]))
            E[:, m:] = R.to(torch.float64).cpu().numpy()[keep]
        else:
            P = P[:0]
            E = np.zeros((0, Q.shape[0]))
        if callback is not None:
            callback(n_mv)
        idx = wanted(theta)
        est = np.linalg.norm(E @ S[:, idx], axis=0)
        history.append((n_mv, float(theta[idx[-1]]), float(np.max(est) / scale)))
        if len(idx) >= k and np.all(est <= tol * scale):
            status = "converged"
            break
        if Q.shape[0] + P.shape[0] > m_max and Q.shape[0] < dim:
            # thick restart: keep the best Ritz vectors toward the wanted end, continue from P
            keep_n = min(Q.shape[0] - 1, max(k + (m_max - k) // 2, k + b))
            order = np.argsort(-theta if largest else theta, kind="stable")[:keep_n]
            Q = _combine_rows(Qbuf, Q.shape[0], torch.as_tensor(S[:, order].T, dtype=fdt, device=device))
            T = np.diag(theta[order])
            E = E @ S[:, order]
            n_restarts += 1
        P = stage(P, Q, Qbuf)

    empty = EigResult(
        np.zeros(0),
        torch.zeros(0, ld, dtype=fdt, device=device),
        np.zeros(0),
        np.zeros(0, dtype=bool),
        n_mv,
        which,
        tol,
        0.0,
        status,
        n_restarts,
        nonfinite_at,
        np.zeros(0),
        history,
    )
    if Q.shape[0] == 0:
        return empty
    theta, S = np.linalg.eigh(T)
    scale = max(float(np.max(np.abs(theta))), np.finfo(float).tiny)
    idx = wanted(theta)
    vals = theta[idx]
    del P  # the pending block is not needed for the Ritz vectors
    vecs = torch.as_tensor(S[:, idx].T, dtype=fdt, device=device) @ Q
    del Q, Qbuf  # the basis is freed before the residual products
    vecs.div_(sp.norms(vecs)[:, None])  # in place: no second set of k vectors
    est = np.zeros(len(idx)) if status == "exhausted" else np.linalg.norm(E @ S[:, idx], axis=0)
    res = est
    if true_residuals and status != "nonfinite":
        # ||A v - lambda v|| block by block: one block of products (and its float64 copy) at a time
        res_t, ok = np.zeros(len(vals)), True
        for s in range(0, vecs.shape[0], b):
            Vs = vecs[s : s + b]
            AV = _apply(matvec, Vs)
            n_mv += Vs.shape[0]
            if not sp.all_finite(AV):
                nonfinite_at, ok = n_mv - Vs.shape[0] + 1, False
                break
            lam = torch.as_tensor(vals[s : s + b], device=AV.device, dtype=torch.float64)[:, None]
            res_t[s : s + b] = sp.norms(AV.to(torch.float64) - lam * Vs.to(AV.device, torch.float64)).cpu().numpy()
            del AV
        if ok:
            res = res_t
        else:
            status = "nonfinite"
    converged = (res <= tol * scale) & (status != "nonfinite")
    return EigResult(
        np.asarray(vals, dtype=np.float64),
        vecs,
        np.asarray(res, dtype=np.float64),
        np.asarray(converged, dtype=bool),
        n_mv,
        which,
        tol,
        scale,
        status,
        n_restarts,
        nonfinite_at,
        np.asarray(est, dtype=np.float64),
        history,
    )


def _combine_rows(buf: torch.Tensor, m: int, St: torch.Tensor) -> torch.Tensor:
    """``buf[:r] = St @ buf[:m]`` in place (``St``: r x m, r <= m), column block by column block, so that
    the temporary holds about a quarter of a row instead of a second basis. Returns the view ``buf[:r]``."""
    r, dim = St.shape[0], buf.shape[1]
    cols = max(4096, dim // (4 * max(r, 1)))
    for c0 in range(0, dim, cols):
        buf[:r, c0 : c0 + cols] = St @ buf[:m, c0 : c0 + cols]
    return buf[:r]


# ---------------------------------------------------------------------------------------------
# Stochastic Lanczos quadrature


@dataclass
class SLQResult:
    """Gauss quadrature rules of the spectral measure, one per probe, from :func:`slq`.

    For a unit probe ``v`` the measure ``mu_v = sum_i (u_i . v)^2 delta(lambda_i)`` has mean
    ``E[mu_v] = (1/n) sum_i delta(lambda_i)`` (the spectral density) for Rademacher ``v/sqrt(n)``.
    ``m`` Lanczos steps from ``v`` give the ``m``-point Gauss rule of ``mu_v``: nodes = eigenvalues of
    the tridiagonal ``T_m`` (Ritz values), weights = squared first components of its eigenvectors.
    ``nodes``/``weights`` have shape ``(n_probes, n_steps)``; a probe whose Krylov space became
    invariant early leaves NaN nodes with zero weight in its unused slots. Each row's weights sum to 1.
    ``alphas`` ``(n_probes, n_steps)`` and ``betas`` ``(n_probes, n_steps - 1)``: the tridiagonals
    themselves (NaN-padded; None for rules built from nodes and weights alone).
    """

    nodes: np.ndarray
    weights: np.ndarray
    dim: int
    n_matvec: int
    n_steps: int
    nonfinite_at: int | None = None
    alphas: np.ndarray | None = None
    betas: np.ndarray | None = None

    @property
    def n_probes(self) -> int:
        return int(self.nodes.shape[0])

    def probe_integrals(self, f: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``sum_i w_i f(node_i)`` per probe: quadrature estimates of ``(1/n) tr f(A)``."""
        x = np.where(self.weights > 0, self.nodes, 0.0)
        return np.sum(self.weights * f(x), axis=1)

    def integral(self, f: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
        """Mean over probes of :meth:`probe_integrals` and its standard error (NaN for one probe)."""
        v = self.probe_integrals(f)
        se = float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
        return float(np.mean(v)), se

    def count_bracket(self, z: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Per probe, bounds ``(lo, hi)`` on ``mu_v((-inf, z))``, the share of the spectrum below ``z``.

        The Gauss rule's count ``sum_{node < z} w`` is biased (a node near ``z`` carries the mass of a
        whole neighbourhood to one side). The Gauss-Radau rule with a node prescribed at ``z`` bounds
        it exactly (the Chebyshev-Markov-Stieltjes inequalities; Markov-Krein: among all measures
        with the moments the ``k``-step Lanczos tridiagonal fixes, none puts more mass at ``z`` than
        the Radau weight there; Golub & Meurant 2010, "Matrices, Moments and Quadrature with
        Applications", ch. 6-7): ``lo = sum_{x_j < z} w_j <= mu_v(z-) <= mu_v(z+) <= lo + w_z``. The
        Radau rule uses ``T_{k-1}`` and ``beta_{k-1}``, its last diagonal entry moved to
        ``z + beta_{k-1}^2 [(T_{k-1} - z I)^{-1}]_{k-1,k-1}`` (Golub 1973). A probe whose Krylov space
        was invariant has an exact rule (then ``lo = hi`` up to nodes at ``z``). Without the stored
        tridiagonals the Gauss rule's own bracket ``[sum_{x<z} w - w_left, sum_{x<z} w + w_right]``
        (the weights of the nodes on either side of ``z``) is used.
        """
        from scipy.linalg import eigh_tridiagonal

        P = self.n_probes
        lo, hi = np.zeros(P), np.zeros(P)
        for r in range(P):
            keep = self.weights[r] > 0
            x, w = self.nodes[r, keep], self.weights[r, keep]
            a = None if self.alphas is None else self.alphas[r][np.isfinite(self.alphas[r])]
            k = 0 if a is None else len(a)
            exact = a is not None and (k < self.n_steps or k >= self.dim)  # invariant Krylov space: exact rule
            if a is None or k < 2 or exact:
                below = x < z
                if exact or a is not None:
                    lo[r], hi[r] = w[below].sum(), w[x <= z].sum()
                else:
                    left = w[below][np.argmax(x[below])] if below.any() else 0.0
                    right = w[~below][np.argmin(x[~below])] if (~below).any() else 0.0
                    lo[r], hi[r] = w[below].sum() - left, w[below].sum() + right
                continue
            b = self.betas[r][: k - 1]  # type: ignore[index]
            T = np.diag(a[: k - 1] - z) + np.diag(b[: k - 2], 1) + np.diag(b[: k - 2], -1)
            e = np.zeros(k - 1)
            e[-1] = 1.0
            try:
                delta = np.linalg.solve(T, e)[-1]
            except np.linalg.LinAlgError:
                delta = np.inf
            if not np.isfinite(delta):  # z is a Ritz value of T_{k-1}: the Gauss rule of T_{k-1} has it
                lo[r], hi[r] = w[x < z].sum(), w[x <= z].sum()
                continue
            ar = a.copy()
            ar[-1] = z + b[-1] ** 2 * delta
            th, U = eigh_tridiagonal(ar, b)
            wr = U[0] ** 2
            j = int(np.argmin(np.abs(th - z)))
            below = th < z
            below[j] = False
            lo[r] = wr[below].sum()
            hi[r] = lo[r] + wr[j]
        return lo, hi

    def fraction_below(self, z: float = 0.0) -> dict:
        """The fraction of eigenvalues below ``z`` with its errors, from :meth:`count_bracket`.

        ``estimate``: the mean over probes of the bracket midpoints; ``stderr``: their standard error
        over probes (NaN for one probe); ``bias_bound``: the mean half-width of the brackets (the
        largest quadrature bias a midpoint can have); ``err`` = ``stderr + bias_bound``; ``lo``,
        ``hi``: the mean bounds; ``gauss``: the plain Gauss-rule count (biased; for comparison).
        """
        lo, hi = self.count_bracket(z)
        mid = 0.5 * (lo + hi)
        se = float(np.std(mid, ddof=1) / math.sqrt(len(mid))) if len(mid) > 1 else float("nan")
        bound = float(np.mean(0.5 * (hi - lo)))
        gauss = float(self.probe_integrals(lambda x: (x < z).astype(float)).mean())
        return {
            "estimate": float(np.mean(mid)),
            "stderr": se,
            "bias_bound": bound,
            "err": (se if np.isfinite(se) else 0.0) + bound,
            "lo": float(np.mean(lo)),
            "hi": float(np.mean(hi)),
            "gauss": gauss,
        }

    def default_sigma(self, sigma_rel: float) -> float:
        """Broadening width: ``sigma_rel`` times the spread of the nodes (1 if all nodes coincide)."""
        x = self.nodes[self.weights > 0]
        width = float(np.max(x) - np.min(x)) if x.size else 0.0
        if width <= 0:
            width = max(float(np.max(np.abs(x))) if x.size else 0.0, 1.0)
        return sigma_rel * width

    def density(
        self, sigma: float, n_grid: int = 1024, grid: np.ndarray | None = None, pad: float = 6.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian-broadened density ``phi(t) = mean_probes sum_i w_i N(t; node_i, sigma^2)``.

        The default grid spans ``[min node - pad sigma, max node + pad sigma]`` so that the density
        integrates to 1 up to ``erfc(pad / sqrt 2)`` (about 2e-9) and its mean is the quadrature mean.
        """
        x = self.nodes[self.weights > 0]
        if grid is None:
            lo, hi = float(np.min(x)) - pad * sigma, float(np.max(x)) + pad * sigma
            grid = np.linspace(lo, hi, int(n_grid))
        grid = np.asarray(grid, dtype=np.float64)
        vals = np.zeros_like(grid)
        norm = 1.0 / (sigma * math.sqrt(2 * math.pi) * self.n_probes)
        for nodes, weights in zip(self.nodes, self.weights):
            keep = weights > 0
            d = (grid[:, None] - nodes[None, keep]) / sigma
            vals += np.exp(-0.5 * d * d) @ weights[keep]
        return grid, vals * norm


def _lanczos_tridiag(
    matvec: Matvec,
    V0: torch.Tensor,
    n_steps: int,
    breakdown_rel: float = 1e-10,
    callback=None,
    space: VectorSpace | None = None,
    reorth: bool = True,
) -> tuple[list, list, int, int | None]:
    """Plain Lanczos with full reorthogonalization, run in lockstep from several unit start vectors.

    Returns per-probe lists of ``alpha`` and ``beta`` (``len(beta) = len(alpha) - 1``), the number of
    products and the index of a non-finite product (or None). All active probes are multiplied in one
    block call per step. ``reorth=False``: the three-term recurrence alone, keeping two basis vectors
    per probe (a ring) instead of ``n_steps``.
    """
    p, ld = V0.shape
    sp = space if space is not None else VectorSpace(ld)
    dev, fdt = V0.device, V0.dtype
    n_steps = min(n_steps, sp.dim)
    ring = n_steps if reorth else min(2, n_steps)
    basis = torch.zeros(p, ring, ld, dtype=fdt, device=dev)
    basis[:, 0] = V0
    alphas: list[list[float]] = [[] for _ in range(p)]
    betas: list[list[float]] = [[] for _ in range(p)]
    active = list(range(p))
    n_mv, bad = 0, None
    for j in range(n_steps):
        if not active:
            break
        everyone = len(active) == p
        idx = torch.as_tensor(active, device=dev)
        Qj = basis[:, j % ring] if everyone else basis[idx, j % ring]
        AQ = _apply(matvec, Qj).to(fdt)
        n_mv += len(active)
        if not sp.all_finite(AQ):
            bad = n_mv - len(active) + 1
            break
        a = sp.dots(AQ, Qj)
        W = AQ - a[:, None] * Qj  # three-term recurrence ...
        if j > 0:
            bprev = torch.as_tensor([betas[pi][j - 1] for pi in active], dtype=fdt, device=dev)
            W = W - bprev[:, None] * (basis[:, (j - 1) % ring] if everyone else basis[idx, (j - 1) % ring])
        # ... then one full reorthogonalization pass against each probe's own basis (views: never a copy of it)
        if not reorth:
            pass
        elif everyone:
            B = basis[:, : j + 1]  # (p, j+1, local dim)
            W = W - torch.bmm(sp.bgram(B, W).unsqueeze(1), B).squeeze(1)
        else:
            for r, pi in enumerate(active):
                Bp = basis[pi, : j + 1]
                W[r] -= sp.gram(W[r : r + 1], Bp)[0] @ Bp
        bnorm = sp.norms(W)
        a_np, b_np = a.to(torch.float64).cpu().numpy(), bnorm.to(torch.float64).cpu().numpy()
        still = []
        for r, pi in enumerate(active):
            alphas[pi].append(float(a_np[r]))
            scale = max(abs(x) for x in alphas[pi]) + (max(betas[pi]) if betas[pi] else 0.0)
            if j + 1 < n_steps and b_np[r] > breakdown_rel * max(scale, np.finfo(float).tiny):
                betas[pi].append(float(b_np[r]))
                basis[pi, (j + 1) % ring] = W[r] / bnorm[r]
                still.append(pi)
        active = still
        if callback is not None:
            callback(n_mv)
    return alphas, betas, n_mv, bad


def slq(
    matvec: Matvec,
    dim: int,
    n_probes: int = 8,
    n_steps: int = 80,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    probe_batch: int | None = None,
    callback: Callable[[int], None] | None = None,
    space: VectorSpace | None = None,
    reorth: bool = True,
) -> SLQResult:
    """Stochastic Lanczos quadrature of the spectral density (Ghorbani, Krishnan & Xiao 2019).

    Each of ``n_probes`` Rademacher probes ``v / sqrt(dim)`` runs ``n_steps`` Lanczos steps with full
    reorthogonalization (``n_probes * n_steps * dim`` numbers of ``dtype``; ``probe_batch``
    processes probes in groups to bound it); the probes advance in lockstep so each step is one
    block product. ``reorth=False`` runs the three-term recurrence alone and holds 2 vectors per
    probe instead of ``n_steps``: in floating point the basis then loses orthogonality as Ritz values
    converge, and converged outliers reappear as "ghost" copies that share the weight of the one
    they copy, but the Gauss rule's moments (and so smooth densities and ``(1/n) tr f(A)``) stay
    accurate (Greenbaum 1989, "Behavior of slightly perturbed Lanczos and conjugate-gradient
    recurrences"; Knizhnerman 1996, "The simple Lanczos procedure: estimates of the error of the Gauss
    quadrature formula"); ``tests/test_linalg.py`` checks the moments against the exact ones. Returns the Ritz nodes and Gauss weights per probe (:class:`SLQResult`); the
    density, its moments and ``(1/n) tr f(A)`` follow from them. ``n_probes * n_steps`` products
    (fewer if a Krylov space becomes invariant). ``space``: as for :func:`lanczos`.
    """
    if n_probes < 1:
        raise FlatscopeError(f"the number of probes must be at least 1, got {n_probes}")
    if n_steps < 1:
        raise FlatscopeError(f"the number of Lanczos steps must be at least 1, got {n_steps}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(int(seed))
    sp = space if space is not None else VectorSpace(dim)
    m = min(int(n_steps), dim)
    nodes = np.full((n_probes, m), np.nan)
    weights = np.zeros((n_probes, m))
    alph = np.full((n_probes, m), np.nan)
    bet = np.full((n_probes, max(m - 1, 0)), np.nan)
    batch = int(probe_batch) if probe_batch else n_probes
    n_mv, bad = 0, None
    done = 0
    for start in range(0, n_probes, batch):
        cnt = min(batch, n_probes - start)
        V0 = sp.rademacher(cnt, gen, device, dtype).div_(math.sqrt(dim))
        cb = (lambda n, base=n_mv: callback(base + n)) if callback is not None else None
        alphas, betas, used, bad_here = _lanczos_tridiag(matvec, V0, m, callback=cb, space=sp, reorth=reorth)
        if bad_here is not None:
            bad = n_mv + bad_here
        n_mv += used
        for r in range(cnt):
            a, bt = alphas[r], betas[r][: max(len(alphas[r]) - 1, 0)]
            if not a:
                continue
            from scipy.linalg import eigh_tridiagonal

            th, U = eigh_tridiagonal(np.asarray(a), np.asarray(bt)) if len(a) > 1 else (np.asarray(a), np.ones((1, 1)))
            nodes[start + r, : len(th)] = th
            weights[start + r, : len(th)] = U[0] ** 2
            alph[start + r, : len(a)] = a
            bet[start + r, : len(bt)] = bt
            done += 1
        if bad is not None:
            break
    keep = weights.sum(axis=1) > 0
    return SLQResult(nodes[keep], weights[keep], dim, n_mv, m, bad, alph[keep], bet[keep])


# ---------------------------------------------------------------------------------------------
# Trace


@dataclass
class TraceResult:
    """A trace estimate with its standard error, and the same split over coordinate blocks.

    ``method`` is ``exact`` (all ``dim`` unit vectors: no error), ``hutchinson`` or ``hutch++``.
    ``samples`` are the per-probe values whose mean is the stochastic part. ``block_traces`` and
    ``block_stderr`` (one entry per block given) estimate ``sum_{i in block} A_ii`` and add up to
    ``trace`` exactly.
    """

    trace: float
    stderr: float
    n_matvec: int
    method: str
    samples: np.ndarray
    block_traces: np.ndarray = field(default_factory=lambda: np.zeros(0))
    block_stderr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    nonfinite_at: int | None = None


TRACE_METHODS = ("hutch++", "hutchinson")


def trace(
    matvec: Matvec,
    dim: int,
    n_matvec: int = 60,
    *,
    method: str = "hutch++",
    seed: int = 0,
    blocks: Sequence[slice] | None = None,
    batch: int = 8,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    callback: Callable[[int], None] | None = None,
    space: VectorSpace | None = None,
) -> TraceResult:
    """Estimate ``tr A`` with ``n_matvec`` products, with a standard error.

    - ``hutchinson`` (Hutchinson 1989): ``mean_j z_j^T A z_j`` over Rademacher ``z_j``; standard error
      ``sd / sqrt(m)``; variance ``2 (||A||_F^2 - sum_i A_ii^2) / m``.
    - ``hutch++`` (Meyer, Musco, Musco & Woodruff 2021): a third of the budget sketches ``Q = orth(A S)``,
      a third computes ``tr(Q^T A Q)`` exactly, the last third runs Hutchinson on the deflated
      ``(I - QQ^T) A (I - QQ^T)``; the standard error is that last part's (conditional on ``Q``). It
      wins when a few eigenvalues carry much of ``||A||_F`` (Hessians: the outliers).
    - If ``n_matvec >= dim`` the trace is computed exactly from the ``dim`` unit vectors.

    ``blocks`` (slices of coordinates, e.g. one per parameter tensor) also returns the block traces
    ``sum_{i in block} A_ii`` from the same products, through the diagonal estimator
    ``diag(A) ~ mean_j z_j * (A z_j)`` (Bekas, Kokiopoulou & Saad 2007) applied to the deflated part
    for Hutch++ (``diag(A Q Q^T)`` exactly plus ``mean_j g~_j * (A g~_j)``, ``g~ = (I - QQ^T) g``); the
    block traces add up to the total. ``space``: as for :func:`lanczos` (``blocks`` stay global
    coordinate ranges).

    Memory: probes are drawn, multiplied and reduced ``batch`` at a time, so Hutchinson holds a few
    groups of ``batch`` vectors and Hutch++ adds its sketch ``A S``, orthonormalized in place into
    ``Q`` (``r = n_matvec // 3`` vectors); in one process the values do not depend on ``batch`` (one random stream,
    same probes); sharded draws are per group, so sharded runs agree with each other for one ``batch``.
    """
    if method not in TRACE_METHODS:
        raise FlatscopeError(f"unknown trace method {method!r}; choose from {', '.join(TRACE_METHODS)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    blocks = list(blocks) if blocks is not None else []
    gen = torch.Generator().manual_seed(int(seed))
    sp = space if space is not None else VectorSpace(dim)
    done = [0]

    def apply(Z: torch.Tensor) -> torch.Tensor:
        outs = []
        for s in range(0, Z.shape[0], batch):
            out = _apply(matvec, Z[s : s + batch]).to(dtype)
            if not sp.all_finite(out):
                raise _NonFinite(done[0] + 1)
            done[0] += out.shape[0]
            if callback is not None:
                callback(done[0])
            outs.append(out)
        return torch.cat(outs) if outs else Z[:0]

    def block_sums(d: torch.Tensor) -> np.ndarray:
        """(m, dim) per-coordinate contributions -> (m, n_blocks)."""
        if not blocks:
            return np.zeros((d.shape[0], 0))
        sums = torch.stack([_rowsum64(d[:, sp.local_block(b)]) for b in blocks], dim=1)
        return sp.reduce(sums).cpu().numpy()

    def finish(
        total: float, samples: np.ndarray, fixed_blocks: np.ndarray, block_samples: np.ndarray, meth: str
    ) -> TraceResult:
        m = len(samples)
        se = float(np.std(samples, ddof=1) / math.sqrt(m)) if m > 1 else (0.0 if meth == "exact" else float("nan"))
        if block_samples.shape[1]:
            bt = fixed_blocks + block_samples.mean(axis=0)
            bse = (block_samples.std(axis=0, ddof=1) / math.sqrt(m)) if m > 1 else np.zeros(len(blocks))
        else:
            bt, bse = np.zeros(0), np.zeros(0)
        return TraceResult(total, se, done[0], meth, samples, bt, bse)

    def probes(count: int):
        """Rademacher rows in groups of ``batch`` (the same stream as one draw of ``count`` rows)."""
        for s in range(0, count, batch):
            yield sp.rademacher(min(batch, count - s), gen, device, dtype)

    def stream(Zs) -> tuple[np.ndarray, np.ndarray]:
        """Per-probe values ``z^T A z`` and their block sums, one group of probes at a time."""
        samples, bsums = [], []
        for Z in Zs:
            contrib = Z * apply(Z)
            samples.append(sp.reduce(_rowsum64(contrib)).cpu().numpy())
            bsums.append(block_sums(contrib))
            del contrib
        return np.concatenate(samples), np.concatenate(bsums, axis=0)

    try:
        if n_matvec >= dim:  # exact: A e_i for every unit vector
            diag = torch.zeros(sp.local_dim, dtype=torch.float64, device=device)
            for s in range(0, dim, batch):
                e = torch.zeros(min(batch, dim - s), sp.local_dim, dtype=dtype, device=device)
                rows = torch.arange(e.shape[0])
                held, loc = sp.locate(rows + s)  # the unit vectors' 1s held here, at local index loc
                e[rows[held], loc[held]] = 1
                Ae = apply(e)
                diag[loc[held]] = Ae[rows[held], loc[held]].to(torch.float64)
            bt = block_sums(diag[None])[0] if blocks else np.zeros(0)
            total = float(sp.reduce(diag.sum()))
            return TraceResult(total, 0.0, done[0], "exact", np.zeros(0), bt, np.zeros(len(blocks)))
        if n_matvec < 2:
            raise FlatscopeError(f"a trace estimate needs at least 2 products, got {n_matvec}")
        if method == "hutchinson" or n_matvec < 6:
            samples, bsamp = stream(probes(n_matvec))
            return finish(float(samples.mean()), samples, np.zeros(len(blocks)), bsamp, "hutchinson")
        # Hutch++: the sketch A S (r rows) and its orthonormal basis Q are the only (r x dim) tensors
        r = n_matvec // 3
        AS = torch.empty(r, sp.local_dim, dtype=dtype, device=device)
        s0 = 0
        for S in probes(r):
            AS[s0 : s0 + S.shape[0]] = apply(S)
            s0 += S.shape[0]
        Qr = sp.orthonormalize_rows_(AS)  # (r, dim), rows orthonormal: Q = orth(A S), in place
        low, fixed = 0.0, np.zeros((1, len(blocks)))
        for s in range(0, r, batch):
            Qc = Qr[s : s + batch]
            qaq = Qc * apply(Qc)
            low += float(sp.reduce(_rowsum64(qaq).sum()))  # tr(Q^T A Q)
            fixed += block_sums(qaq.sum(dim=0, keepdim=True))  # diag(A Q Q^T)_i = sum_c (A q_c)_i q_ci
            del qaq
        samples, bsamp = stream(G - sp.gram(G, Qr) @ Qr for G in probes(n_matvec - 2 * r))
        return finish(low + float(samples.mean()), samples, fixed[0], bsamp, "hutch++")
    except _NonFinite as exc:
        return TraceResult(
            float("nan"),
            float("nan"),
            done[0],
            method,
            np.zeros(0),
            np.full(len(blocks), np.nan),
            np.full(len(blocks), np.nan),
            exc.at,
        )


class _NonFinite(Exception):
    def __init__(self, at: int):
        super().__init__(at)
        self.at = at
