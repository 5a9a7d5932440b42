"""Labels drawn from a model's own predictions (the true Fisher's targets).

``sample_categorical(logits, generator)`` draws one class per row of ``logits`` [N, V] from
softmax(logits) by inverse transform sampling: with w_j = exp(z_j - max z) and the running sums
c_j = w_1 + ... + w_j (float64), row n takes

    label_n = #{j : c_j <= u_n c_V},      u_n ~ U[0, 1) (one draw per row, from ``generator``),

i.e. class j with probability w_j / c_V = softmax(z)_j; a class of probability 0 is never drawn.
It costs one exp and one running sum per class and a binary search per row (``torch.multinomial``
normalises and scans each row several times; at language-model vocabularies the sampling was a
tenth of a true-Fisher pass). Rows are processed in chunks of at most CHUNK_BYTES of float64
temporaries.
"""
from __future__ import annotations

import torch

CHUNK_BYTES = 32 << 20


def sample_categorical(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[N, V] logits -> [N] int64 labels, one draw per row from softmax(logits) (see the module
    docstring). Raises RuntimeError naming the rows whose logits are not finite."""
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape [N, V] with V >= 1, got {tuple(logits.shape)}")
    n, v = logits.shape
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=logits.device)
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    rows = max(1, CHUNK_BYTES // (8 * v))
    for start in range(0, n, rows):
        z = logits[start:start + rows].detach().to(torch.float64)
        c = torch.exp(z - z.amax(1, keepdim=True)).cumsum_(1)
        total = c[:, -1:]
        bad = ~torch.isfinite(total.squeeze(1))
        if bool(bad.any()):
            raise RuntimeError(f"the logits of rows {(start + bad.nonzero().flatten()).tolist()[:10]} are not "
                               "finite: no class can be drawn from them")
        drawn = torch.searchsorted(c, u[start:start + rows, None] * total, right=True)
        out[start:start + rows] = drawn.squeeze(1).clamp_(max=v - 1)
    return out
