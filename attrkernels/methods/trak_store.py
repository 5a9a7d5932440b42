"""TRAK's training features on disk, in any storage dtype, and the reader of the whole set's rows.

One file per checkpoint m (``ChunkedArray``, one chunk per train batch), in the store directory
(one process) or in each shard's directory (``distributed.manifest``), with rows

    float32            [Phi_m | Q_m]                                      width k + 1, train_<m>.f32
    float16, bfloat16  [Phi_m | Q_m as float32 bits, two 16-bit words]    width k + 2, train_<m>.f16 / .bf16

so Q_m (the out-to-loss weights) is exact float32 in every dtype and Phi_m is rounded once, when
written (16-bit storage halves the disk and the bytes scoring reads; scores are computed in float32).

``Features(parts, k, dtype)`` serves rows [r0, r1) of the training set from the files that cover
them (the top-level file, or pieces of the shards of any split: ``distributed.cover``):
``rows(r0, r1) -> (Phi [r1 - r0, k] float32 tensor, Q [r1 - r0] float32)`` by plain reads (memory
= one tile), ``gram(r0, r1)`` = sum_i phi_i^T phi_i (float64 [k, k]) and ``signature()``, a digest
of the checksums of the files and rows read, which the kernel records.
"""
from __future__ import annotations

import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..store import ChunkedArray
from ..utils.errors import NotPositiveDefiniteError

DTYPES = {"float32": ("f32", np.float32, torch.float32), "float16": ("f16", np.uint16, torch.float16),
          "bfloat16": ("bf16", np.uint16, torch.bfloat16)}
GRAM_ROWS = 8192


