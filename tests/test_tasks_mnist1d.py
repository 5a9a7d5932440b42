"""mnist1d-cnn: generated data (no download) and a short training run."""
import numpy as np
import pytest
import torch

from attrkernels.tasks import Recipe, get

pytest.importorskip("mnist1d")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_data_model_and_training():
    state = np.random.get_state()
    task = get("mnist1d-cnn")
    x, y = task.train_data().tensors
    xt, yt = task.test_data().tensors
    assert np.array_equal(np.random.get_state()[1], state[1])  # generator seeds are restored
    assert x.shape == (4000, 1, 40) and xt.shape == (1000, 1, 40)
    assert set(y.tolist()) == set(range(10)) and yt.dtype == torch.long
    assert task.config()["data"]["n_train"] == 4000
    quick = get("mnist1d-cnn", recipe=Recipe(epochs=2, batch_size=100, lr=0.05))
    quick.cached("arrays", lambda: task.cached("arrays", task.arrays))  # reuse the generated signals
    model, saved = quick.train(np.arange(400), seed=0, checkpoints=2)
    assert model(xt[:5]).shape == (5, 10) and [c.epoch for c in saved] == [1, 2]
