"""Atomic file writes: write a temporary file next to the target, fsync, then rename over it.

A reader, or a rerun after ``kill -9``, sees either the whole new file or the old one (or none),
never a torn write. Temporary names end in ``.tmp.<pid>`` and are ignored by readers.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np


def atomic_write(path, write) -> None:
    """Call ``write(binary_file)`` on a temporary file, fsync it and move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path, obj) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    atomic_write(path, lambda f: f.write(data))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_npy(path, array) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
