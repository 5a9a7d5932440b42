"""Built-in task protocol, registry, training recipe and the digits-mlp task."""
import json

import numpy as np
import pytest
import torch

from attrkernels.tasks import Benchmark, Classification, Recipe, available, get, register
from attrkernels.tasks.training import checkpoint_epochs, split_seed


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_registry():
    assert {"digits-mlp", "mnist1d-cnn", "cifar10-resnet9", "cifar2-resnet9"} <= set(available())
    with pytest.raises(KeyError, match="unknown task 'nope'; available: cifar10-resnet9"):
        get("nope")


def test_user_task_plugs_in():
    @register
    class Mine(Benchmark):
        name = "test-mine"

        def __init__(self, k=1):
            self.k = k

    assert "test-mine" in available() and get("test-mine", k=3).k == 3
    with pytest.raises(TypeError, match="Benchmark subclass"):
        register(int)


def test_digits_data_split_and_standardisation():
    task = get("digits-mlp")
    x, y = task.train_data().tensors
    xt, yt = task.test_data().tensors
    assert x.shape == (1000, 64) and xt.shape == (300, 64) and x.dtype == torch.float32
    assert y.dtype == torch.long and set(y.tolist()) == set(range(10))
    assert x.mean(0).abs().max() < 1e-5
    torch.testing.assert_close(get("digits-mlp").train_data().tensors[0], x)
    assert isinstance(task.task, Classification)
    assert sum(p.numel() for p in task.make_model(0).parameters()) == 26122
    config = task.config()
    assert json.loads(json.dumps(config)) == config and config["recipe"]["epochs"] == 40
    assert task.config_hash() == get("digits-mlp").config_hash()
    assert task.config_hash() != get("digits-mlp", hidden=64).config_hash()
    train_loader, test_loader = task.loaders(batch_size=128)
    torch.testing.assert_close(next(iter(train_loader))[0], x[:128])
    assert sum(len(b[1]) for b in test_loader) == 300


def test_digits_training_is_seeded_accurate_and_checkpointed():
    task = get("digits-mlp")
    x, y = task.test_data().tensors
    model_a, saved = task.train(np.arange(500), seed=1, checkpoints=4)
    model_b, _ = task.train(np.arange(500), seed=1)
    model_c, _ = task.train(np.arange(500), seed=2)
    out_a, out_b, out_c = (m(x).detach() for m in (model_a, model_b, model_c))
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    assert not torch.equal(out_a, out_c)
    assert (out_a.argmax(1) == y).float().mean() > 0.9
    assert [c.epoch for c in saved] == [10, 20, 30, 40]
    lrs = [c.lr for c in saved]
    assert lrs == sorted(lrs, reverse=True) and 0 < lrs[-1] < 0.01  # linear decay to ~0
    for key, value in model_a.state_dict().items():
        torch.testing.assert_close(saved[-1].state_dict[key], value, rtol=0, atol=0)


def test_training_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    get("digits-mlp", recipe=Recipe(epochs=1, batch_size=100, lr=0.1)).train(np.arange(100), seed=5)
    torch.testing.assert_close(torch.rand(3), expected)


def test_recipe_schedules_and_validation():
    tri = Recipe(epochs=4, batch_size=1, lr=1.0, schedule="triangle", peak_epoch=1)
    assert tri.learning_rate(0, 10) == pytest.approx(0.05)
    assert tri.learning_rate(9, 10) == pytest.approx(0.95)
    assert tri.learning_rate(39, 10) == pytest.approx(0.5 / 30)
    assert Recipe(epochs=2, batch_size=1, lr=0.5, schedule="constant").learning_rate(7, 4) == 0.5
    with pytest.raises(ValueError, match="Recipe.optimizer"):
        Recipe(epochs=1, batch_size=1, lr=1.0, optimizer="lbfgs")
    with pytest.raises(ValueError, match="peak_epoch"):
        Recipe(epochs=3, batch_size=1, lr=1.0, schedule="triangle")
    assert checkpoint_epochs(10, 3) == [3, 7, 10]
    with pytest.raises(ValueError, match="checkpoints"):
        checkpoint_epochs(3, 4)
    assert split_seed(0) != split_seed(1)
    with pytest.raises(ValueError, match="seed"):
        split_seed(-1)


def test_train_rejects_bad_indices():
    task = get("digits-mlp")
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 1000\)"):
        task.train(np.array([0, 1000]), seed=0)


def test_digits_short_is_digits_stopped_early():
    full, short = get("digits-mlp"), get("digits-mlp-short")
    assert short.recipe.epochs == 6 and full.recipe.epochs == 40
    assert short.recipe == type(full.recipe)(**{**full.recipe.__dict__, "epochs": 6})
    for a, b in zip(full.train_data().tensors + full.test_data().tensors,
                    short.train_data().tensors + short.test_data().tensors):
        assert torch.equal(a, b)
    assert str(full.make_model(0)) == str(short.make_model(0))
    assert short.config_hash() != full.config_hash()  # separate ground truths and checkpoint caches
    _, ckpts = short.train(np.arange(200), 0, checkpoints=6)
    assert [c.epoch for c in ckpts] == [1, 2, 3, 4, 5, 6]
    assert sum(c.steps for c in ckpts) == 6 * 2  # 200 examples in batches of 128
