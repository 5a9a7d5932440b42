"""Inner products of per-example Kronecker gradients with query matrices (the train x test tile).

With the notation of ``kfac``: example b of a layer has G_b = D_b^T A_b [d_out, d_in] from its
inputs A_b [T, d_in] and output-gradients D_b [T, d_out]; in a basis (Q_A, Q_S) its rotated
gradient is R_b = Q_S^T G_b Q_A. A preconditioned query j of the same layer is a matrix
W_j [d_out, d_in] (in the same basis). These kernels compute, for a batch of examples,

    kron_inner:       out[b, j] = <R_b, W_j> = sum_{o,i} R_b[o, i] W_j[o, i]          [B, n]
    kron_self_inner:  out[b]    = <R_b, R_b * M> = sum_{o,i} R_b[o, i]^2 M[o, i]       [B]

(without bases, R_b = G_b) in chunks of examples bounded in memory, never forming the
full-model per-example gradient. kron_inner forms R for blocks of rows and multiplies
[B, rows d_in] by [rows d_in, n]: 2 B n d_out d_in FLOPs in GEMMs that read W once. (For T = 1 the
alternative d_b^T (W_j a_b), which never forms R_b, is slower: its [B, n, d_out] intermediate is
larger and its contraction is not a GEMM.)
kron_self_inner never forms R_b for T = 1: R_b^2 = (d_b^2)(a_b^2)^T, so the sum is (d^2)^T M (a^2).
"""
from __future__ import annotations

import torch

from .kfac import DEFAULT_MEMORY, Basis, example_chunk, rotated_gradients, rotation_plan


def _check(A, D, shape):
    if A.ndim != 3 or D.ndim != 3 or A.shape[:2] != D.shape[:2]:
        raise ValueError(f"A must be [B, T, d_in] and D [B, T, d_out] with equal B, T; got "
                         f"{tuple(A.shape)} and {tuple(D.shape)}")
    if tuple(shape) != (D.shape[2], A.shape[2]):
        raise ValueError(f"query matrices must be [d_out, d_in] = {(D.shape[2], A.shape[2])}, got {tuple(shape)}")


