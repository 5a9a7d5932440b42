"""The factors of one checkpoint, layer by layer: normalised from the stage sums of the passes
(``passes.Passes.covariances`` / ``correction``, combined over shards first), and the
eigendecomposition stage, spread over the ranks of a process group by layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...distributed import Group, all_reduce_sum
from ...kernels.kfac import Basis, block_sizes, kron_eigh

STAGES = ("covariance", "eigen", "lambda")  # EK-FAC; K-FAC stops after "eigen"


@dataclass
class LayerFactors:
    """K-FAC / EK-FAC factors of one layer (A, S means; eigenvalues and bases; Lambda for EK-FAC)."""

    A: torch.Tensor  # [d_in, d_in] float64, or [d_in] diagonal (Embedding)
    S: torch.Tensor  # [d_out, d_out] float64
    eig_a: torch.Tensor | None = None  # [d_in] float64
    eig_s: torch.Tensor | None = None  # [d_out] float64
    basis_a: Basis | None = None  # float64
    basis_s: Basis | None = None
    lam: torch.Tensor | None = None  # [d_out, d_in] float32 (EK-FAC)
    _bases32: tuple | None = field(default=None, repr=False)

    def bases32(self) -> tuple[Basis, Basis]:
        """The bases in float32, for rotating float32 gradients."""
        if self._bases32 is None:
            self._bases32 = (self.basis_a.astype(torch.float32), self.basis_s.astype(torch.float32))
        return self._bases32


def covariance_factors(layers: list, sums: dict) -> dict:
    """{layer: LayerFactors(A, S)} from the covariance sums over all N examples:
    A = sum a a^T / positions, S = sum delta delta^T / N (float64), divided in place (the sums
    are the caller's scratch: GPT-2-small's are 2.6 GB)."""
    n = int(sums["examples"])
    return {layer.name: LayerFactors(A=sums[f"{layer.name}/A"].div_(max(int(sums[f"{layer.name}/positions"]), 1)),
                                     S=sums[f"{layer.name}/S"].div_(n)) for layer in layers}


def set_lambda(layers: list, factors: dict, sums: dict) -> None:
    """Lambda = sum_b (Q_S^T G_b Q_A)^2 / N (float32) from the correction sums, into ``factors``."""
    n = int(sums["examples"])
    for layer in layers:
        factors[layer.name].lam = (sums[f"{layer.name}/lam"] / n).to(torch.float32)


def owners(sizes: list, ranks: int) -> list:
    """The rank that eigendecomposes each factor of width ``sizes[i]``: largest first (cost d^3),
    each to the least loaded rank; the same on every rank."""
    load, out = [0] * ranks, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        out[i] = rank
        load[rank] += sizes[i] ** 3
    return out


def eigen(layers: list, factors: dict, block_width: int | None, group: Group = Group(),
          dtype: torch.dtype = torch.float64) -> None:
    """Eigendecompose every layer's A and S (batched ``kron_eigh`` in ``dtype``; float64 results)
    into ``factors``.

    Under a process group each rank decomposes its share of the [d, d] factors (``owners``) and
    one ``all_reduce_sum`` of zero-filled buffers (eigenvalues [d], basis blocks [w, w]) gives
    every rank all of them; diagonal factors (identity basis) are done by every rank.
    """
    mats = []
    for layer in layers:
        mats += [factors[layer.name].A, factors[layer.name].S]
    dense = [i for i, m in enumerate(mats) if m.ndim == 2]
    who = dict(zip(dense, owners([mats[i].shape[0] for i in dense], group.size)))
    mine = [i for i in range(len(mats)) if who.get(i, group.rank) == group.rank]
    solved = dict(zip(mine, kron_eigh([mats[i] for i in mine], block_width, dtype)))
    if group.distributed:
        buffers = []
        for i in dense:
            d = mats[i].shape[0]
            if i not in solved:
                blocks = tuple(torch.zeros(w, w, dtype=torch.float64, device=mats[i].device)
                               for w in block_sizes(d, block_width))
                solved[i] = (torch.zeros(d, dtype=torch.float64, device=mats[i].device), Basis(d, blocks))
            buffers += [solved[i][0], *solved[i][1].blocks]
        all_reduce_sum(buffers, what="eigendecompositions")
    for j, layer in enumerate(layers):
        f = factors[layer.name]
        (f.eig_a, f.basis_a), (f.eig_s, f.basis_s) = solved[2 * j], solved[2 * j + 1]
