"""Featurizer against per-example gradients computed one example at a time with autograd.

Tolerances: materialised gradients within 1e-5 of the largest entry; dense features within 1e-5
(relative to the largest feature) of sketch(reference gradients); factored features within 1e-5
of the explicit Kronecker formula.
"""
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attrkernels as ak
from attrkernels.kernels.philox import derive_seed

task = ak.tasks.Classification()


def example(batch, b):
    return tuple(v[b:b + 1] for v in batch)


def reference_gradients(model, output_fn, batch, names=None):
    """[B, p]: one backward per example, tracked parameters in named_parameters() order."""
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)]
    rows = []
    for b in range(batch[0].shape[0]):
        out = output_fn(model, example(batch, b)).sum()
        gs = torch.autograd.grad(out, [p for _, p in named], allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for (_, p), g in zip(named, gs)]))
    return torch.stack(rows)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# Models


def mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 5))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, (3, 2), dilation=(2, 1), padding="same", padding_mode="reflect")
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


class CNN1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(6, 6, 3, dilation=2, groups=3, padding=2, padding_mode="circular")
        self.gn = nn.GroupNorm(3, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.gn(self.c2(x)))
        return self.fc(x.mean(-1))


class EmbeddingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8, padding_idx=0)
        self.fc = nn.Linear(8, 4)

    def forward(self, idx):
        return self.fc(torch.tanh(self.emb(idx)).mean(1))


class Block(nn.Module):
    """Pre-norm transformer block with F.scaled_dot_product_attention and a learned position table."""

    def __init__(self, vocab=40, d=16, heads=2, T=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.1)  # plain parameter: torch.func fallback
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, classes)
        self.heads = heads

    def forward(self, idx):
        x = self.emb(idx) + self.pos
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, d))
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


def batch_for(model, B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, nn.Sequential):
        x = torch.randn(B, 12, generator=g)
        classes = 5
    elif isinstance(model, CNN):
        x, classes = torch.randn(B, 3, 12, 12, generator=g), 4
    elif isinstance(model, CNN1d):
        x, classes = torch.randn(B, 2, 30, generator=g), 3
    elif isinstance(model, EmbeddingModel):
        x, classes = torch.randint(0, 50, (B, 7), generator=g), 4
        x[0, :3] = 0  # padding positions
    else:
        x, classes = torch.randint(0, 40, (B, 6), generator=g), 3
    return x, torch.randint(0, classes, (B,), generator=g)


