"""The misuse battery: what an ordinary user does wrong, and what the library must do about it.

Every case either returns the correct result (compared with a fresh run or an autograd
reference) or raises an error that names the argument, file or example, and the fix. None may
return a silently wrong answer.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

import attrkernels as ak
from attrkernels.store import DataMismatch, StoreDamaged, StoreMismatch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK = ak.tasks.Classification()


def data(n=48, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) + shift
    return x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def loader(x, y, bs=8, **kwargs):
    return DataLoader(TensorDataset(x, y), batch_size=bs, **kwargs)


def make(name, model, store=None):
    if name == "trak":
        return ak.TRAK(model, TASK, k=16, store=store, verbose=False)
    if name == "ekfac":
        return ak.EKFAC(model, TASK, store=store, verbose=False)
    if name == "cg":
        return ak.InfluenceCG(model, TASK, damping=0.1, curvature="gauss-newton", verbose=False)
    if name == "tracin":
        return ak.TracIn(model, TASK, verbose=False)
    raise KeyError(name)


def fit(method, train, checkpoints=None):
    if isinstance(method, ak.TracIn):
        n = 1 if checkpoints is None or isinstance(checkpoints, dict) else len(checkpoints)
        return method.fit(train, checkpoints, learning_rates=[0.1] * n)
    return method.fit(train, checkpoints)


METHODS = ("trak", "ekfac", "cg", "tracin")


# ---------------------------------------------------------------------------------------------
# Stores


def test_trak_store_refuses_other_training_data_of_the_same_size(tmp_path):
    model = mlp()
    x, y = data()
    ak.TRAK(model, TASK, k=16, store=tmp_path, verbose=False).fit(loader(x, y))
    x2, y2 = data(seed=1)
    with pytest.raises(StoreMismatch, match="other training examples"):
        ak.TRAK(model, TASK, k=16, store=tmp_path, verbose=False).fit(loader(x2, y2))


def test_ekfac_store_refuses_data_that_differs_after_the_first_batch(tmp_path):
    model = mlp()
    x, y = data()
    test = loader(*data(16, seed=5))
    ak.EKFAC(model, TASK, store=tmp_path, verbose=False).fit(loader(x, y))
    x2 = x.clone()
    x2[40:] += 1.0
    with pytest.raises(StoreMismatch, match="training"):
        ak.EKFAC(model, TASK, store=tmp_path, verbose=False).fit(loader(x2, y)).score(test)


def _trak_scores(store, x, y, test):
    return ak.TRAK(mlp(), TASK, k=16, store=store, verbose=False).fit(loader(x, y)).score(test)


def test_trak_truncated_or_deleted_feature_file_is_recomputed_to_the_same_scores(tmp_path):
    x, y = data()
    test = loader(*data(16, seed=5))
    want = _trak_scores(tmp_path / "fresh", x, y, test)
    for damage in ("truncate", "delete", "flip"):
        store = tmp_path / damage
        _trak_scores(store, x, y, test)
        features = store / "train_0.f32"
        if damage == "truncate":
            with open(features, "r+b") as f:
                f.truncate(features.stat().st_size // 3)
        elif damage == "delete":
            features.unlink()
        else:
            raw = bytearray(features.read_bytes())
            raw[len(raw) // 2] ^= 0x40
            features.write_bytes(bytes(raw))
        with pytest.warns(UserWarning, match="recomputed"):
            got = _trak_scores(store, x, y, test)
        assert torch.equal(got, want), damage


def test_trak_score_without_fit_refuses_a_damaged_feature_file(tmp_path):
    x, y = data()
    test = loader(*data(16, seed=5))
    trak = ak.TRAK(mlp(), TASK, k=16, store=tmp_path, verbose=False).fit(loader(x, y))
    raw = bytearray((tmp_path / "train_0.f32").read_bytes())
    raw[100] ^= 0x01
    (tmp_path / "train_0.f32").write_bytes(bytes(raw))
    with pytest.raises(StoreDamaged, match=r"train_0\.f32.*fit"):
        trak.score(test)


@pytest.mark.parametrize("name", ["meta.json", "train_0.f32.done.npy", "train_0.f32.sums.npy", "kernel_0.npz"])
def test_trak_corrupted_store_files_name_the_file(tmp_path, name):
    x, y = data()
    ak.TRAK(mlp(), TASK, k=16, store=tmp_path, verbose=False).fit(loader(x, y))
    (tmp_path / name).write_bytes(b"\x00garbage")
    with pytest.raises(StoreDamaged, match=name.replace(".", r"\.")):
        ak.TRAK(mlp(), TASK, k=16, store=tmp_path, verbose=False).fit(loader(x, y)).score(loader(x[:4], y[:4]))


@pytest.mark.parametrize("stage", ["covariance", "eigen", "lambda"])
def test_ekfac_corrupted_factor_files_name_the_file(tmp_path, stage):
    x, y = data()
    ak.EKFAC(mlp(), TASK, store=tmp_path, verbose=False).fit(loader(x, y))
    (files,) = [list(tmp_path.glob(f"{stage}_*.safetensors"))]
    files[0].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(StoreDamaged, match=f"{stage}_.*safetensors"):
        ak.EKFAC(mlp(), TASK, store=tmp_path, verbose=False).fit(loader(x, y))


def test_ekfac_corrupted_meta_names_the_file(tmp_path):
    x, y = data()
    ak.EKFAC(mlp(), TASK, store=tmp_path, verbose=False).fit(loader(x, y))
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(StoreDamaged, match=r"meta\.json"):
        ak.EKFAC(mlp(), TASK, store=tmp_path, verbose=False).fit(loader(x, y))


# ---------------------------------------------------------------------------------------------
# Checkpoints and loaders


@pytest.mark.parametrize("name", METHODS)
def test_live_state_dict_as_a_checkpoint_is_not_overwritten(name):
    x, y = data()
    model = mlp()
    other = {k: v + 0.05 * torch.randn_like(v) for k, v in mlp(1).state_dict().items()}
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    test = loader(*data(8, seed=5))
    want = fit(make(name, mlp()), loader(x, y), [snapshot, other]).score(test)
    got = fit(make(name, model), loader(x, y), [model.state_dict(), other]).score(test)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_pickled_model_file_is_refused_clearly(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(mlp(), path)
    x, y = data()
    with pytest.raises((TypeError, ValueError), match=r"model\.pt.*state_dict"):
        ak.TRAK(mlp(), TASK, k=16, verbose=False).fit(loader(x, y), [path])


@pytest.mark.parametrize("name", METHODS)
def test_shuffled_train_loader_is_refused(name):
    x, y = data()
    shuffled = loader(x, y, shuffle=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises((ValueError, DataMismatch), match="shuffle"):
        fit(make(name, mlp()), shuffled).score(loader(*data(8, seed=5)))


@pytest.mark.parametrize("name", ["trak", "ekfac"])
def test_random_sampler_of_any_class_is_refused(name):
    x, y = data()
    sampler = SubsetRandomSampler(list(range(48)), generator=torch.Generator().manual_seed(0))
    with pytest.raises((ValueError, DataMismatch), match="shuffle|sampler"):
        fit(make(name, mlp()), loader(x, y, sampler=sampler)).score(loader(*data(8, seed=5)))


@pytest.mark.parametrize("name", METHODS)
def test_drop_last_is_refused_or_counted(name):
    x, y = data(50)
    with pytest.raises((ValueError, DataMismatch), match="drop_last"):
        fit(make(name, mlp()), loader(x, y, drop_last=True)).score(loader(*data(8, seed=5)))


@pytest.mark.parametrize("name", METHODS)
def test_one_shot_generator_gets_a_clear_message(name):
    x, y = data()
    gen = (b for b in list(loader(x, y)))
    with pytest.raises((ValueError, TypeError), match="generator|more than once|list"):
        fit(make(name, mlp()), gen).score(loader(*data(8, seed=5)))


# ---------------------------------------------------------------------------------------------
# Models


class KeyBiasAttention(nn.Module):
    """Single-head attention with q/k/v Linear layers that all have a bias (BERT-style): the key
    bias adds the same value to every score of a query, so its gradient is exactly zero."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = x.reshape(x.shape[0], 2, 3).repeat(1, 1, 2)  # [B, T=2, d=6]
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 6 ** 0.5, -1)
        return self.head((att @ self.v(x)).mean(1))


