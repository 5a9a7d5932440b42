"""The factors of one checkpoint, layer by layer, and the eigendecomposition stage."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...kernels.kfac import Basis, kron_eigh

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


def eigen(layers: list, factors: dict, block_width: int | None) -> None:
    """Eigendecompose every layer's A and S (float64, one batched ``kron_eigh``) into ``factors``."""
    mats = []
    for layer in layers:
        mats += [factors[layer.name].A, factors[layer.name].S]
    solved = kron_eigh(mats, block_width)
    for i, layer in enumerate(layers):
        f = factors[layer.name]
        (f.eig_a, f.basis_a), (f.eig_s, f.basis_s) = solved[2 * i], solved[2 * i + 1]