def trained_bn(model):
    """Give BatchNorms non-trivial running statistics."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model


MODELS = {"mlp": mlp, "cnn2d_bn": lambda: trained_bn(CNN()), "cnn1d": CNN1d,
          "embedding": EmbeddingModel, "transformer_sdpa": Block}


@pytest.fixture(params=list(MODELS))
def model_and_batch(request):
    torch.manual_seed(1)
    model = MODELS[request.param]()
    return model, batch_for(model)


# ---------------------------------------------------------------------------------------------
# Dense mode


def test_gradients_equal_reference(model_and_batch):
    model, batch = model_and_batch
    fz = ak.Featurizer(model, task.measure, 64)
    assert rel(fz.gradients(batch), reference_gradients(model, task.measure, batch)) < 1e-5


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_dense_equals_sketch_of_gradient(model_and_batch, kind):
    model, batch = model_and_batch
    fz = ak.Featurizer(model, task.measure, 200, seed=11, kind=kind)
    want = ak.sketch(reference_gradients(model, task.measure, batch), 200, seed=11, kind=kind)
    assert rel(fz(batch), want) < 1e-5


def test_loss_gradients():
    torch.manual_seed(0)
    model = CNN1d()
    batch = batch_for(model)
    fz = ak.Featurizer(model, task.loss, 100, seed=2)
    want = ak.sketch(reference_gradients(model, task.loss, batch), 100, seed=2)
    assert rel(fz(batch), want) < 1e-5


def test_subset_of_parameters():
    torch.manual_seed(0)
    model = Block()
    batch = batch_for(model)
    names = ["qkv.weight", "ln2.bias", "pos", "head.weight"]
    fz = ak.Featurizer(model, task.measure, 128, seed=5, params=names)
    assert fz.num_params == sum(dict(model.named_parameters())[n].numel() for n in names)
    want = ak.sketch(reference_gradients(model, task.measure, batch, names), 128, seed=5)
    assert rel(fz(batch), want) < 1e-5


def test_memory_budget_bounds_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    budget = 64 << 10  # far below B * p * 4 = 2.4 MB
    fz = ak.Featurizer(model, task.measure, 64, memory_budget=budget)
    phi = fz((x, y))
    assert 0 < fz.peak_bytes <= budget
    want = ak.sketch(reference_gradients(model, task.measure, (x, y)), 64)
    assert rel(phi, want) < 1e-5


@pytest.mark.parametrize("budget", [None, 4 << 10])
def test_conv_gradients_by_grouped_convolution_and_by_unfolding_agree_with_reference(budget):
    """A wide shallow convolution (T = 64 positions > 4 channels: grouped weight-gradient
    convolution) and a narrow deep one (T = 4 <= 16 channels: unfold + batched GEMM); a small
    budget splits both into blocks of output channels."""
    from attrkernels.kernels.conv_grad import direct_preferred

    torch.manual_seed(0)
    wide, deep = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 16, 3, stride=4, padding=1, bias=False)
    model = nn.Sequential(wide, nn.ReLU(), deep, nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
    assert direct_preferred(wide, 64) and not direct_preferred(deep, 4)
    batch = (torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,)))
    kw = {} if budget is None else {"memory_budget": budget}
    fz = ak.Featurizer(model, task.measure, 96, seed=2, **kw)
    ref = reference_gradients(model, task.measure, batch)
    assert rel(fz.gradients(batch), ref) < 1e-5
    assert rel(fz(batch), ak.sketch(ref, 96, seed=2)) < 1e-5
    if budget is not None:
        assert 0 < fz.peak_bytes <= budget


def test_batchnorm_model_left_in_train_mode_is_restored():
    model = trained_bn(CNN()).train()
    batch = batch_for(model)
    ak.Featurizer(model, task.measure, 32)(batch)
    assert model.training


def test_features_do_not_depend_on_batch_composition():
    torch.manual_seed(0)
    model = EmbeddingModel()
    x, y = batch_for(model, B=8)
    fz = ak.Featurizer(model, task.measure, 64, seed=1)
    full = fz((x, y))
    part = fz((x[2:5], y[2:5]))
    assert rel(part, full[2:5]) < 1e-5


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_triton_backend_on_a_tiny_model():
    # Triton serves CUDA tensors, and CPU tensors only under its interpreter (set without a GPU).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    x, y = torch.randn(4, 6, device=device), torch.randint(0, 3, (4,), device=device)
    fz = ak.Featurizer(model, task.measure, 40, seed=3, kind="gaussian", backend="triton")
    want = ak.sketch(reference_gradients(model, task.measure, (x, y)), 40, seed=3, kind="gaussian")
    assert rel(fz((x, y)), want) < 1e-5


# ---------------------------------------------------------------------------------------------
# Factored mode


def kron_reference(fz, model, batch):
    """Explicit formula: vec(P_out^T G_b P_in) per layer, the rest sketched densely."""
    g = reference_gradients(model, task.measure, batch)
    B = g.shape[0]
    params = dict(model.named_parameters())
    phi = torch.zeros(B, fz.k)
    for layer in fz._kron:
        name = fz.plan.name_of(layer.param)
        off = fz.plan.offsets[id(params[name])]
        w = params[name]
        d_out, d_in = w.shape[0], w[0].numel()
        G = g[:, off:off + w.numel()].reshape(B, d_out, d_in).double()
        P_in = ak.sketch_matrix(d_in, layer.k_in, seed=layer.seed_in).double()
        P_out = ak.sketch_matrix(d_out, layer.k_out, seed=layer.seed_out).double()
        F_ = torch.einsum("ok,boi,ij->bkj", P_out, G, P_in).reshape(B, -1)[:, :layer.share]
        phi[:, layer.col0:layer.col0 + layer.share] = (F_ * math.sqrt(layer.k_in * layer.k_out / layer.share)).float()
    if fz._rest:
        rest = torch.cat([g[:, fz.plan.offsets[id(p)]:fz.plan.offsets[id(p)] + p.numel()] for _, p in fz._rest], 1)
        phi[:, fz._rest_col:] = ak.sketch(rest, fz._rest_k, seed=fz._rest_seed)
    return phi


@pytest.mark.parametrize("name", ["mlp", "cnn2d_bn", "transformer_sdpa"])
def test_factored_equals_kronecker_reference(name):
    torch.manual_seed(2)
    model = MODELS[name]()
    batch = batch_for(model)
    fz = ak.Featurizer(model, task.measure, 300, seed=4, mode="factored")
    assert len(fz._kron) >= 2
    assert rel(fz(batch), kron_reference(fz, model, batch)) < 1e-5


def test_factored_layout():
    model = mlp()
    fz = ak.Featurizer(model, task.measure, 1000, seed=4, mode="factored")
    shares = [l.share for l in fz._kron] + [fz._rest_k]
    assert sum(shares) == 1000 and max(shares) - min(shares) <= 1
    assert all(l.k_in * l.k_out >= l.share for l in fz._kron)
    assert fz._kron[0].seed_in == derive_seed(4, 0) and fz._kron[0].seed_out == derive_seed(4, 1)
    with pytest.raises(ValueError, match="smaller than the 4 feature groups"):
        ak.Featurizer(model, task.measure, 3, mode="factored")


def test_factored_preserves_inner_products_on_average():
    # E <phi_a, phi_b> = <g_a, g_b> for the Kronecker projection: check over seeds.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 6))
    batch = (torch.randn(5, 20), torch.randint(0, 6, (5,)))
    g = reference_gradients(model, task.measure, batch, names=["0.weight", "2.weight"])
    est = torch.stack([
        (lambda p: p @ p.T)(ak.Featurizer(model, task.measure, 512, seed=s, mode="factored",
                                          params=["0.weight", "2.weight"])(batch))
        for s in range(20)
    ]).mean(0)
    assert rel(est, g @ g.T) < 0.15


# ---------------------------------------------------------------------------------------------
# Bad input


def test_no_trainable_parameters():
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ak.Featurizer(model, task.measure, 8)


def test_output_of_wrong_shape():
    model = mlp()
    fz = ak.Featurizer(model, lambda m, b: m(b[0]), 8)
    with pytest.raises(ValueError, match=r"one value per example, a tensor of shape \[6\]"):
        fz(batch_for(model))


def test_parameter_without_gradient():
    model = nn.Sequential(nn.Linear(12, 5), nn.Linear(5, 5))
    fz = ak.Featurizer(model, lambda m, b: task.measure(m[0], b), 8)
    with pytest.raises(ValueError, match="received no gradient"):
        fz(batch_for(mlp()))


def test_non_finite_gradients_name_examples():
    model = mlp()
    x, y = batch_for(model)
    x[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf for examples \[3\]"):
        ak.Featurizer(model, task.measure, 8)((x, y))

    class InfGradForExample2(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return v.clone()

        @staticmethod
        def backward(ctx, g):
            g = g.clone()
            g[2] = float("inf")
            return g

    x, y = batch_for(model)
    fz = ak.Featurizer(model, lambda m, b: InfGradForExample2.apply(m(b[0]))[:, 0], 8)
    with pytest.raises(ValueError, match=r"non-finite gradient of '.*' for examples \[2\]"):
        fz((x, y))


def test_tied_weights_are_detected_and_fallback_fixes_them():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 4)

        def forward(self, idx):
            h = self.fc(self.emb(idx).mean(1))
            return h @ self.emb.weight.T  # functional use of the embedding matrix

    torch.manual_seed(0)
    model = Tied()
    batch = (torch.randint(0, 10, (5, 3)), torch.randint(0, 10, (5,)))
    with pytest.raises(RuntimeError, match="do not add up .* fallback=\\['emb.weight'\\]"):
        ak.Featurizer(model, task.measure, 16)(batch)
    fz = ak.Featurizer(model, task.measure, 16, fallback=["emb.weight"])
    assert rel(fz.gradients(batch), reference_gradients(model, task.measure, batch)) < 1e-5


class PositionTable(nn.Module):
    """Token embedding plus a position nn.Embedding looked up with arange(T), broadcast over the
    batch (as GPT-style models do): its module input has no batch dimension."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(20, 8), nn.Embedding(5, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, idx):
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.fc(torch.tanh(x).mean(1))


