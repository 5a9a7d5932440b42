"""Factors on disk: one safetensors file per stage and checkpoint, JSON metadata.

Layout (``attrkernels.store.Store``)::

    <store>/meta.json                            what the factors depend on (see ``store_meta``)
    <store>/train_data.npz                       the training data the factors were fitted on:
                                                 the digest of every example, in order
                                                 (``store.fingerprint``)
    <store>/<stage>_<fingerprint>.safetensors    stage in covariance, eigen, lambda; the
                                                 checkpoint's fingerprint (``methods.base.fingerprint``)

Tensors are keyed ``<layer>/<key>``: covariance A, S; eigen eig_a, eig_s, basis_a/<i>, basis_s/<i>
(the diagonal blocks of a blocked basis); lambda lam. Each file's metadata holds the
fingerprint, the strategy and (covariance) the number of examples and the fingerprint of the
training data. A store written with other settings raises ``StoreMismatch`` naming the
differences; one fitted on other training data raises ``StoredDataMismatch`` (a
``StoreMismatch`` and a ``DataMismatch``) at the first pass over the training data that
differs, naming the first differing example. A file that cannot be read raises
``StoreDamaged`` naming it.
"""
from __future__ import annotations

import numpy as np
import torch

from ...kernels.kfac import Basis
from ...store import DataMismatch, Store, StoreMismatch, combine, damaged
from .factors import LayerFactors

STORE_KIND = "attrkernels-kfac-factors"
DATA_FILE = "train_data.npz"


class StoredDataMismatch(StoreMismatch, DataMismatch):
    """The training data differs from the data the stored factors were fitted on."""


def stored_data_mismatch(path, err: DataMismatch) -> StoredDataMismatch:
    return StoredDataMismatch(
        f"the factor store {path} was fitted on other training data than the train loader yields now: "
        f"{str(err).rstrip('.')}. Use another store directory for other training data, or delete {path} "
        "to start over")


def stage_file(stage: str, fp: str) -> str:
    """The file name of a stage's factors for the checkpoint with fingerprint ``fp``."""
    return f"{stage}_{fp}.safetensors"


def dataset_len(loader) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def store_meta(method) -> dict:
    """The settings the stored factors depend on (damping is applied at score time: not one;
    the training data is recorded example by example in ``DATA_FILE``)."""
    return {
        "kind": STORE_KIND,
        "strategy": method.strategy,
        "fisher": method.fisher,
        "seed": method.seed if method.fisher == "true" else None,
        "block_width": method.block_width,
        "layers": {layer.name: layer.describe() for layer in method.layers},
        # only when not the default float64, so stores written before the option still open
        **({"eigh_dtype": str(method.eigh_dtype)} if method.eigh_dtype != torch.float64 else {}),
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

    # ------------------------------------------------------------------------- training data
    def digests(self) -> np.ndarray | None:
        """The example digests of the training data the stored factors were fitted on (None
        for a store without factors yet); StoreDamaged when the file is unreadable, or missing
        while factors exist."""
        path = self.path / DATA_FILE
        if not path.exists():
            if any(self.path.glob("*.safetensors")):
                raise damaged(path, "it is missing, so the training data of the stored factors cannot be "
                                    "checked", f"delete the store directory {self.path} and fit again")
            return None
        arrays = self.store.load_arrays(DATA_FILE)
        d = arrays.get("digests")
        if d is None or d.dtype != np.uint64 or d.ndim != 1 or d.size == 0:
            raise damaged(path, "it holds no uint64 digests array",
                          f"delete the store directory {self.path} and fit again")
        return d

    def save_digests(self, digests: np.ndarray) -> None:
        self.store.save_arrays(DATA_FILE, digests=np.ascontiguousarray(digests, dtype=np.uint64))

    # ------------------------------------------------------------------------- factors
    def save(self, stage: str, fp: str, factors: dict, examples: int | None = None,
             data: np.ndarray | None = None) -> None:
        tensors = stage_tensors(stage, factors)
        meta = {"fingerprint": fp, "strategy": self.strategy, "examples": "" if examples is None else examples}
        if data is not None:
            meta["data"] = combine(data)["digest"]
        self.store.save_tensors(stage_file(stage, fp), {k: v.cpu() for k, v in tensors.items()}, meta)

    def check_data(self, fp: str, digests: np.ndarray) -> None:
        """Refuse a covariance file recorded for other training data than ``digests``."""
        name = stage_file("covariance", fp)
        recorded = self.store.tensors_metadata(name).get("data")
        if recorded != combine(digests)["digest"]:
            raise StoredDataMismatch(f"store file {self.path / name} was computed from other training data "
                                     f"than the store's {DATA_FILE} records; delete the store directory "
                                     f"{self.path} and fit again")

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
