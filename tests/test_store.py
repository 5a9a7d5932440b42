"""ChunkedArray: chunks are marked done only after their rows are on disk, in grouped commits."""
import numpy as np
import pytest

from attrkernels.store import ChunkedArray, StoreDamaged, StoreMismatch


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


# Integrity: truncation, deletion, bit flips, unreadable files, other data, one writer at a time

def _filled(path, n=10, k=3, chunk=4, data=7):
    arr = ChunkedArray(path, n=n, k=k, chunk=chunk)
    rows = np.arange(n * k, dtype=np.float32).reshape(n, k)
    for i in range(arr.num_chunks):
        arr.write(i, rows[slice(*arr.rows(i))], data=data)
    assert arr.complete
    return rows


def test_truncated_data_file_loses_only_the_chunks_it_no_longer_holds(tmp_path):
    path = tmp_path / "a.f32"
    _filled(path)
    with open(path, "r+b") as f:
        f.truncate(5 * 3 * 4)  # rows 0..4 survive: chunk 0 intact, chunk 1 cut
    with pytest.warns(UserWarning, match="truncated"):
        arr = ChunkedArray(path, 10, 3, 4)
    assert arr.missing() == [1, 2]
    assert path.stat().st_size == 10 * 3 * 4


def test_deleted_data_file_is_recomputed_not_read_as_zeros(tmp_path):
    path = tmp_path / "a.f32"
    _filled(path)
    path.unlink()
    with pytest.warns(UserWarning, match="missing"):
        assert ChunkedArray(path, 10, 3, 4).missing() == [0, 1, 2]


def test_flipped_bit_is_found_and_repaired_or_refused(tmp_path):
    path = tmp_path / "a.f32"
    rows = _filled(path)
    raw = bytearray(path.read_bytes())
    raw[4 * 3 * 4 + 1] ^= 0x10  # a byte of row 4 (chunk 1)
    path.write_bytes(bytes(raw))
    arr = ChunkedArray(path, 10, 3, 4)
    assert arr.corrupted() == [1]
    with pytest.raises(StoreDamaged, match=r"a\.f32 is damaged.*rows \[\(4, 8\)\]"):
        arr.verify(repair=False)
    with pytest.warns(UserWarning, match="recomputed"):
        arr.verify(repair=True)
    assert arr.missing() == [1]
    arr.write(1, rows[4:8], data=7)
    assert ChunkedArray(path, 10, 3, 4).corrupted() == []


@pytest.mark.parametrize("suffix,content", [(".done.npy", b"garbage"), (".sums.npy", b"\x93NUMPY"),
                                            (".done.npy", b"")])
def test_unreadable_chunk_tables_name_the_file(tmp_path, suffix, content):
    path = tmp_path / "a.f32"
    _filled(path)
    (tmp_path / ("a.f32" + suffix)).write_bytes(content)
    with pytest.raises(StoreDamaged, match=f"a.f32{suffix}".replace(".", r"\.")):
        ChunkedArray(path, 10, 3, 4)


def test_chunks_of_other_training_data_are_refused(tmp_path):
    path = tmp_path / "a.f32"
    _filled(path, data=7)
    arr = ChunkedArray(path, 10, 3, 4)
    arr.check_data(0, 7)
    with pytest.raises(StoreMismatch, match=r"rows \[0, 4\) were computed from other training examples"):
        arr.check_data(0, 8)


def test_unreadable_metadata_files_name_the_file(tmp_path):
    from attrkernels.store import Store

    Store(tmp_path, {"kind": "x"})
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(StoreDamaged, match=r"meta\.json is damaged: JSONDecodeError"):
        Store(tmp_path, {"kind": "x"})
    store = Store(tmp_path / "b", {"kind": "x"})
    (tmp_path / "b" / "k.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(StoreDamaged, match=r"k\.npz is damaged"):
        store.load_arrays("k.npz")
    (tmp_path / "b" / "f.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(StoreDamaged, match=r"f\.safetensors is damaged"):
        store.load_tensors("f.safetensors")
    with pytest.raises(StoreDamaged, match=r"missing\.npz is damaged: it is missing"):
        store.load_arrays("missing.npz")


def test_second_writer_waits_for_the_first_and_sees_its_chunks(tmp_path):
    import threading

    path = tmp_path / "a.f32"
    first = ChunkedArray(path, 10, 3, 4)
    first.lock()
    second = ChunkedArray(path, 10, 3, 4)
    seen = []
    t = threading.Thread(target=lambda: (second.lock(), seen.append(second.missing()), second.unlock()))
    t.start()
    t.join(0.3)
    assert t.is_alive()  # blocked while the first holds the lock
    for i in range(3):
        first.write(i, np.zeros(first.rows(i)[1] - first.rows(i)[0]) [:, None].repeat(3, 1), data=1)
    first.unlock()
    t.join(5)
    assert seen == [[]]
