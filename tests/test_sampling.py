import pytest
import torch

from attrkernels.tasks import sampling
from attrkernels.tasks.sampling import sample_categorical


def test_draws_follow_the_softmax_and_never_take_a_class_of_probability_zero():
    z = torch.tensor([0.0, 1.0, -1.0, -float("inf"), 2.0, -30.0])
    n = 400_000
    drawn = sample_categorical(z.repeat(n, 1), torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=6).double() / n
    p = torch.softmax(z.double(), 0)
    assert freq[3] == 0
    # binomial standard error sqrt(p (1 - p) / n) <= 8e-4: 5 of them
    assert torch.allclose(freq, p, atol=4e-3, rtol=0)


def test_each_row_uses_its_own_logits():
    z = torch.full((6, 4), -float("inf"))
    z[torch.arange(6), torch.tensor([0, 3, 1, 2, 3, 0])] = 0.0  # one class of probability 1 per row
    assert sample_categorical(z, torch.Generator().manual_seed(1)).tolist() == [0, 3, 1, 2, 3, 0]


def test_same_generator_seed_same_draws_and_chunks_do_not_change_them(monkeypatch):
    z = torch.randn(257, 50)
    a = sample_categorical(z, torch.Generator().manual_seed(3))
    assert torch.equal(a, sample_categorical(z, torch.Generator().manual_seed(3)))
    monkeypatch.setattr(sampling, "CHUNK_BYTES", 8 * 50 * 7)  # 7 rows a chunk
    assert torch.equal(a, sample_categorical(z, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, sample_categorical(z, torch.Generator().manual_seed(4)))


def test_non_finite_logits_are_refused_with_their_rows():
    z = torch.zeros(5, 3)
    z[2, 1] = float("nan")
    with pytest.raises(RuntimeError, match=r"rows \[2\]"):
        sample_categorical(z, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="logits must have shape"):
        sample_categorical(torch.zeros(3), torch.Generator())
