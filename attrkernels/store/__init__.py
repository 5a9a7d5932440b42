"""On-disk state of methods: atomic writes, resumable chunked arrays, metadata checks."""
from .atomic import atomic_write, read_json, write_json, write_npy
from .directory import ChunkedArray, Store, StoreMismatch

__all__ = ["Store", "StoreMismatch", "ChunkedArray", "atomic_write", "read_json", "write_json", "write_npy"]