def _autograd_grads(model, fn, batch, names):
    params = dict(model.named_parameters())
    rows = []
    for b in range(batch[0].shape[0]):
        one = (batch[0][b:b + 1], batch[1][b:b + 1])
        g = torch.autograd.grad(fn(model, one).sum(), [params[n] for n in names], allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(params[n]) if gi is None else gi).reshape(-1)
                               for n, gi in zip(names, g)]))
    return torch.stack(rows)


def test_attention_with_a_key_bias_is_featurized_correctly():
    torch.manual_seed(0)
    model = KeyBiasAttention()
    x, y = data(8)
    names = [n for n, _ in model.named_parameters()]
    got = ak.capture.Gradients(model, TASK.measure)((x, y))
    want = _autograd_grads(model, TASK.measure, (x, y), names)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["trak", "tracin", "cg"])
def test_attention_with_a_key_bias_is_accepted_by_the_methods(name):
    torch.manual_seed(0)
    model = KeyBiasAttention()
    x, y = data(16)
    scores = fit(make(name, model), loader(x, y)).score(loader(*data(4, seed=5)))
    assert scores.shape == (16, 4) and torch.isfinite(scores).all()


def test_fallback_for_one_parameter_of_a_hooked_module_counts_it_once():
    model = mlp()
    x, y = data(8)
    names = [n for n, _ in model.named_parameters()]
    got = ak.capture.Gradients(model, TASK.loss, fallback=["0.bias"])((x, y))
    want = _autograd_grads(model, TASK.loss, (x, y), names)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    phi = ak.Featurizer(model, TASK.loss, 32, fallback=["0.bias"])((x, y))
    torch.testing.assert_close(phi, ak.sketch(want, 32), rtol=1e-4, atol=1e-5)


