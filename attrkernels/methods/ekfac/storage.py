"""Factors on disk: one safetensors file per stage and checkpoint, JSON metadata.

Layout (``attrkernels.store.Store``)::

    <store>/meta.json                            what the factors depend on (see ``store_meta``)
    <store>/<stage>_<fingerprint>.safetensors    stage in covariance, eigen, lambda; the
                                                 checkpoint's fingerprint (``methods.base.fingerprint``)

Tensors are keyed ``<layer>/<key>``: covariance A, S; eigen eig_a, eig_s, basis_a/<i>, basis_s/<i>
(the diagonal blocks of a blocked basis); lambda lam. Each file's metadata holds the
fingerprint, the strategy and (covariance) the number of examples. A store written with other
settings raises ``StoreMismatch`` naming the differences.
"""
from __future__ import annotations

import hashlib

import torch

from ...kernels.kfac import Basis
from ...store import Store
from ...utils.batches import tensors as batch_tensors
from .factors import LayerFactors

STORE_KIND = "attrkernels-kfac-factors"


def stage_file(stage: str, fp: str) -> str:
    """The file name of a stage's factors for the checkpoint with fingerprint ``fp``."""
    return f"{stage}_{fp}.safetensors"


def dataset_len(loader) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def data_signature(loader, first_batch) -> dict:
    """Number of examples (when the loader knows it) and a hash of the first batch's tensors."""
    h = hashlib.sha1()
    for v in batch_tensors(first_batch):
        t = v.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"examples": dataset_len(loader), "first_batch_sha1": h.hexdigest()[:16]}


def store_meta(method, data: dict) -> dict:
    """The settings the stored factors depend on (damping is applied at score time: not one)."""
    return {
        "kind": STORE_KIND,
        "strategy": method.strategy,
        "fisher": method.fisher,
        "seed": method.seed if method.fisher == "true" else None,
        "block_width": method.block_width,
        "layers": {layer.name: layer.describe() for layer in method.layers},
        "data": data,
    }


def stage_tensors(stage: str, factors: dict) -> dict:
    """The tensors a stage adds to ``factors`` ({layer: LayerFactors}), keyed for the file."""
    out = {}
    for name, f in factors.items():
        if stage == "covariance":
            out[f"{name}/A"], out[f"{name}/S"] = f.A, f.S
        elif stage == "eigen":
            out[f"{name}/eig_a"], out[f"{name}/eig_s"] = f.eig_a, f.eig_s
            for side, basis in (("basis_a", f.basis_a), ("basis_s", f.basis_s)):
                for i, q in enumerate(basis.blocks):
                    out[f"{name}/{side}/{i}"] = q
        elif stage == "lambda":
            out[f"{name}/lam"] = f.lam
        else:
            raise ValueError(f"unknown stage {stage!r}")
    return out


def _load_basis(prefix: str, dim: int, tensors: dict) -> Basis:
    blocks = []
    while f"{prefix}/{len(blocks)}" in tensors:
        blocks.append(tensors[f"{prefix}/{len(blocks)}"])
    return Basis(dim, tuple(blocks))


class FactorStore:
    """Save, load and find the stage files of a factor store."""

    def __init__(self, path, meta: dict):
        self.store = Store(path, meta)
        self.path = self.store.path
        self.strategy = meta["strategy"]

    def exists(self, stage: str, fp: str) -> bool:
        return self.store.exists(stage_file(stage, fp))

    def has(self, stages, fp: str) -> bool:
        return all(self.exists(stage, fp) for stage in stages)

    def fingerprints(self, stage: str) -> list:
        """Fingerprints of the checkpoints whose ``stage`` file the store holds."""
        return sorted({p.name[len(stage) + 1:].split(".")[0] for p in self.path.glob(stage_file(stage, "*"))})

    def save(self, stage: str, fp: str, factors: dict, examples: int | None = None) -> None:
        tensors = stage_tensors(stage, factors)
        self.store.save_tensors(stage_file(stage, fp), {k: v.cpu() for k, v in tensors.items()},
                                {"fingerprint": fp, "strategy": self.strategy,
                                 "examples": "" if examples is None else examples})

    def load(self, stages, fp: str, layers: list, device, base: dict | None = None) -> dict:
        """{layer: LayerFactors} from the stage files (added to ``base`` when given)."""
        tensors = {}
        for stage in stages:
            tensors.update(self.store.load_tensors(stage_file(stage, fp), device=device))
        factors = base or {}
        for layer in layers:
            key = layer.name
            if key not in factors:
                if f"{key}/A" not in tensors:
                    raise ValueError(f"store {self.path} has no factors of layer {key!r} for checkpoint {fp}")
                factors[key] = LayerFactors(A=tensors[f"{key}/A"], S=tensors[f"{key}/S"])
            f = factors[key]
            if f"{key}/eig_a" in tensors:
                f.eig_a, f.eig_s = tensors[f"{key}/eig_a"], tensors[f"{key}/eig_s"]
                f.basis_a = _load_basis(f"{key}/basis_a", layer.d_in, tensors)
                f.basis_s = _load_basis(f"{key}/basis_s", layer.d_out, tensors)
            if f"{key}/lam" in tensors:
                f.lam = tensors[f"{key}/lam"]
        return factors