@pytest.mark.parametrize("B", [5, 3])
def test_module_called_without_batch_dim_goes_to_fallback(B):
    torch.manual_seed(0)
    model = PositionTable()
    batch = (torch.randint(0, 20, (B, 5)), torch.randint(0, 3, (B,)))  # B = 5 = T: same leading size
    fz = ak.Featurizer(model, task.measure, 32, seed=3)
    with pytest.warns(UserWarning, match=r"without the batch dimension.*\['pos.weight'\]"):
        phi = fz(batch)
    want = ak.sketch(reference_gradients(model, task.measure, batch), 32, seed=3)
    assert rel(phi, want) < 1e-5
    assert rel(fz(batch), want) < 1e-5  # the new plan is kept


def test_bad_arguments():
    model = mlp()
    with pytest.raises(ValueError, match="mode must be one of"):
        ak.Featurizer(model, task.measure, 8, mode="sparse")
    with pytest.raises(ValueError, match="params names unknown parameters"):
        ak.Featurizer(model, task.measure, 8, params=["nope"])
    with pytest.raises(ValueError, match="k must be"):
        ak.Featurizer(model, task.measure, 0)
    with pytest.raises(TypeError, match="output_fn must be callable"):
        ak.Featurizer(model, None, 8)


# ---------------------------------------------------------------------------------------------
# Fallback of one parameter, exactly-zero gradients, errors that carry the examples


