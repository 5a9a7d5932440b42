"""CIFAR tasks on a tiny fake copy of the python batches (no real CIFAR needed)."""
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attrkernels.tasks import Recipe, get
from attrkernels.tasks.cifar import crop_flip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def fake_cifar(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                 b"labels": list(range(10))}
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)
    return tmp_path


def test_missing_copy_names_the_path_and_the_download(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTRKERNELS_CIFAR10", raising=False)
    with pytest.raises(FileNotFoundError, match="ATTRKERNELS_CIFAR10"):
        get("cifar10-resnet9")
    with pytest.raises(FileNotFoundError, match=f"root='{tmp_path}'.*cifar-10-python.tar.gz"):
        get("cifar2-resnet9", root=tmp_path)


def test_cifar10_and_cifar2_from_a_local_copy(fake_cifar, monkeypatch):
    monkeypatch.setenv("ATTRKERNELS_CIFAR10", str(fake_cifar))  # the parent directory works too
    ten = get("cifar10-resnet9", width=4, device="cpu")
    x, y = ten.train_data().tensors
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32 and y.tolist()[:10] == list(range(10))
    two = get("cifar2-resnet9", root=fake_cifar / "cifar-10-batches-py", width=4, device="cpu",
              recipe=Recipe(epochs=1, batch_size=4, lr=0.05, schedule="constant"))
    x2, y2 = two.train_data().tensors
    assert x2.shape == (10, 3, 32, 32) and y2.tolist() == [0, 1] * 5  # cat -> 0, dog -> 1
    assert len(two.test_data()) == 2 and two.config()["data"]["classes"] == [3, 5]
    model, saved = two.train(np.arange(8), seed=0, checkpoints=1)
    assert model(x2[:3]).shape == (3, 2) and len(saved) == 1
    assert ten.config_hash() != two.config_hash()


def test_crop_flip_matches_a_per_example_crop():
    x = torch.randn(5, 3, 32, 32)
    out = crop_flip(x, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 9, (5,), generator=g), torch.randint(0, 9, (5,), generator=g)
    flip = torch.rand(5, generator=g) < 0.5
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(5):
        expected = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        torch.testing.assert_close(out[i], expected.flip(2) if flip[i] else expected)