class SequenceFirst(nn.Module):
    """A Linear fed [T, B, d] (sequence first), as nn.RNN-style code does."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        seq = x.reshape(x.shape[0], 2, 3).transpose(0, 1)  # [T=2, B, 3]
        return self.head(self.proj(seq).tanh().mean(0))


@pytest.mark.parametrize("batch", [2, 8])  # B == T and B != T
def test_ekfac_on_sequence_first_input_is_right_or_refused(batch):
    torch.manual_seed(0)
    x, y = data(16)
    test = loader(*data(4, seed=5))
    try:
        got = ak.EKFAC(SequenceFirst(), TASK, fisher="empirical", verbose=False).fit(loader(x, y, batch)).score(test)
    except ValueError as err:
        assert "batch" in str(err) and "proj" in str(err)
        return
    torch.manual_seed(0)
    want = ak.EKFAC(SequenceFirst(), TASK, fisher="empirical", verbose=False).fit(loader(x, y, 16)).score(test)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_ekfac_refuses_batch_dependent_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 3))
    x, y = data()
    with pytest.raises(ValueError, match="BatchNorm"):
        ak.EKFAC(model, TASK, verbose=False).fit(loader(x, y))


def test_influence_on_a_model_without_forward_mode_ad_names_the_alternative():
    class LSTMNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.lstm(x.reshape(x.shape[0], 2, 3))[0][:, -1])

    torch.manual_seed(0)
    x, y = data(16)
    try:
        scores = ak.InfluenceCG(LSTMNet(), TASK, damping=0.1, verbose=False).fit(loader(x, y)).score(
            loader(*data(4, seed=5)))
    except (ValueError, RuntimeError, NotImplementedError) as err:
        assert "forward-mode" in str(err) and ("EKFAC" in str(err) or "TRAK" in str(err)), str(err)
        assert not isinstance(err, NotImplementedError) or "attrkernels" in str(err)
        return
    assert torch.isfinite(scores).all()


# ---------------------------------------------------------------------------------------------
# Arguments and diagnostics


@pytest.mark.parametrize("cls", [ak.TRAK, ak.EKFAC, ak.KFAC, ak.InfluenceCG])
@pytest.mark.parametrize("damping", [float("inf"), float("nan"), -1.0, "0.1"])
def test_damping_must_be_a_finite_non_negative_number(cls, damping):
    with pytest.raises(ValueError, match="damping"):
        cls(mlp(), TASK, damping=damping, verbose=False)


def test_trak_refuses_sizes_beyond_memory_before_writing(tmp_path):
    x, y = data()
    with pytest.raises((ValueError, MemoryError), match="k"):
        ak.TRAK(mlp(), TASK, k=10**6, store=tmp_path, verbose=False).fit(loader(x, y))
    assert not list(tmp_path.glob("train_*.f32"))


@pytest.mark.parametrize("name", METHODS)
def test_nan_input_names_the_global_example_index(name):
    x, y = data()
    x[21, 2] = float("nan")
    with pytest.raises(ValueError, match=r"\b21\b"):
        fit(make(name, mlp()), loader(x, y)).score(loader(*data(4, seed=5)))


@pytest.mark.parametrize("name", METHODS)
def test_nan_weights_name_the_checkpoint(name):
    x, y = data()
    bad = {k: v.clone() for k, v in mlp().state_dict().items()}
    bad["2.weight"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="checkpoint 1"):
        fit(make(name, mlp()), loader(x, y), [mlp().state_dict(), bad]).score(loader(*data(4, seed=5)))


@pytest.mark.parametrize("label", [3, -1, -100])
def test_labels_out_of_range_are_refused_with_the_example(label):
    x, y = data()
    y[13] = label
    with pytest.raises(ValueError, match=r"label.*\b13\b|\b13\b.*label"):
        ak.TRAK(mlp(), TASK, k=16, verbose=False).fit(loader(x, y))


@pytest.mark.parametrize("name", METHODS)
def test_checkpoints_are_snapshotted_at_fit(name):
    """Changing the caller's checkpoint tensors after fit changes no score."""
    x, y = data()
    test = loader(*data(8, seed=5))
    want = fit(make(name, mlp()), loader(x, y), [mlp(1).state_dict()]).score(test)
    sd = mlp(1).state_dict()
    method = fit(make(name, mlp()), loader(x, y), [sd])
    with torch.no_grad():
        for v in sd.values():
            v.add_(1.0)
    torch.testing.assert_close(method.score(test), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_ekfac_factor_file_damage_is_refused_or_recomputed(tmp_path, damage):
    x, y = data()
    test = loader(*data(8, seed=5))
    want = ak.EKFAC(mlp(), TASK, store=tmp_path, verbose=False).fit(loader(x, y)).score(test)
    (path,) = list(tmp_path.glob("lambda_*.safetensors"))
    if damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0x20  # a byte of the last tensor's data
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 16)
    else:
        path.unlink()
    method = ak.EKFAC(mlp(), TASK, store=tmp_path, verbose=False)
    if damage == "delete":  # the missing stage is recomputed, to the same scores
        torch.testing.assert_close(method.fit(loader(x, y)).score(test), want, rtol=0, atol=0)
        return
    with pytest.raises(StoreDamaged, match=r"lambda_.*\.safetensors is damaged"):
        method.fit(loader(x, y))
