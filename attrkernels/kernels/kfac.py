"""Kronecker-factored curvature: factor accumulation, float64 eigendecomposition, EK-FAC correction.

Notation. A layer with weight W [d_out, d_in] (bias folded in as a last input column of ones:
the homogeneous coordinate) is called at T positions per example (sequence tokens, conv output
pixels after unfolding, repeated calls). For example b the capture gives its inputs
a_bt [d_in] and output-gradients delta_bt [d_out], stacked as A [B, T, d_in], D [B, T, d_out];
the per-example weight gradient is

    G_b = sum_t delta_bt a_bt^T = D_b^T A_b                                   [d_out, d_in].

The Fisher of one layer, F = E_b[vec(G_b) vec(G_b)^T], is approximated (K-FAC) by S (x) A with

    A = (1 / #positions) sum_{b,t} a_bt a_bt^T      S = (1 / #examples) sum_{b,t} delta_bt delta_bt^T

(positions are assumed independent; for T = 1 both are plain means). With the eigendecompositions
A = Q_A diag(e_A) Q_A^T and S = Q_S diag(e_S) Q_S^T, K-FAC's eigenvalues are e_S e_A^T and
EK-FAC (George et al., 2018) replaces them by the exact second moments in that basis,

    Lambda = E_b[(Q_S^T G_b Q_A)^2]          (squared elementwise)            [d_out, d_in],

so that F ~ (Q_S (x) Q_A) diag(vec Lambda) (Q_S (x) Q_A)^T. The functions below compute these
sums over a batch; callers divide by the counts.

All GEMMs are torch (MKL / oneDNN on CPU): factor accumulation is one GEMM over all B T rows of a
batch; ``benchmarks/ekfac.py`` measures it against the machine's matmul peak. Rotations and
per-example products pick the cheaper association order by FLOP count (see ``rotation_plan``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Bytes of per-example tensors (unfolded inputs, gradients) held at once. Kept under glibc's
# 32 MiB mmap threshold: larger temporaries are unmapped when freed and page-faulted again on
# every reuse, while smaller ones reuse heap memory that is already mapped.
DEFAULT_MEMORY = 24 << 20


def position_major(x: torch.Tensor) -> bool:
    """Whether x [B, T, d] is stored positions-innermost, i.e. is a transposed view of a [B, d, T]
    tensor (the conv capture's unfolded inputs and output-gradients are). The kernels keep that
    layout: gathering it into [B, T, d] rows would be a strided copy several times slower than
    the GEMMs that follow."""
    return x.ndim == 3 and x.shape[1] > 1 and x.stride(1) == 1 and x.stride(2) != 1


GRAM_BLOCK = 256  # rows per block of the symmetric product in ``covariance`` (widths above 512)
NARROW_GRAM_BLOCK = 64  # the same for widths 129-512: one Intel Xeon core, N = 3,200 positions,
# d = 192 / 256 / 384: 2.3 / 3.3 / 7.2 ms against 3.1 / 5.7 / 11.4 ms for one full GEMM (blocks of
# 128 or 256 saved little there); up to 128 the full GEMM is the faster


def gram_block(d: int) -> int | None:
    """Rows per block of ``covariance``'s symmetric product for width d, or None for one GEMM."""
    if d <= 128:
        return None
    return NARROW_GRAM_BLOCK if d <= 512 else GRAM_BLOCK


def covariance(x: torch.Tensor, out: torch.Tensor | None = None, mirror: bool = True) -> torch.Tensor:
    """out += sum over all leading positions of x x^T: x [..., d] -> out [d, d] (float32).

    With X = x as [n, d] rows (n = prod(leading dims)), out += X^T X. Up to d = 128 one GEMM
    (2 n d^2 FLOPs); wider, only the block upper triangle is multiplied, a GEMM per block row
    [b, n] x [n, d - i] (b = ``gram_block(d)``; a symmetric rank-n update: about half the FLOPs,
    in GEMMs still wide enough to run near the matmul peak; ``benchmarks/ekfac.py`` times both)
    and mirrored; without ``mirror`` only those block rows of out are added to (a sum over many
    calls mirrored once at the end, ``mirror_upper``: the per-call strided transpose-add was 11%
    of the time at d = 3072, n = 1024). For the activation factor pass A with a column of ones
    appended (``homogeneous``) when the layer has a bias. A positions-major x is multiplied as
    [d, n] columns (one copy with contiguous runs).
    """
    x = x.to(torch.float32)
    d = x.shape[-1]
    if out is None:
        out = torch.zeros(d, d, dtype=torch.float32, device=x.device)
    elif out.shape != (d, d):
        raise ValueError(f"out must have shape {(d, d)}, got {tuple(out.shape)}")
    cols = x.transpose(1, 2).permute(1, 0, 2).reshape(d, -1) if position_major(x) else x.reshape(-1, d).T
    block = gram_block(d)
    if block is None:
        return out.addmm_(cols, cols.T)
    for i in range(0, d, block):
        j = min(d, i + block)
        if not mirror:
            out[i:j, i:].addmm_(cols[i:j], cols[i:].T)
            continue
        part = cols[i:j] @ cols[i:].T  # rows i:j, columns i:d
        out[i:j, i:] += part
        out[j:, i:j] += part[:, j - i:].T
    return out


def mirror_upper(out: torch.Tensor) -> torch.Tensor:
    """Fill the block lower triangle of a [d, d] sum of ``covariance(..., mirror=False)`` calls
    from its block upper triangle, in place (a symmetric matrix is left as it is)."""
    block = gram_block(out.shape[0]) if out.ndim == 2 else None
    if block is not None:
        d = out.shape[0]
        for i in range(0, d, block):
            j = min(d, i + block)
            out[j:, i:j] = out[i:j, j:].T
    return out


def homogeneous(a: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d + 1] float32 with a last coordinate 1 (the bias input), same layout."""
    a = a.to(torch.float32)
    if position_major(a):
        t = a.transpose(1, 2)
        return torch.cat([t, t.new_ones(t.shape[0], 1, t.shape[2])], dim=1).transpose(1, 2)
    return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)


def _matmul_last(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x @ q over the last dimension. A positions-major x [B, T, d] with many positions keeps its
    layout (B GEMMs of q^T with [d, T]); with few (4 T < d) those GEMMs are too thin to reuse q
    from cache, so x is gathered into rows for one GEMM (the copy costs less than the reloads of q)."""
    if position_major(x) and 4 * x.shape[1] >= x.shape[2]:
        return (q.T @ x.transpose(1, 2)).transpose(1, 2)
    return x.contiguous() @ q


def token_counts(idx: torch.Tensor, num: int, padding_idx: int | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """out += counts of each index: the diagonal of an Embedding's activation factor (float64 [num]).

    An Embedding's input is the one-hot vector of its index, so sum_t a_t a_t^T is diagonal with
    the token counts on it; ``padding_idx`` (whose row receives no gradient) counts zero.
    """
    counts = torch.bincount(idx.reshape(-1).to(torch.int64), minlength=num).to(torch.float64)
    if counts.numel() != num:
        raise ValueError(f"indices must lie in [0, {num}), got max {int(idx.max())}")
    if padding_idx is not None:
        counts[padding_idx] = 0
    return counts if out is None else out.add_(counts)


# ---------------------------------------------------------------------------------------------
# Orthonormal bases


@dataclass(frozen=True)
class Basis:
    """An orthonormal Q [dim, dim]: block-diagonal with ``blocks`` ([w_i, w_i], consecutive), or
    the identity when ``blocks`` is empty (an Embedding's diagonal activation factor)."""

    dim: int
    blocks: tuple = ()

    def astype(self, dtype: torch.dtype) -> "Basis":
        return Basis(self.dim, tuple(q.to(dtype) for q in self.blocks))

    def cost(self) -> int:
        """Multiply-adds of rotating one vector: sum_i w_i^2 (0 for the identity)."""
        return sum(q.shape[0] ** 2 for q in self.blocks)

    def dense(self) -> torch.Tensor:
        """Q as a dense [dim, dim] matrix (for tests and small layers)."""
        if not self.blocks:
            return torch.eye(self.dim, dtype=torch.float64)
        return torch.block_diag(*self.blocks)

    def rotate(self, x: torch.Tensor, dim: int = -1, transpose: bool = False) -> torch.Tensor:
        """y = x Q along ``dim`` (y_j = sum_i x_i Q_ij), or x Q^T with ``transpose``."""
        if x.shape[dim] != self.dim:
            raise ValueError(f"dimension {dim} of x has size {x.shape[dim]}, the basis {self.dim}")
        if not self.blocks:
            return x
        moved = x.movedim(dim, -1)
        if len(self.blocks) == 1:
            q = self.blocks[0]
            out = _matmul_last(moved, q.T if transpose else q)
        else:
            out = torch.empty_like(moved, dtype=torch.result_type(moved, self.blocks[0]))
            start = 0
            for q in self.blocks:
                w = q.shape[0]
                out[..., start:start + w] = _matmul_last(moved[..., start:start + w], q.T if transpose else q)
                start += w
        return out.movedim(-1, dim)


def block_sizes(dim: int, block_width: int | None) -> list[int]:
    """Sizes of the diagonal blocks of a dim x dim factor: one block if dim <= block_width, else
    ceil(dim / block_width) blocks of (nearly) equal size, each at most block_width."""
    if block_width is None or dim <= block_width:
        return [dim]
    n = -(-dim // block_width)
    return [dim // n + (1 if i < dim % n else 0) for i in range(n)]


def _eigh(mats: list) -> list:
    """Eigendecompositions of symmetric [w, w] matrices of one size and dtype -> [(e [w], Q [w, w]
    contiguous)] in that dtype. The matrices are scratch: they may be overwritten.

    On the CPU in float64, LAPACK's dsyevd (divide and conquer) through SciPy with as many BLAS
    threads as torch uses, one matrix at a time, because torch.linalg.eigh's CPU path (MKL) was
    the slower of the two at the factor widths of the benchmarked models (Intel Xeon, one thread,
    width 3072: 7.1-7.6 s against 8.1-8.3 s); in float32 MKL's ssyevd is the faster (3.1-3.8 s
    against 3.4-4.3 s; the 96 GPT-2-small factors: 92 s in kronfluence's run against 133 s
    through SciPy). A symmetric matrix is its own transpose, so SciPy gets the row-major matrix as
    the column-major array LAPACK works on and overwrites it: no copy in, one out (Q to row-major).
    SciPy's path needs threadpoolctl (a dependency of scikit-learn) to hold its BLAS to torch's
    thread count; without it, in float32 and on GPUs, torch.linalg.eigh on the stacked batch.
    """
    if mats[0].device.type == "cpu" and mats[0].dtype == torch.float64:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            threadpool_limits = None
        if threadpool_limits is not None:
            from scipy.linalg import eigh

            out = []
            with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
                for m in mats:
                    e, q = eigh(m.numpy().T, driver="evd", check_finite=False, overwrite_a=True)
                    out.append((torch.from_numpy(e), torch.from_numpy(q).contiguous()))
            return out
    values, vectors = torch.linalg.eigh(torch.stack(mats))
    return [(values[k], vectors[k].contiguous()) for k in range(len(mats))]


EIGH_DTYPES = (torch.float64, torch.float32)


def kron_eigh(factors: list, block_width: int | None = None, dtype: torch.dtype = torch.float64) -> list:
    """Eigendecompositions (e [d] float64, Basis) of symmetric PSD factors, batched and blocked.

    Each factor (a [d, d] matrix, or a [d] vector meaning a diagonal matrix) is symmetrised,
    (F + F^T) / 2, in float64. With ``block_width`` set, a factor wider than it is split into
    ceil(d / block_width) diagonal blocks and the coupling between blocks is dropped: the result
    decomposes blockdiag(F_11, F_22, ...) exactly, not F. For EK-FAC this only changes the basis
    (still orthonormal) in which Lambda is then fitted exactly, so the approximation degrades
    gracefully; for K-FAC the eigenvalues are those of the blocks. Blocks (and whole factors) of
    equal size are decomposed in one call (``_eigh``).
    Eigenvalues come per block in ascending order and are not clipped (they can be tiny negative
    numbers for rank-deficient factors). A diagonal factor has the identity basis.

    ``dtype``: the precision of the decomposition itself (results are returned in float64).
    float32 is 2-2.5x faster at widths 2304-3072 (LAPACK's tridiagonal reduction moves half the
    bytes) and is backward stable: it decomposes F + E with |E| ~ d eps_32 |F|, the size of the
    rounding the factors already carry from their float32 accumulation. EK-FAC re-estimates the
    eigenvalues in whatever orthonormal basis it gets, so only K-FAC reads the eigenvalues'
    lower digits (those below ~1e-6 of the largest, which damping swamps).
    """
    if dtype not in EIGH_DTYPES:
        raise ValueError(f"dtype must be one of {EIGH_DTYPES}, got {dtype!r}")
    jobs = {}  # size -> list of (factor index, block index, matrix)
    layout = []
    for i, f in enumerate(factors):
        if f.ndim == 1:
            layout.append(None)
            continue
        if f.ndim != 2 or f.shape[0] != f.shape[1]:
            raise ValueError(f"factor {i} must be square [d, d] or diagonal [d], got {tuple(f.shape)}")
        f = f.to(torch.float64)
        f = torch.add(f, f.T.contiguous()).mul_(0.5)  # the transpose copied first: 0.14 s at d = 3072, not 0.23
        sizes = block_sizes(f.shape[0], block_width)
        layout.append(sizes)
        start = 0
        for j, w in enumerate(sizes):
            block = f[start:start + w, start:start + w]
            jobs.setdefault(w, []).append((i, j, block.contiguous() if len(sizes) > 1 else block))
            start += w
    solved = {}
    for w, items in jobs.items():
        pairs = _eigh([m.to(dtype) for _, _, m in items])
        for (i, j, _), (e, q) in zip(items, pairs):
            solved[i, j] = (e.to(torch.float64), q.to(torch.float64))
    out = []
    for i, f in enumerate(factors):
        if layout[i] is None:
            out.append((f.to(torch.float64), Basis(f.shape[0])))
            continue
        parts = [solved[i, j] for j in range(len(layout[i]))]
        out.append((torch.cat([e for e, _ in parts]), Basis(f.shape[0], tuple(q for _, q in parts))))
    return out


# ---------------------------------------------------------------------------------------------
# Rotated per-example gradients and the EK-FAC correction


def rotation_plan(T: int, basis_a: Basis, basis_s: Basis) -> tuple[bool, bool]:
    """(rotate A first, rotate D first): for Q_S^T D^T A Q_A, which side to rotate as T vectors
    before the product instead of as the formed [d_out, d_in] matrix after it.

    Per example, rotating the T input vectors costs T c_A multiply-adds and rotating the formed
    gradient's rows costs d_out c_A (c = ``Basis.cost``), so A goes first when T <= d_out; D goes
    first when T <= d_in. Either way the product itself costs T d_out d_in.
    """
    return T <= basis_s.dim, T <= basis_a.dim


def rotation_cost(T: int, basis_a: Basis, basis_s: Basis) -> int:
    """Multiply-adds per example of the rotations in ``rotated_gradients`` (without the product)."""
    return basis_a.cost() * min(T, basis_s.dim) + basis_s.cost() * min(T, basis_a.dim)


def rotated_gradients(A: torch.Tensor, D: torch.Tensor, basis_a: Basis | None = None,
                      basis_s: Basis | None = None) -> torch.Tensor:
    """Q_S^T G_b Q_A for every example, G_b = D_b^T A_b: A [B, T, d_in], D [B, T, d_out] -> [B, d_out, d_in].

    Without bases, the plain per-example gradients G_b. Each side is rotated before or after the
    product as ``rotation_plan`` says; the product over positions is one batched GEMM
    (``torch.bmm``, K = T).
    """
    A, D = A.to(torch.float32), D.to(torch.float32)
    if basis_a is None or basis_s is None:
        return torch.bmm(D.transpose(1, 2), A)
    a_first, s_first = rotation_plan(A.shape[1], basis_a, basis_s)
    G = torch.bmm((basis_s.rotate(D) if s_first else D).transpose(1, 2), basis_a.rotate(A) if a_first else A)
    if not a_first:
        G = basis_a.rotate(G, dim=2)
    return G if s_first else basis_s.rotate(G, dim=1)


def example_chunk(B: int, bytes_per_example: int, memory_budget: int) -> int:
    """Examples per chunk so that a chunk's per-example tensors fit in ``memory_budget`` bytes."""
    return max(1, min(B, memory_budget // max(1, bytes_per_example)))


def ekfac_correction(A: torch.Tensor, D: torch.Tensor, basis_a: Basis, basis_s: Basis,
                     out: torch.Tensor | None = None, memory_budget: int = DEFAULT_MEMORY) -> torch.Tensor:
    """out += sum_b (Q_S^T G_b Q_A)^2 (elementwise square), G_b = D_b^T A_b, without storing G_b for all b.

    A [B, T, d_in], D [B, T, d_out]; out [d_out, d_in] float32 (Lambda times the number of examples).

    * T = 1: Q_S^T G_b Q_A = (Q_S^T delta_b)(Q_A^T a_b)^T is an outer product, so its square is the
      outer product of the squared rotated vectors and the sum over b is one GEMM:
      out += (D Q_S)^{.2 T} (A Q_A)^{.2}   (B T (c_A + c_S) + B d_out d_in multiply-adds).
    * T > 1: per-example GEMMs (``rotated_gradients``) over chunks of examples whose rotated
      gradients fit in ``memory_budget`` bytes, their squares added to ``out`` (``add_squares``).
    """
    if A.ndim != 3 or D.ndim != 3 or A.shape[:2] != D.shape[:2]:
        raise ValueError(f"A must be [B, T, d_in] and D [B, T, d_out] with equal B, T; got "
                         f"{tuple(A.shape)} and {tuple(D.shape)}")
    B, T, d_in = A.shape
    d_out = D.shape[2]
    if (basis_a.dim, basis_s.dim) != (d_in, d_out):
        raise ValueError(f"bases of sizes ({basis_a.dim}, {basis_s.dim}) do not match d_in = {d_in}, d_out = {d_out}")
    if out is None:
        out = torch.zeros(d_out, d_in, dtype=torch.float32, device=A.device)
    if T == 1:
        a = basis_a.rotate(A[:, 0].to(torch.float32))
        d = basis_s.rotate(D[:, 0].to(torch.float32))
        return out.addmm_(d.square().T, a.square())
    step = example_chunk(B, 4 * d_out * d_in, memory_budget)
    for b0 in range(0, B, step):
        add_squares(rotated_gradients(A[b0:b0 + step], D[b0:b0 + step], basis_a, basis_s), out)
    return out


def add_squares(R: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out += sum_b R_b^2 (elementwise) for formed rotated gradients R [B, d_out, d_in] (R unchanged).

    One fused multiply-add per example into ``out``: no [B, d_out, d_in] temporary to allocate
    and read again (R [8, 3072, 769], one Xeon core: 12 ms against 62 ms for R.square().sum(0))."""
    for R_b in R:
        out.addcmul_(R_b, R_b)
    return out