def check_dtype(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"dtype (the storage of TRAK's features) must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name


def feature_file(m: int, dtype: str) -> str:
    return f"train_{m}.{DTYPES[dtype][0]}"


def width(k: int, dtype: str) -> int:
    return k + 1 if dtype == "float32" else k + 2


def feature_array(path, rows: int, k: int, chunk: int, dtype: str) -> ChunkedArray:
    return ChunkedArray(path, rows, width(k, dtype), chunk, DTYPES[dtype][1])


def encode(phi: torch.Tensor, q: torch.Tensor, dtype: str) -> np.ndarray:
    """[B, width] rows of the file from features phi [B, k] and weights q [B]."""
    phi, q = phi.detach().cpu().float(), q.detach().cpu().reshape(-1, 1).float()
    if dtype == "float32":
        return torch.cat([phi, q], 1).numpy()
    words = phi.to(DTYPES[dtype][2]).view(torch.int16)
    return torch.cat([words, q.view(torch.int16)], 1).numpy().view(np.uint16)


def decode(rows: np.ndarray, k: int, dtype: str) -> tuple[torch.Tensor, np.ndarray]:
    """(Phi [B, k] float32 tensor, Q [B] float32) from rows of the file."""
    if dtype == "float32":
        return torch.from_numpy(np.ascontiguousarray(rows[:, :k])), np.ascontiguousarray(rows[:, k])
    words = torch.from_numpy(rows.view(np.int16))
    phi = words[:, :k].contiguous().view(DTYPES[dtype][2]).float()
    q = words[:, k:k + 2].contiguous().view(torch.float32).reshape(-1).numpy()
    return phi, q


@dataclass(frozen=True)
class Part:
    """Rows [start, stop) of the training set, held by ``array`` from its row 0 = example ``offset``."""

    array: ChunkedArray
    offset: int
    start: int
    stop: int


class Features:
    """Rows of one checkpoint's features over the parts that cover them (see the module docstring)."""

    def __init__(self, parts: list[Part], k: int, dtype: str):
        self.parts, self.k, self.dtype = parts, k, dtype

    def rows(self, r0: int, r1: int) -> tuple[torch.Tensor, np.ndarray]:
        phis, qs = [], []
        for p in self.parts:
            lo, hi = max(r0, p.start), min(r1, p.stop)
            if lo < hi:
                phi, q = decode(p.array.read_rows(lo - p.offset, hi - p.offset), self.k, self.dtype)
                phis.append(phi)
                qs.append(q)
        if sum(len(q) for q in qs) != r1 - r0:
            raise ValueError(f"rows [{r0}, {r1}) are not all covered by the feature files")
        if len(phis) == 1:
            return phis[0], qs[0]
        return torch.cat(phis), np.concatenate(qs)

    def gram(self, r0: int, r1: int) -> np.ndarray:
        """sum over rows i in [r0, r1) of phi_i^T phi_i, float64 [k, k], in blocks of GRAM_ROWS."""
        K = np.zeros((self.k, self.k))
        for b0 in range(r0, r1, GRAM_ROWS):
            phi = self.rows(b0, min(r1, b0 + GRAM_ROWS))[0].double().numpy()
            K += phi.T @ phi
        return K

    def verify(self) -> None:
        for p in self.parts:
            p.array.verify(repair=False)

    def signature(self) -> str:
        """The checksum of a lone whole file, else a digest of every part's rows and checksum."""
        if len(self.parts) == 1 and self.parts[0].start == self.parts[0].offset == 0 \
                and self.parts[0].stop == self.parts[0].array.n:
            return self.parts[0].array.checksum()
        text = ";".join(f"{p.start}-{p.stop}@{p.offset}:{p.array.checksum()}" for p in self.parts)
        return f"{zlib.crc32(text.encode()):08x}"


def _free_memory() -> int | None:
    """Bytes of memory available now (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _free_disk(path: Path) -> int | None:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _gb(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_sizes(k: int, dtype: str, rows: int, num_checkpoints: int, directory: Path) -> None:
    """Refuse, before anything is written, features that do not fit on the store's disk and
    kernels that do not fit in memory (with the numbers and the fix)."""
    kernel = 3 * 8 * k * k  # K, K + lambda I and its Cholesky factor, float64
    memory = _free_memory()
    if memory is not None and kernel > memory:
        raise MemoryError(
            f"TRAK with k = {k} needs {_gb(kernel)} of memory for the {k} x {k} float64 kernel "
            f"and its Cholesky factor, but {_gb(memory)} is available; reduce k (k = 2048 to 8192 is usual)")
    features = (4 if dtype == "float32" else 2) * rows * width(k, dtype)
    need = 0
    for m in range(num_checkpoints):
        path = directory / feature_file(m, dtype)
        need += max(features - (path.stat().st_size if path.exists() else 0), 0)
    free = _free_disk(directory)
    if free is not None and need > free:
        raise MemoryError(
            f"TRAK with k = {k} writes {_gb(features)} of features per checkpoint ({rows} x "
            f"{width(k, dtype)} {dtype}; {_gb(need)} still to write for {num_checkpoints} "
            f"checkpoint(s)) to {directory}, whose disk has {_gb(free)} free; reduce k, use dtype='bfloat16', "
            "pass store= on a larger disk, or use fewer checkpoints")


def cholesky(K: np.ndarray, lam: float, k: int, n_train: int, default_ratio: float) -> np.ndarray:
    """Cholesky factor of K + lam I; raises when it fails or the matrix is numerically singular
    (a pivot below 1e-10 of the largest, where float64 solves lose all accuracy)."""
    A = K + lam * np.eye(k)
    try:
        L = np.linalg.cholesky(A)
        pivots = np.diag(L) ** 2
        if not pivots.min() > 1e-10 * pivots.max():
            raise np.linalg.LinAlgError("numerically singular")
        return L
    except np.linalg.LinAlgError:
        mean_eig = np.trace(K) / min(k, n_train)
        hint = f"; k = {k} exceeds n_train = {n_train}, so Phi^T Phi has rank < k" if k > n_train else ""
        raise NotPositiveDefiniteError(
            f"the TRAK kernel Phi^T Phi + {lam:g} I ({k} x {k}) is not positive definite{hint}. "
            f"Pass damping > 0, e.g. damping={default_ratio * mean_eig:.3g} "
            f"({default_ratio:g} x its mean nonzero eigenvalue, the default of damping=None)."
        ) from None


def cho_solve(L: np.ndarray, B: np.ndarray) -> np.ndarray:
    """(L L^T)^{-1} B by two triangular solves, float64."""
    from scipy.linalg import solve_triangular

    Y = solve_triangular(L, B, lower=True)
    return solve_triangular(L.T, Y, lower=False)
