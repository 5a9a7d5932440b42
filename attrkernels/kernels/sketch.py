"""Random projection of rows: sketch(x) = x @ P with P generated on the fly, never stored.

    out[b, c] = sum_{i < p} x[b, i] * P[row_offset + i, c]      x: [B, p], out: [B, k] float32

P is the p x k matrix of ``projection.py`` (Rademacher or Gaussian entries of variance 1/k, a
pure function of (seed, row, column)), so E||out[b]||^2 = ||x[b]||^2 and every backend
multiplies by the same P. ``row_offset`` selects rows of a larger P: sketching the pieces of a
concatenated vector with their offsets and adding gives the sketch of the whole vector.

Backends: "cpu" (C++), "triton", "cuda" (CuPy), "torch" (reference: generate row blocks of P,
matmul in float64). Inputs may be float32, bfloat16 or float16; accumulation and output are
float32.

CPU kernel (``attrkernels._C``, FLOPs 2 B p k, floor = FLOPs / fp32 matmul peak). P is generated
128 rows at a time into a cache-resident buffer and multiplied by a register-blocked
micro-kernel, so each generated value is reused by all B rows. Two variants, chosen per
microarchitecture from cpuid (``ATTRKERNELS_SKETCH_VARIANT`` overrides; ``attrkernels info``
shows the choice):

* ``panel`` (AMD, and any CPU without AVX-512): a 128 x 512 panel of P in L2 swept by a 6 x 64
  micro-tile; 91% of the matmul peak at B = 32 on an AMD EPYC, whose FMA pipes do not share
  ports with the generation's vector logic.
* ``strip12x32`` (Intel AVX-512 cores, where shuffles, blends and vector logic issue on the two
  FMA ports): x copied once per 128-row chunk, 32-column strips of P written into L1 by the
  micro-kernel that consumes the previous strip (stores and mask loads only), 12 x 32 tile.

Results are bit-identical for any thread count and any variant: work units and the per-chunk
summation order are functions of (B, p, k) only.

Gaussian P: Philox4x32-10 + Box-Muller (``projection.py``) is the one specification on every
backend, so Gaussian features are identical across CPU, Triton and CUDA. Its generation costs
one Philox call per 4 values plus the transform, about as many vector operations per value as
B = 32 rows of FMAs, so at B = 32 the CPU Gaussian sketch runs at roughly a quarter to 40% of
the matmul peak (generation-bound) where Rademacher reaches 80-90%. A cheaper CPU-only generator
would break cross-backend equality; we keep the single specification, and Rademacher (exact
+-1/sqrt(k), one Philox call per 128 values) stays the default.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import backends
from .philox import split_seed
from .projection import check_k, check_kind, projection_rows

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KIND_CODES = {"rademacher": 0, "gaussian": 1}


def check_finite_rows(bad: torch.Tensor, name: str = "x") -> None:
    """Raise naming the rows flagged in the boolean/uint8 vector ``bad``."""
    rows = torch.nonzero(bad.to(torch.bool)).flatten().tolist()
    if rows:
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise ValueError(
            f"{name} has NaN or Inf values in {len(rows)} of {bad.numel()} rows: [{shown}]"
        )


def _validate(x, k, seed, kind, row_offset, out, colsum):
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x must have shape [B, p] (2-D), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    B, p = x.shape
    if B < 1 or p < 1:
        raise ValueError(f"x must have at least one row and one column, got shape {tuple(x.shape)}")
    k = check_k(k)
    check_kind(kind)
    split_seed(seed)
    if isinstance(row_offset, bool) or not isinstance(row_offset, (int, np.integer)) or row_offset < 0:
        raise ValueError(f"row_offset must be a non-negative int, got {row_offset!r}")
    if row_offset + p > 2**63:
        raise ValueError(f"row_offset + p must be at most 2**63, got {row_offset + p}")
    if out is not None:
        if not torch.is_tensor(out) or out.shape != (B, k) or out.dtype != torch.float32:
            raise ValueError(
                f"out must be a float32 tensor of shape ({B}, {k}), got "
                f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}"
            )
        if out.device != x.device:
            raise ValueError(f"out is on {out.device} but x is on {x.device}")
        if out.stride(1) != 1:
            raise ValueError("out must have unit stride along its last dimension")
    if colsum is not None:
        if (not torch.is_tensor(colsum) or colsum.shape != (p,) or colsum.dtype != torch.float32
                or colsum.device != x.device or colsum.stride(0) != 1):
            raise ValueError(
                f"colsum must be a float32 tensor of shape ({p},) with unit stride on {x.device}, got "
                f"{getattr(colsum, 'dtype', type(colsum).__name__)} {tuple(getattr(colsum, 'shape', ()))}"
            )
    return k


def sketch(x: torch.Tensor, k: int, *, seed: int = 0, kind: str = "rademacher",
           backend: str = "auto", row_offset: int = 0, out: torch.Tensor | None = None,
           accumulate: bool = False, colsum: torch.Tensor | None = None) -> torch.Tensor:
    """Project the rows of ``x`` [B, p] to ``k`` dimensions: returns ``x @ P`` [B, k] float32.

    Args:
        x: rows to project, float32 / bfloat16 / float16, on any device a backend serves.
        k: output dimension (any k >= 1).
        seed: 64-bit seed of P; use ``philox.derive_seed(seed, i)`` for the i-th checkpoint.
        kind: "rademacher" (entries +-1/sqrt(k)) or "gaussian" (N(0, 1/k)).
        backend: "auto", "cpu", "triton", "cuda" or "torch".
        row_offset: global row of P that column 0 of x multiplies.
        out: optional float32 [B, k] tensor to write (or, with ``accumulate``, add) into.
        accumulate: add x @ P to ``out`` instead of overwriting it.
        colsum: optional float32 [p] tensor to which the column sums sum_b x[b] are added (the
            CPU kernel forms them while it reads x, in row order b = 0, 1, ...: the same bits for
            any thread count; other backends add ``x.sum(0)``).

    Raises ValueError naming the rows when x holds NaN or Inf (``out`` is then unspecified).
    """
    k = _validate(x, k, seed, kind, row_offset, out, colsum)
    name, fn = backends.resolve("sketch", backend, x.device, variant=(x.dtype, kind))
    if out is None:
        out = torch.empty(x.shape[0], k, dtype=torch.float32, device=x.device)
        accumulate = False
    if name == "cpu":
        bad = torch.zeros(x.shape[0], dtype=torch.uint8)
        fn(x, out, k, seed, kind, row_offset, accumulate, bad, colsum)
        check_finite_rows(bad)
        return out
    check_finite_rows(~torch.isfinite(x).all(dim=1))
    fn(x, out, k, seed, kind, row_offset, accumulate, None)
    if colsum is not None:
        colsum += x.to(torch.float32).sum(0)
    return out


# ---------------------------------------------------------------------------------------------
# Backends. Each takes (x, out, k, seed, kind, row_offset, accumulate, nonfinite) and writes out.

REFERENCE_BLOCK_BYTES = 64 << 20


def sketch_torch(x, out, k, seed, kind, row_offset, accumulate, nonfinite=None):
    """Reference: generate blocks of rows of P (float64 transform) and multiply in float64."""
    B, p = x.shape
    rows = max(1, min(p, REFERENCE_BLOCK_BYTES // (8 * 128 * (-(-k // 128)))))
    acc = torch.zeros(B, k, dtype=torch.float64, device=x.device)
    for r0 in range(0, p, rows):
        n = min(rows, p - r0)
        block = projection_rows(row_offset + r0, n, k, seed=seed, kind=kind, device=x.device)
        acc += x[:, r0:r0 + n].to(torch.float64) @ block.to(torch.float64)
    if accumulate:
        out += acc.to(torch.float32)
    else:
        out.copy_(acc)
    return out


def sketch_cpu(x, out, k, seed, kind, row_offset, accumulate, nonfinite=None, colsum=None):
    """The C++ kernel (attrkernels._C.sketch); fills ``nonfinite`` [B] uint8 flags and adds the
    column sums of x to ``colsum`` [p] if given."""
    from .. import _C

    if x.stride(1) != 1:
        x = x.contiguous()
    _C.sketch(
        x.data_ptr(), DTYPE_CODES[x.dtype], x.shape[0], x.shape[1], x.stride(0),
        out.data_ptr(), out.stride(0), k, seed, KIND_CODES[kind], row_offset, bool(accumulate),
        torch.get_num_threads(), 0 if nonfinite is None else nonfinite.data_ptr(),
        colsum=0 if colsum is None else colsum.data_ptr(),
    )
    return out


# GPU backends split the p axis into slices run in parallel; the number of slices depends only on
# the shape (never on the device) and partial sums are added in slice order, so results do not
# depend on the GPU model.
SLICE_ROWS = 16384
MAX_SLICES = 64
PARTIAL_BUDGET = 1 << 28  # floats in the [slices, B, k] buffer of partial sums


def run_in_p_slices(x, out, k, accumulate, launch, align=64):
    """Split p into slices and call ``launch(target, ld_slice, ld_row, slices, slice_rows,
    accumulate)`` once, where ``target`` is ``out`` (one slice) or a [slices, B, k] buffer whose
    slices are then summed in order into ``out``."""
    B, p = x.shape
    slices = min(MAX_SLICES, max(1, p // SLICE_ROWS))
    while slices > 1 and slices * B * k > PARTIAL_BUDGET:
        slices -= 1
    slice_rows = -(-p // slices)  # ceil(p / slices), then up to a multiple of align
    slice_rows = -(-slice_rows // align) * align
    slices = -(-p // slice_rows)
    if slices == 1:
        launch(out, 0, out.stride(0), 1, slice_rows, bool(accumulate))
        return out
    partial = torch.empty(slices, B, k, dtype=torch.float32, device=x.device)
    launch(partial, partial.stride(0), partial.stride(1), slices, slice_rows, False)
    total = partial.sum(dim=0)
    if accumulate:
        out += total
    else:
        out.copy_(total)
    return out


def self_check(fn, device, variant):
    """Compare a GPU kernel with the reference on a small problem; raise on disagreement.

    ``variant``: (input dtype, kind); empty (a caller of ``backends.resolve`` that named none)
    checks float32 inputs with both kinds."""
    if not variant:
        for kind in ("rademacher", "gaussian"):
            self_check(fn, device, (torch.float32, kind))
        return
    dtype, kind = variant
    gen = torch.Generator(device="cpu").manual_seed(1234)
    x = torch.randn(5, 777, generator=gen).to(device=device, dtype=dtype)
    got = torch.empty(5, 300, dtype=torch.float32, device=device)
    fn(x, got, 300, 99, kind, 12345, False, None)
    want = torch.empty_like(got)
    sketch_torch(x, want, 300, 99, kind, 12345, False)
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    if not err < 1e-3:
        raise backends.KernelSelfCheckError(
            f"sketch kernel {getattr(fn, '__module__', '')}.{getattr(fn, '__name__', fn)} "
            f"disagrees with the reference on {device} ({dtype}, {kind}): relative error {err:.2e}"
        )


backends.register("sketch", "torch", "attrkernels.kernels.sketch:sketch_torch")
backends.register("sketch", "cpu", "attrkernels.kernels.sketch:sketch_cpu")
backends.register("sketch", "triton", "attrkernels.kernels.sketch_triton:sketch_triton")
backends.register("sketch", "cuda", "attrkernels.kernels.sketch_cuda:sketch_cuda")
backends.register_self_check("sketch", self_check)
