"""The on-disk ground-truth directory of an LDS protocol (versioned, resumable, atomic).

Layout (format version 1)::

    <directory>/
      meta.json            format version, task name/config/config hash, protocol, sizes
      masks.npy            bool [m, n_train]: row j = training subset S_j
      outputs/
        s000007_r002.npz   one per finished model: ``measure`` float64 [n_test] (the task's
                           measurement of every test example) and ``seconds`` (training time)

Every file is written with ``attrkernels.store.atomic_write`` (temporary name, fsync,
``os.replace``), so a reader (or a rerun after ``kill -9``) sees either the whole file or none.
A model's file is written by the process that trained it as soon as it finishes; a file that
exists is never recomputed. Temporary files of a killed run (``*.tmp.<pid>``) are ignored.

Opening an existing directory for a task whose config hash, protocol, format version or data
sizes differ raises ``GroundTruthMismatch`` naming what differs.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..store import StoreMismatch, atomic_write, read_json, write_json, write_npy

FORMAT_VERSION = 1
KIND = "attrkernels-lds-ground-truth"
COMPARED = ("format_version", "task_config_hash", "protocol", "n_train", "n_test", "subset_size")


class GroundTruthMismatch(StoreMismatch):
    """A ground-truth directory was made for another task config, protocol or format."""


def output_path(directory: Path, subset: int, run: int) -> Path:
    return Path(directory) / "outputs" / f"s{subset:06d}_r{run:03d}.npz"


def save_output(directory: Path, subset: int, run: int, measure: np.ndarray, seconds: float) -> None:
    """Atomically store the measurement [n_test] of model ``run`` on subset ``subset``."""
    atomic_write(output_path(directory, subset, run),
                 lambda f: np.savez(f, measure=np.asarray(measure, dtype=np.float64),
                                    seconds=np.float64(seconds)))


def make_meta(benchmark, protocol, n_train: int, n_test: int) -> dict:
    """The meta.json content of a ground truth for ``benchmark`` (a ``tasks.Benchmark``) under
    ``protocol`` (its keys keep the name ``task_*`` that existing stores carry)."""
    return {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "task_name": getattr(benchmark, "name", type(benchmark).__name__),
        "task_class": f"{type(benchmark).__module__}.{type(benchmark).__qualname__}",
        "task_config": benchmark.config(),
        "task_config_hash": benchmark.config_hash(),
        "protocol": protocol.to_dict(),
        "n_train": int(n_train),
        "n_test": int(n_test),
        "subset_size": protocol.subset_size(n_train),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": {"python": platform.python_version(), "numpy": np.__version__,
                        "torch": torch.__version__},
    }


def _config_diff(old, new, prefix="") -> list[str]:
    """Human-readable differences between two nested JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{where}: absent in the directory, {new[key]!r} now")
            elif key not in new:
                out.append(f"{where}: {old[key]!r} in the directory, absent now")
            else:
                out += _config_diff(old[key], new[key], where)
        return out
    return [] if old == new else [f"{prefix or 'value'}: {old!r} in the directory, {new!r} now"]


def check_meta(directory: Path, stored: dict, wanted: dict) -> None:
    """Raise ``GroundTruthMismatch`` listing every compared field where ``stored`` != ``wanted``."""
    if stored.get("kind") != KIND:
        raise GroundTruthMismatch(f"{directory} is not an attrkernels ground-truth directory "
                                  f"(meta.json kind = {stored.get('kind')!r})")
    problems = []
    for key in COMPARED:
        if stored.get(key) == wanted[key]:
            continue
        if key == "task_config_hash":
            diff = _config_diff(stored.get("task_config"), wanted["task_config"])
            detail = "; ".join(diff) if diff else "configs serialise differently"
            problems.append(f"task config ({detail})")
        else:
            problems.append(f"{key} ({stored.get(key)!r} in the directory, {wanted[key]!r} now)")
    if problems:
        raise GroundTruthMismatch(
            f"ground-truth directory {str(directory)!r} was made for task "
            f"{stored.get('task_name')!r} with a different " + ", ".join(problems)
            + ". Its outputs do not answer this request: use another directory, or delete this "
            "one to rebuild it."
        )


def open_store(directory, meta: dict, masks: np.ndarray) -> Path:
    """Create ``directory`` for ``meta`` and ``masks``, or check that an existing one matches."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if meta_path.exists():
        check_meta(directory, read_json(meta_path), meta)
        stored = np.load(directory / "masks.npy")
        if not np.array_equal(stored, masks):
            raise GroundTruthMismatch(f"{directory}/masks.npy differs from the protocol's subsets; "
                                      "the directory was edited or corrupted: delete it to rebuild")
        return directory
    (directory / "outputs").mkdir(parents=True, exist_ok=True)
    write_npy(directory / "masks.npy", masks)
    write_json(meta_path, meta)
    return directory


@dataclass
class GroundTruth:
    """Retraining ground truth of an LDS protocol as stored in ``directory``.

    ``masks`` bool [m, n_train]; ``outputs`` float64 [m, r, n_test], the measurement of every
    test example by model k on subset j (NaN where that model is not trained yet); ``seconds``
    [m, r] training time of each model (NaN where missing); ``meta`` the meta.json content.
    """

    directory: Path
    meta: dict
    masks: np.ndarray
    outputs: np.ndarray
    seconds: np.ndarray

    @classmethod
    def load(cls, directory) -> "GroundTruth":
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no ground truth at {str(directory)!r} (meta.json missing)")
        meta = read_json(meta_path)
        if meta.get("kind") != KIND or meta.get("format_version") != FORMAT_VERSION:
            raise GroundTruthMismatch(
                f"{directory} has kind {meta.get('kind')!r}, format version "
                f"{meta.get('format_version')!r}; this attrkernels reads {KIND!r} version {FORMAT_VERSION}")
        masks = np.load(directory / "masks.npy")
        m, r = meta["protocol"]["m"], meta["protocol"]["r"]
        outputs = np.full((m, r, meta["n_test"]), np.nan)
        seconds = np.full((m, r), np.nan)
        for j in range(m):
            for k in range(r):
                path = output_path(directory, j, k)
                if path.exists():
                    with np.load(path) as f:
                        outputs[j, k] = f["measure"]
                        seconds[j, k] = f["seconds"]
        return cls(directory, meta, masks, outputs, seconds)

    @property
    def done(self) -> np.ndarray:
        """bool [m, r]: which models are trained."""
        return ~np.isnan(self.seconds)

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def mean_outputs(self) -> np.ndarray:
        """Seed-averaged outputs [m, n_test]; raises if any model is missing."""
        if not self.complete:
            missing = int((~self.done).sum())
            raise ValueError(f"ground truth at {str(self.directory)!r} is incomplete: {missing} of "
                             f"{self.done.size} models missing; rerun build_ground_truth to finish it")
        return self.outputs.mean(axis=1)

    def train_seconds(self) -> float:
        """Total training time of the stored models (sum over models of one-core seconds)."""
        return float(np.nansum(self.seconds))
