"""On-disk state of methods: atomic writes, resumable chunked arrays, metadata checks."""
from .atomic import atomic_write, read_json, write_json, write_npy
from .directory import ChunkedArray, Store, StoreDamaged, StoreMismatch, damaged, reading
from .fingerprint import DataMismatch, DataPass, combine, example_digests

__all__ = ["Store", "StoreMismatch", "StoreDamaged", "damaged", "reading", "ChunkedArray", "DataPass",
           "DataMismatch", "combine", "example_digests", "atomic_write", "read_json", "write_json", "write_npy"]