def kron_inner(A: torch.Tensor, D: torch.Tensor, W: torch.Tensor, basis_a: Basis | None = None,
               basis_s: Basis | None = None, memory_budget: int = DEFAULT_MEMORY) -> torch.Tensor:
    """[B, n] inner products <R_b, W_j> of (rotated) per-example gradients with W [n, d_out, d_in].

    R is formed in blocks of output rows o for all B examples at once, R[:, o] = (D Q_S)[:, :, o]^T
    (A Q_A) (``rotation_plan``: an A side rotated after the product is applied to the block), so
    each block of W is read once per call and the GEMMs have B rows. Blocks of examples are used
    instead when the S side has to be rotated after the product (T > d_in), which needs whole R_b.
    """
    _check(A, D, W.shape[1:])
    B, T, d_in = A.shape
    n, d_out = W.shape[0], W.shape[1]
    W = W.to(torch.float32)
    rotated = basis_a is not None and basis_s is not None
    a_first, s_first = rotation_plan(T, basis_a, basis_s) if rotated else (True, True)
    out = torch.zeros(B, n, dtype=torch.float32, device=A.device)
    if not s_first:
        step = example_chunk(B, 4 * d_out * d_in, memory_budget)
        for b0 in range(0, B, step):
            out[b0:b0 + step] = gradient_inner(rotated_gradients(A[b0:b0 + step], D[b0:b0 + step], basis_a, basis_s), W)
        return out
    A, D = A.to(torch.float32), D.to(torch.float32)
    if rotated:
        D = basis_s.rotate(D)
        if a_first:
            A = basis_a.rotate(A)
    rows = max(1, min(d_out, memory_budget // (4 * B * d_in)))
    for o0 in range(0, d_out, rows):
        R = torch.bmm(D[:, :, o0:o0 + rows].transpose(1, 2), A)  # [B, rows, d_in]
        if rotated and not a_first:
            R = basis_a.rotate(R, dim=2)
        out.addmm_(R.reshape(B, -1), W[:, o0:o0 + rows].reshape(n, -1).T)
    return out


def kron_self_inner(A: torch.Tensor, D: torch.Tensor, M: torch.Tensor, basis_a: Basis | None = None,
                    basis_s: Basis | None = None, memory_budget: int = DEFAULT_MEMORY) -> torch.Tensor:
    """[B] weighted squared norms sum_{o,i} R_b[o, i]^2 M[o, i] of the (rotated) per-example gradients."""
    _check(A, D, M.shape)
    B, T, d_in = A.shape
    d_out = D.shape[2]
    M = M.to(torch.float32)
    if T == 1:
        a, d = A[:, 0].to(torch.float32), D[:, 0].to(torch.float32)
        if basis_a is not None and basis_s is not None:
            a, d = basis_a.rotate(a), basis_s.rotate(d)
        # R_b^2 = (d^2)(a^2)^T, so the sum is (d^2)^T M (a^2)
        return ((d.square() @ M) * a.square()).sum(1)
    out = torch.empty(B, dtype=torch.float32, device=A.device)
    step = example_chunk(B, 4 * d_out * d_in, memory_budget)
    for b0 in range(0, B, step):
        R = rotated_gradients(A[b0:b0 + step], D[b0:b0 + step], basis_a, basis_s)
        out[b0:b0 + step] = gradient_self_inner(R, M)
    return out


def gradient_inner(R: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """[B, n] = <R_b, W_j> for formed gradients R [B, d_out, d_in] and W [n, d_out, d_in]: one GEMM."""
    return R.reshape(R.shape[0], -1) @ W.to(torch.float32).reshape(W.shape[0], -1).T


def gradient_self_inner(R: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """[B] = sum_{o,i} R_b[o, i]^2 M[o, i] for formed gradients R [B, d_out, d_in]; R is overwritten."""
    return (R.square_() * M.to(torch.float32)).sum((1, 2))


# ---------------------------------------------------------------------------------------------
# Embeddings: per-example gradients live on the rows of the looked-up indices. With rows [U]
# (sorted, unique) and R [B, U, d] (row rows[u] of example b's weight gradient is R[b, u]), the
# layer's gradient in the Kronecker layout is G_b = R_b^T scattered to columns ``rows`` of a
# [d, V] matrix; its activation basis is the identity, so R_b = Q_S^T G_b rotates only d.


def sparse_rows_inner(rows: torch.Tensor, R: torch.Tensor, query_rows: torch.Tensor, Wq: torch.Tensor,
                      basis_s: Basis | None = None) -> torch.Tensor:
    """[B, n] = sum over rows present in both of <(R_b Q_S)[u], Wq_j[row]>; Wq [n, Uq, d] on ``query_rows``."""
    if R.ndim != 3 or R.shape[1] != rows.numel() or Wq.ndim != 3 or Wq.shape[1] != query_rows.numel():
        raise ValueError(f"R must be [B, U, d] with U = len(rows) and Wq [n, Uq, d] with Uq = "
                         f"len(query_rows); got {tuple(R.shape)}, {rows.numel()}, {tuple(Wq.shape)}, "
                         f"{query_rows.numel()}")
    R = R.to(torch.float32)
    if basis_s is not None:
        R = basis_s.rotate(R)
    pos = torch.searchsorted(query_rows, rows).clamp_max(max(query_rows.numel() - 1, 0))
    match = (query_rows[pos] == rows) if query_rows.numel() else torch.zeros_like(rows, dtype=torch.bool)
    if not match.any():
        return torch.zeros(R.shape[0], Wq.shape[0], dtype=torch.float32, device=R.device)
    left = R[:, match].reshape(R.shape[0], -1)
    right = Wq[:, pos[match]].to(torch.float32).reshape(Wq.shape[0], -1)
    return left @ right.T


def sparse_rows_self_inner(rows: torch.Tensor, R: torch.Tensor, M: torch.Tensor,
                           basis_s: Basis | None = None) -> torch.Tensor:
    """[B] = sum_{u,o} (R_b Q_S)[u, o]^2 M[o, rows[u]] for M [d, V]."""
    R = R.to(torch.float32)
    if basis_s is not None:
        R = basis_s.rotate(R)
    return (R.square() * M[:, rows].T.to(torch.float32)).sum((1, 2))
