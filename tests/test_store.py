"""ChunkedArray: chunks are marked done only after their rows are on disk, in grouped commits."""
import numpy as np
import pytest

from attrkernels.store import ChunkedArray, StoreMismatch


def test_chunks_are_marked_done_at_commit_and_survive_reopening(tmp_path):
    path = tmp_path / "a.f32"
    arr = ChunkedArray(path, n=10, k=3, chunk=4, commit_seconds=3600.0)
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    arr.write(1, rows[4:8])
    assert ChunkedArray(path, 10, 3, 4).missing() == [0, 1, 2]  # staged, not committed
    arr.commit()
    again = ChunkedArray(path, 10, 3, 4)
    assert again.missing() == [0, 2] and np.array_equal(again.read()[4:8], rows[4:8])
    arr.write(0, rows[0:4])
    arr.write(2, rows[8:10])  # the last missing chunk: commits everything
    done = ChunkedArray(path, 10, 3, 4)
    assert done.complete and np.array_equal(done.read(), rows)


def test_commit_interval_zero_commits_every_chunk(tmp_path):
    arr = ChunkedArray(tmp_path / "a.f32", n=8, k=2, chunk=2, commit_seconds=0.0)
    arr.write(3, np.ones((2, 2)))
    assert ChunkedArray(tmp_path / "a.f32", 8, 2, 2).missing() == [0, 1, 2]


def test_bad_chunk_shape_and_mismatched_mask(tmp_path):
    arr = ChunkedArray(tmp_path / "a.f32", n=8, k=2, chunk=2)
    with pytest.raises(ValueError, match="chunk 0 must have shape"):
        arr.write(0, np.ones((3, 2)))
    arr.write(0, np.ones((2, 2)))
    arr.commit()
    with pytest.raises(StoreMismatch, match="chunks"):
        ChunkedArray(tmp_path / "a.f32", n=8, k=2, chunk=4)
