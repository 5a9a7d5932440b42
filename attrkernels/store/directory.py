"""A method's on-disk state: a directory with JSON metadata and named arrays.

Layout::

    <store>/
      meta.json                 {"format": ..., "kind": ..., settings that define the contents}
      <name>.f32 / .npy ...     memory-mapped arrays (ChunkedArray) or whole files
      <name>.sums.npy           per chunk of a ChunkedArray: CRC-32 of its bytes and the digest of
                                the training examples it was computed from (written before the mask)
      <name>.done.npy           per-chunk done-mask of a ChunkedArray, written after the data
      <name>.lock               held (flock) by the process writing <name>
      <name>.safetensors        tensor dicts (factors), written atomically

Opening a store whose meta.json disagrees with the settings of the caller raises
``StoreMismatch`` naming each differing setting, so a run never mixes results made with other
settings. A store file that cannot be parsed raises ``StoreDamaged`` naming the file and the fix.

Integrity of a ChunkedArray: a data file shorter than its shape (a partial copy, a full disk) or
missing loses the chunks it no longer holds: they are marked missing and recomputed by the next
fit (a warning names the file); a done chunk whose bytes no longer match their CRC-32 (a flipped
bit) is found by ``verify`` and recomputed the same way; a chunk computed from other training
examples than the caller's (``write(..., data=digest)`` / ``check_data``) is refused. Only one
process at a time writes an array (``lock``); a second one waits for the first to finish. ``ChunkedArray`` is a [n, k] array filled in chunks of rows: chunks are committed in
groups (at most ``commit_seconds`` apart, and when the last one is written): their rows are
flushed and fsynced before the done-mask that marks them is replaced (atomically), so a killed
run resumes by redoing only chunks not marked done (at most the last ``commit_seconds`` of work),
and a finished array is never recomputed. Grouping keeps the fsyncs of a commit off the
per-batch path.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import time
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write, read_json, write_json, write_npy

FORMAT = 2


class StoreMismatch(ValueError):
    """A store directory holds results made with other settings (or from other data)."""


class StoreDamaged(ValueError):
    """A store file is unreadable or does not hold what its metadata says."""


def damaged(path, problem: str, fix: str | None = None) -> StoreDamaged:
    """A StoreDamaged naming ``path``, what is wrong, and the fix (default: delete and refit)."""
    fix = fix or f"delete {path} (or the whole store directory) and fit again to recompute it"
    return StoreDamaged(f"store file {path} is damaged: {problem}; {fix}")


@contextmanager
def reading(path):
    """Turn any parse error of a store file into StoreDamaged naming it."""
    try:
        yield
    except FileNotFoundError as err:
        raise damaged(path, "it is missing") from err
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        if isinstance(err, (StoreDamaged, StoreMismatch)):
            raise
        raise damaged(path, f"{type(err).__name__}: {err}") from err
    except Exception as err:  # noqa: BLE001  (safetensors' SafetensorError and other parsers)
        if type(err).__name__ != "SafetensorError":
            raise
        raise damaged(path, f"{type(err).__name__}: {err}") from err


def differences(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"{key}: stored {old.get(key)!r}, requested {new.get(key)!r}")
    return out


class Store:
    """Directory of one method run. ``meta`` must be JSON-serialisable and define the contents."""

    def __init__(self, path, meta: dict):
        self.path = Path(path)
        self.meta = {"format": FORMAT, **meta}
        meta_path = self.path / "meta.json"
        if meta_path.exists():
            with reading(meta_path):
                old = read_json(meta_path)
                if not isinstance(old, dict):
                    raise ValueError("not a JSON object")
            diff = differences(old, jsonable(self.meta))
            if diff:
                raise StoreMismatch(
                    f"store {self.path} was written with other settings; use another directory or "
                    "delete it to start over. Differences:\n  " + "\n  ".join(diff)
                )
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(meta_path, jsonable(self.meta))

    def file(self, name: str) -> Path:
        return self.path / name

    def chunked(self, name: str, n: int, k: int, chunk: int, dtype=np.float32) -> "ChunkedArray":
        return ChunkedArray(self.path / name, n, k, chunk, dtype)

    def write_json(self, name, obj):
        write_json(self.path / name, jsonable(obj))

    def read_json(self, name):
        with reading(self.path / name):
            return read_json(self.path / name)

    def exists(self, name) -> bool:
        return (self.path / name).exists()

    def save_tensors(self, name: str, tensors: dict, metadata: dict | None = None) -> None:
        """Atomically write a dict of tensors as safetensors (string metadata allowed), with the
        CRC-32 of their bytes in the metadata (safetensors has no checksum of its own)."""
        from safetensors.torch import save

        tensors = {k: v.contiguous() for k, v in tensors.items()}
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        meta[_CRC_KEY] = _tensors_crc(tensors)
        blob = save(tensors, metadata=meta)
        atomic_write(self.path / name, lambda f: f.write(blob))

    def save_arrays(self, name: str, **arrays) -> None:
        """Atomically write NumPy arrays as one .npz file."""
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(self.path / name, lambda f: f.write(buf.getvalue()))

    def load_arrays(self, name: str) -> dict:
        with reading(self.path / name), np.load(self.path / name, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def load_tensors(self, name: str, device="cpu") -> dict:
        from safetensors.torch import load_file

        path = self.path / name
        with reading(path):
            tensors = load_file(str(path), device=str(device))
        want = self.tensors_metadata(name).get(_CRC_KEY)
        if want is None or _tensors_crc(tensors) != want:
            raise damaged(path, "its tensors no longer match their checksum" if want is not None
                          else "it has no checksum (not written by this version of attrkernels)")
        return tensors

    def tensors_metadata(self, name: str) -> dict:
        """The string metadata saved with ``save_tensors``."""
        from safetensors import safe_open

        with reading(self.path / name), safe_open(str(self.path / name), "pt") as f:
            return dict(f.metadata() or {})


_CRC_KEY = "attrkernels_crc32"


def _tensors_crc(tensors: dict) -> str:
    """CRC-32 (hex) of the tensors' names, dtypes, shapes and bytes, in name order."""
    crc = 0
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        crc = zlib.crc32(f"{key}:{t.dtype}:{tuple(t.shape)}".encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


class ChunkedArray:
    """[n, k] array on disk (raw memmap) filled in chunks of ``chunk`` rows, resumably, with a
    CRC-32 and a training-data digest per chunk (see the module docstring)."""

    def __init__(self, path, n: int, k: int, chunk: int, dtype=np.float32, commit_seconds: float = 1.0):
        if n < 1 or k < 1 or chunk < 1:
            raise ValueError(f"ChunkedArray needs n, k, chunk >= 1, got {n}, {k}, {chunk}")
        self.path, self.n, self.k, self.chunk = Path(path), int(n), int(k), int(chunk)
        self.dtype = np.dtype(dtype)
        self.num_chunks = -(-self.n // self.chunk)
        self.mask_path = self.path.with_name(self.path.name + ".done.npy")
        self.sums_path = self.path.with_name(self.path.name + ".sums.npy")
        self.commit_seconds = commit_seconds
        self._staged, self._staged_since = set(), None
        self._lock = None
        self._load_state()

    def _load_state(self) -> None:
        done = np.zeros(self.num_chunks, bool)
        sums = np.zeros((self.num_chunks, 2), np.uint64)  # [crc32 of the chunk's bytes, data digest]
        if self.mask_path.exists():
            with reading(self.mask_path):
                done = np.load(self.mask_path, allow_pickle=False)
                if done.dtype != bool or done.ndim != 1:
                    raise ValueError(f"expected a boolean mask, found {done.dtype} {done.shape}")
            if done.shape != (self.num_chunks,):
                raise StoreMismatch(f"{self.mask_path} has {done.shape[0]} chunks, expected {self.num_chunks}")
            if done.any():
                if not self.sums_path.exists():
                    raise damaged(self.sums_path, "it is missing while chunks are marked done",
                                  f"delete {self.mask_path} to recompute the whole array")
                with reading(self.sums_path):
                    sums = np.load(self.sums_path, allow_pickle=False)
                    if sums.shape != (self.num_chunks, 2) or sums.dtype != np.uint64:
                        raise ValueError(f"expected uint64 [{self.num_chunks}, 2], found {sums.dtype} {sums.shape}")
        nbytes = self.n * self.k * self.dtype.itemsize
        size = self.path.stat().st_size if self.path.exists() else None
        if size is not None and size > nbytes:
            raise damaged(self.path, f"it has {size} bytes, more than the {nbytes} of a "
                                     f"[{self.n}, {self.k}] {self.dtype} array")
        if size != nbytes:
            lost = [i for i in range(self.num_chunks) if done[i] and self._end(i) > (size or 0)]
            if lost:
                warnings.warn(f"store file {self.path} is {'missing' if size is None else f'truncated to {size} bytes'}"
                              f": chunks {lost[:10]}{' ...' if len(lost) > 10 else ''} will be recomputed",
                              stacklevel=3)
                done[lost] = False
                write_npy(self.mask_path, done)
            with open(self.path, "ab") as f:
                f.truncate(nbytes)
        self._done, self._sums = done, sums
        self._written = int(self._done.sum())  # chunks done or staged

    def _end(self, i: int) -> int:
        return self.rows(i)[1] * self.k * self.dtype.itemsize

    def rows(self, i: int) -> tuple[int, int]:
        return i * self.chunk, min(self.n, (i + 1) * self.chunk)

    def missing(self) -> list[int]:
        return [i for i in range(self.num_chunks) if not self._done[i]]

    @property
    def complete(self) -> bool:
        return bool(self._done.all())

    def lock(self):
        """Hold the array's write lock until ``unlock`` (blocks while another process holds it,
        then rereads the done-mask that process wrote)."""
        if self._lock is None:
            self._lock = open(self.path.with_name(self.path.name + ".lock"), "a")
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            self._load_state()

    def unlock(self) -> None:
        if self._lock is not None:
            self.commit()
            self._lock.close()
            self._lock = None

    def check_data(self, i: int, digest: int) -> None:
        """Refuse when done chunk i was computed from other training examples."""
        if self._done[i] and int(self._sums[i, 1]) != int(digest):
            r0, r1 = self.rows(i)
            raise StoreMismatch(
                f"{self.path}: rows [{r0}, {r1}) were computed from other training examples than the "
                "loader yields now (another data set, order or augmentation); use another store "
                "directory for other data, or delete this one to start over")

    def write(self, i: int, values, data: int = 0) -> None:
        """Write chunk i (rows ``rows(i)``) computed from training examples with digest ``data``;
        it is marked done at the next commit, which happens once ``commit_seconds`` have passed
        since the oldest uncommitted chunk, or now when every chunk has been written."""
        r0, r1 = self.rows(i)
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if values.shape != (r1 - r0, self.k):
            raise ValueError(f"chunk {i} must have shape {(r1 - r0, self.k)}, got {values.shape}")
        with open(self.path, "r+b") as f:  # a positioned write: no mapped pages stay resident
            os.pwrite(f.fileno(), values.tobytes(), r0 * self.k * self.dtype.itemsize)
        self._sums[i] = (zlib.crc32(values.tobytes()), int(data))
        if not self._done[i] and i not in self._staged:
            self._written += 1
        self._staged.add(i)
        if self._staged_since is None:
            self._staged_since = time.monotonic()
        if self._written == self.num_chunks or time.monotonic() - self._staged_since >= self.commit_seconds:
            self.commit()

    def commit(self) -> None:
        """Flush and fsync the written chunks, write their checksums, then mark them done
        (atomic replacements, in that order)."""
        if not self._staged:
            return
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())
        write_npy(self.sums_path, self._sums)
        self._done[sorted(self._staged)] = True
        write_npy(self.mask_path, self._done)
        self._staged, self._staged_since = set(), None

    def corrupted(self) -> list[int]:
        """Done chunks whose bytes no longer match their CRC-32 (reads the whole array, a chunk
        at a time, so memory stays at one chunk)."""
        return [i for i in range(self.num_chunks) if self._done[i]
                and zlib.crc32(self.read_rows(*self.rows(i)).tobytes()) != int(self._sums[i, 0])]

    def verify(self, repair: bool) -> None:
        """Check every done chunk's CRC-32. ``repair``: mark damaged chunks missing (the caller
        recomputes them; a warning names the file); else raise StoreDamaged naming the file."""
        bad = self.corrupted()
        if not bad:
            return
        rows = [self.rows(i) for i in bad[:5]]
        if not repair:
            raise damaged(self.path, f"rows {rows} no longer match their checksums",
                          "run fit(...) again with the same data to recompute them")
        warnings.warn(f"store file {self.path}: rows {rows} no longer match their checksums and will "
                      "be recomputed", stacklevel=2)
        self._done[bad] = False
        self._written -= len(bad)
        write_npy(self.mask_path, self._done)

    def checksum(self) -> str:
        """A digest of the whole array's contents (from the per-chunk CRCs; complete arrays)."""
        return f"{zlib.crc32(self._sums[:, 0].tobytes()):08x}"

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) read into memory (a plain read, not a memory map: the pages of a
        large array read tile by tile never accumulate in the process's resident memory)."""
        if not 0 <= start <= stop <= self.n:
            raise ValueError(f"rows [{start}, {stop}) lie outside the {self.n} rows of {self.path}")
        count = (stop - start) * self.k
        out = np.fromfile(self.path, dtype=self.dtype, count=count, offset=start * self.k * self.dtype.itemsize)
        if out.size != count:
            raise damaged(self.path, f"it ends before row {stop}")
        return out.reshape(stop - start, self.k)

    def read(self, mode: str = "r") -> np.memmap:
        """The array as a memory map (complete or not)."""
        return np.memmap(self.path, dtype=self.dtype, mode=mode, shape=(self.n, self.k))
