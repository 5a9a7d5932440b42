"""kernels.columns.gather_columns: the parts' rows as contiguous columns, equal to the plain
transpose of their concatenation, through the C++ kernel and the torch fallback."""
import pytest
import torch

from attrkernels.capture.handlers.kron import stacked
from attrkernels.kernels import columns
from attrkernels.kernels.columns import gather_columns


def parts_of(sizes, shape=(5, 7), dtype=torch.float32):
    g = torch.Generator().manual_seed(len(sizes))
    return [torch.randn(c, *shape, generator=g).to(dtype) for c in sizes]


@pytest.mark.parametrize("sizes", [[1], [3], [1, 2, 1], [2] * 5, [4, 1]])
@pytest.mark.parametrize("shape", [(5, 7), (300,), (3, 257)])  # P below, at and past the kernel's 256-row tiles
def test_columns_equal_the_transposed_concatenation(sizes, shape):
    parts = parts_of(sizes, shape)
    want = torch.cat(parts).reshape(sum(sizes), -1).T
    got = gather_columns(parts, sum(sizes))
    assert got.is_contiguous() and got.shape == want.shape and torch.equal(got, want)


def test_the_fallback_and_non_contiguous_or_other_dtypes_give_the_same(monkeypatch):
    parts = parts_of([2, 3], (4, 300))
    want = gather_columns(parts, 5)
    monkeypatch.setattr(columns, "_native", lambda *a: False)
    assert torch.equal(gather_columns(parts, 5), want)
    monkeypatch.undo()
    views = [p.transpose(1, 2).contiguous().transpose(1, 2) for p in parts]  # same values, not contiguous
    assert torch.equal(gather_columns(views, 5), want)
    doubles = [p.double() for p in parts]
    assert torch.equal(gather_columns(doubles, 5), want.double())


def test_native_kernel_is_used_when_built():
    pytest.importorskip("attrkernels._C", reason="the C++ extension is not built")
    assert columns._native(parts_of([1]), torch.float32, torch.device("cpu"))


def test_bad_parts_are_refused_naming_the_problem():
    with pytest.raises(ValueError, match="at least one"):
        gather_columns([], 0)
    with pytest.raises(ValueError, match="rows, n is"):
        gather_columns(parts_of([2, 2]), 5)
    with pytest.raises(ValueError, match="trailing shape"):
        gather_columns([torch.zeros(1, 3), torch.zeros(1, 4)], 2)


def test_stacked_columns_is_a_view_of_the_columns_and_empties_the_list():
    parts = parts_of([2, 1, 3], (4, 6))
    want = torch.cat(parts)
    got = stacked(parts, 6, columns=True)
    assert parts == [] and torch.equal(got, want)
    assert got.reshape(6, -1).T.is_contiguous()
