"""Our sketch behind traker's projector interface, so ``traker.TRAKer(projector=...)`` uses it.

traker calls ``project(grads, model_id)`` with either a [B, p] tensor or a dict of per-parameter
gradients {name: [B, ...]} (flattened and concatenated in dict order by traker's own
projectors). We sketch each dict entry at its row offset and accumulate, which equals sketching
the concatenation without ever building it. Checkpoint ``model_id`` uses the derived seed
``derive_seed(seed, model_id)``.

Unlike traker's projectors, ours is scaled by 1/sqrt(k) (E||Pg||^2 = ||g||^2); TRAK scores do
not depend on a common scale of the features.
"""
from __future__ import annotations

import torch

from ..kernels.philox import derive_seed
from ..kernels.sketch import sketch

_KINDS = {"rademacher": "rademacher", "normal": "gaussian", "gaussian": "gaussian"}


def _kind_of(proj_type) -> str:
    key = getattr(proj_type, "value", proj_type)
    if key not in _KINDS:
        raise ValueError(f"proj_type must be one of {sorted(_KINDS)}, got {proj_type!r}")
    return _KINDS[key]


class SketchProjector:
    """A traker-compatible projector: ``project(grads, model_id) -> Tensor[B, proj_dim]``.

    Args:
        grad_dim: number of gradient coordinates p (checked against the input).
        proj_dim: k.
        seed: base seed; checkpoint ``model_id`` uses ``derive_seed(seed, model_id)``.
        proj_type: "rademacher" or "normal"/"gaussian" (or traker's ProjectionType).
        device: where results are returned (inputs are sketched on their own device).
        backend: sketch backend ("auto", "cpu", "triton", "cuda", "torch").
        dtype: dtype of the returned features (traker stores float16/32).
    """

    def __init__(self, grad_dim: int, proj_dim: int, seed: int = 0, proj_type="rademacher",
                 device="cpu", *, backend: str = "auto", dtype=torch.float32, **_ignored):
        if grad_dim < 1:
            raise ValueError(f"grad_dim must be positive, got {grad_dim}")
        self.grad_dim = int(grad_dim)
        self.proj_dim = int(proj_dim)
        self.seed = int(seed)
        self.proj_type = proj_type
        self.kind = _kind_of(proj_type)
        self.device = torch.device(device)
        self.backend = backend
        self.dtype = dtype

    def project(self, grads, model_id: int) -> torch.Tensor:
        seed = derive_seed(self.seed, int(model_id))
        if torch.is_tensor(grads):
            if grads.ndim != 2 or grads.shape[1] != self.grad_dim:
                raise ValueError(
                    f"grads must have shape [B, {self.grad_dim}], got {tuple(grads.shape)}"
                )
            out = sketch(grads, self.proj_dim, seed=seed, kind=self.kind, backend=self.backend)
            return out.to(device=self.device, dtype=self.dtype)
        if not isinstance(grads, dict) or not grads:
            raise TypeError(f"grads must be a tensor or a non-empty dict, got {type(grads).__name__}")
        blocks = [g.reshape(g.shape[0], -1) for g in grads.values()]
        total = sum(b.shape[1] for b in blocks)
        if total != self.grad_dim:
            raise ValueError(f"grads hold {total} coordinates per example, expected {self.grad_dim}")
        out = None
        offset = 0
        for b in blocks:
            out = sketch(b, self.proj_dim, seed=seed, kind=self.kind, backend=self.backend,
                         row_offset=offset, out=out, accumulate=out is not None)
            offset += b.shape[1]
        return out.to(device=self.device, dtype=self.dtype)

    def free_memory(self):
        """Nothing to free: P is never stored."""