def test_fallback_weight_of_a_hooked_module_is_computed_once_in_both_modes():
    torch.manual_seed(0)
    model = mlp()
    batch = batch_for(model)
    g = ak.capture.Gradients(model, task.measure, fallback=["2.weight"])(batch)
    assert rel(g, reference_gradients(model, task.measure, batch)) < 1e-5
    fz = ak.Featurizer(model, task.measure, 300, seed=4, mode="factored", fallback=["2.weight"])
    assert "2.weight" not in [fz.plan.name_of(layer.param) for layer in fz._kron]
    assert "2.weight" in [n for n, _ in fz._rest]
    assert rel(fz(batch), kron_reference(fz, model, batch)) < 1e-5


class KeyBias(nn.Module):
    """Attention whose key projection has a bias: the bias's gradient is exactly zero."""

    def __init__(self, d=8, classes=5):
        super().__init__()
        self.emb = nn.Embedding(40, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, idx):
        x = self.emb(idx)
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 8 ** 0.5, -1)
        return self.head((att @ self.v(x)).mean(1))


@pytest.mark.parametrize("mode", ["dense", "factored"])
def test_exactly_zero_parameter_gradient_passes_the_consistency_check(mode):
    torch.manual_seed(0)
    model = KeyBias()
    batch = (torch.randint(0, 40, (6, 5)), torch.randint(0, 5, (6,)))
    ref = reference_gradients(model, task.measure, batch)
    fz = ak.Featurizer(model, task.measure, 200, seed=3, mode=mode)
    want = ak.sketch(ref, 200, seed=3) if mode == "dense" else kron_reference(fz, model, batch)
    assert rel(fz(batch), want) < 1e-5
    assert rel(fz.gradients(batch), ref) < 1e-5


def test_non_finite_values_raise_an_example_error_that_can_be_located():
    from attrkernels.utils.errors import ExampleError

    model = mlp()
    x, y = batch_for(model)
    x[3, 0] = float("nan")
    with pytest.raises(ExampleError) as info:
        ak.capture.Gradients(model, task.measure)((x, y))
    assert info.value.examples == [3]
    located = info.value.locate(16, "train", "checkpoint 2")
    assert located.examples == [19] and "examples [19] of the train loader (checkpoint 2)" in str(located)
