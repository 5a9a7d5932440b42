"""ak.EKFAC and ak.KFAC against explicit references: factors from their definitions (naive loops,
float64), Fisher inverses formed densely, scores from per-example gradients computed one example
at a time with autograd. Tolerances: 1e-4 relative to the largest entry (float32 pipeline vs
float64 references)."""
import functools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attrkernels as ak
from attrkernels.kernels.kfac import kron_eigh
from attrkernels.store import StoreMismatch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# A model with every supported layer kind: Embedding, Linear on a sequence, Conv2d, Linear


class Net(nn.Module):
    def __init__(self, head_in=5 + 3 * 64):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.seq = nn.Linear(4, 5)
        self.conv = nn.Conv2d(1, 3, 3, stride=2, padding=1)  # unfolded
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)  # stride 1 on 8x8: covariance without unfolding
        self.head = nn.Linear(head_in, 4)

    def forward(self, inputs):
        tokens, image = inputs
        h1 = self.seq(self.emb(tokens)).tanh().mean(1)  # [B, 5]
        h2 = self.conv2(self.conv(image).tanh()).tanh().flatten(1)  # [B, 3 * 8 * 8]
        return self.head(torch.cat([h1, h2], 1))


class NetTask(ak.tasks.Classification):
    """Batches ((tokens, image), labels)."""

    def batch_size(self, batch):
        return int(batch[1].shape[0])


class Loader:
    """Batches with a ``dataset`` of known length (the score's train-size hint)."""

    def __init__(self, batches, n):
        self.batches, self.dataset = batches, range(n)

    def __iter__(self):
        return iter(self.batches)


def net_data(n, seed, batch=8):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 11, (n, 3), generator=gen)
    image = torch.randn(n, 1, 16, 16, generator=gen)
    labels = torch.randint(0, 4, (n,), generator=gen)
    return [((tokens[i:i + batch], image[i:i + batch]), labels[i:i + batch]) for i in range(0, n, batch)]


def make_net(seed=0, **kw):
    torch.manual_seed(seed)
    return Net(**kw)


LAYERS = ("emb", "seq", "conv", "conv2", "head")


def layer_gradient(model, name, grads):
    """Per-example gradient of a layer in the Kronecker layout [d_out, d_in (+ bias column)]."""
    module = getattr(model, name)
    if isinstance(module, nn.Embedding):
        return grads[f"{name}.weight"].T
    w = grads[f"{name}.weight"].reshape(module.weight.shape[0], -1)
    return torch.cat([w, grads[f"{name}.bias"][:, None]], 1) if module.bias is not None else w


def per_example(model, fn, batches):
    """{layer: [n, d_out, d_in]} float64, one backward per example."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    out = {name: [] for name in LAYERS}
    for (tokens, image), labels in batches:
        for b in range(labels.shape[0]):
            example = ((tokens[b:b + 1], image[b:b + 1]), labels[b:b + 1])
            gs = dict(zip(names, torch.autograd.grad(fn(model, example).sum(), params)))
            for name in LAYERS:
                out[name].append(layer_gradient(model, name, gs).double())
    return {k: torch.stack(v) for k, v in out.items()}


def naive_patches(x, conv):
    """Unfolded conv inputs [B, L, C k k] by explicit loops over output positions."""
    (ph, pw), (sh, sw), (kh, kw) = conv.padding, conv.stride, conv.kernel_size
    x = F.pad(x, (pw, pw, ph, ph))
    rows = []
    for i in range(0, x.shape[2] - kh + 1, sh):
        for j in range(0, x.shape[3] - kw + 1, sw):
            rows.append(x[:, :, i:i + kh, j:j + kw].reshape(x.shape[0], -1))
    return torch.stack(rows, 1)


def naive_factors(model, task, batches):
    """{layer: (A, S)} from their definitions (float64): A = sum a a^T / #positions, S = sum d d^T / #examples."""
    inputs, outputs = {}, {}

    def keep(name):
        def hook(module, args, out):
            inputs.setdefault(name, []).append(args[0].detach())
            out.retain_grad()
            outputs.setdefault(name, []).append(out)
        return hook

    handles = [getattr(model, n).register_forward_hook(keep(n)) for n in LAYERS]
    for batch in batches:
        task.loss(model, batch).sum().backward()
    for h in handles:
        h.remove()
    model.zero_grad()
    factors = {}
    for name in LAYERS:
        module = getattr(model, name)
        x = torch.cat(inputs[name]).double()
        g = torch.cat([o.grad for o in outputs[name]]).double()
        n = x.shape[0]
        if name == "emb":
            onehot = F.one_hot(x.long(), 11).double().reshape(-1, 11)
            A = torch.diag(onehot.sum(0)) / onehot.shape[0]
            g = g.reshape(-1, 4)
        elif name.startswith("conv"):
            a = naive_patches(x, module).reshape(-1, 9 * module.in_channels)
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=torch.float64)], 1)
            A = a.T @ a / a.shape[0]
            g = g.flatten(2).transpose(1, 2).reshape(-1, 3)
        else:
            a = x.reshape(-1, x.shape[-1])
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=torch.float64)], 1)
            A = a.T @ a / a.shape[0]
            g = g.reshape(-1, g.shape[-1])
        factors[name] = (A, g.T @ g / n)
    return factors


def reference_scores(model, task, train, test, strategy="ekfac", damping=None, block_width=None):
    """Explicit EK-FAC / K-FAC scores, empirical Fisher, dense float64 eigenbases."""
    model.eval()
    factors = naive_factors(model, task, train)
    g_train = per_example(model, task.loss, train)
    g_test = per_example(model, task.measure, test)
    total = 0
    for name in LAYERS:
        A, S = factors[name]
        if name == "emb":
            ea, Qa = torch.diag(A), torch.eye(11, dtype=torch.float64)
        else:
            ea, Qa = kron_eigh([A], block_width)[0]
            Qa = Qa.dense()
        es, Qs = kron_eigh([S], block_width)[0]
        Qs = Qs.dense()
        rot = lambda G: Qs.T @ G @ Qa  # noqa: E731
        r_train, r_test = rot(g_train[name]), rot(g_test[name])
        values = r_train.square().mean(0) if strategy == "ekfac" else torch.outer(es.clamp_min(0), ea.clamp_min(0))
        lam = damping if damping is not None else 0.1 * values.mean()
        total = total - torch.einsum("ioc,joc->ij", r_train, r_test / (values + lam))
    return total


@pytest.mark.parametrize("cls,strategy", [(ak.EKFAC, "ekfac"), (ak.KFAC, "kfac")])
@pytest.mark.parametrize("damping,block_width", [(None, None), (1e-3, 4)])
def test_scores_equal_the_explicit_reference(cls, strategy, damping, block_width):
    model, task = make_net(), NetTask()
    train, test = Loader(net_data(24, 1), 24), Loader(net_data(6, 2, batch=4), 6)
    m = cls(model, task, fisher="empirical", damping=damping, block_width=block_width, verbose=False)
    got = m.fit(train).score(test, train=train)
    ref = reference_scores(model, task, train.batches, test.batches, strategy, damping, block_width)
    assert got.shape == (24, 6) and got.dtype == torch.float32
    assert rel(got, ref) < 1e-4
    # both query sides ran (24 training vs 6 test examples): layers with T > 1 precondition the
    # queries back in parameter space, the others score in the eigenbasis
    assert m.query_modes == {"emb": "eigenbasis", "seq": "parameters", "conv": "parameters", "conv2": "parameters",
                             "head": "eigenbasis"}


def test_factors_equal_their_definitions():
    model, task = make_net(), NetTask()
    train = net_data(16, 3)
    m = ak.EKFAC(model, task, fisher="empirical", verbose=False).fit(train)
    ref = naive_factors(model, task, train)
    g = per_example(model, task.loss, train)
    for name in LAYERS:
        f = m.factors[0][name]
        A, S = ref[name]
        assert rel(torch.diag(f.A) if name == "emb" else f.A, A) < 1e-5, name
        assert rel(f.S, S) < 1e-5, name
        Qa, Qs = f.basis_a.dense(), f.basis_s.dense()
        assert rel(f.lam, (Qs.T @ g[name] @ Qa).square().mean(0)) < 1e-4, name
        if name != "emb":  # eigendecompositions reconstruct the (symmetrised) factors
            assert rel(Qa @ torch.diag(f.eig_a) @ Qa.T, (f.A + f.A.T) / 2) < 1e-10
        assert rel(Qs @ torch.diag(f.eig_s) @ Qs.T, (f.S + f.S.T) / 2) < 1e-10


# ---------------------------------------------------------------------------------------------
# A single Linear layer whose Fisher is exactly Kronecker: EK-FAC = K-FAC = the inverse Fisher


class Regression(ak.tasks.Task):
    """Batches (x, target); loss 1/2 ||f(x) - target||^2, measurement = first output."""

    def loss(self, model, batch):
        x, t = batch
        return 0.5 * (model(x) - t).square().sum(1)

    def measure(self, model, batch):
        return model(batch[0])[:, 0]


def test_single_linear_gaussian_input_matches_the_explicit_inverse_fisher():
    # Full factorial design: every Gaussian input a_i with every output noise e_k, target =
    # f(a_i) + e_k, so the per-example gradient is -e_k [a_i, 1]^T and the (empirical = true,
    # since e_k plays the sampled noise) Fisher mean_ik (e_k e_k^T) (x) (a_i a_i^T) is exactly S (x) A.
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    a = torch.randn(8, 4, generator=gen)
    e = torch.randn(6, 3, generator=gen)
    x = a.repeat_interleave(6, 0)
    with torch.no_grad():
        t = lin(x) + e.repeat(8, 1)
    train = [(x[i:i + 16], t[i:i + 16]) for i in range(0, 48, 16)]
    xq = torch.randn(5, 4, generator=gen)
    test = [(xq, torch.zeros(5, 3))]
    damping = 0.05
    g = torch.cat([(-e.repeat(8, 1))[:, :, None] * torch.cat([x, torch.ones(48, 1)], 1)[:, None, :]], 0)
    g = g.reshape(48, -1).double()
    fisher = g.T @ g / 48
    gq = torch.zeros(5, 3, 5, dtype=torch.float64)
    gq[:, 0, :4], gq[:, 0, 4] = xq.double(), 1.0
    ref = -g @ torch.linalg.solve(fisher + damping * torch.eye(15, dtype=torch.float64), gq.reshape(5, -1).T)
    for cls in (ak.EKFAC, ak.KFAC):
        m = cls(lin, Regression(), fisher="empirical", damping=damping, verbose=False)
        got = m.fit(train).score(test)
        assert rel(got, ref) < 1e-4, cls.__name__


# ---------------------------------------------------------------------------------------------
# Sign, checkpoints, self-influence, out


def blobs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    y = torch.arange(60) % 3
    x = centers[y] + torch.randn(60, 2, generator=gen)
    x[0], y[0] = torch.tensor([0.0, -6.0]), 2  # an outlier of class 2, far from its class
    return x, y


@functools.lru_cache(maxsize=None)
def _trained_state(steps):
    x, y = blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_mlp(x, y, steps=300):
    """The blobs MLP after ``steps`` Adam steps (trained once per steps value)."""
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    model.load_state_dict(_trained_state(steps))
    return model


@pytest.mark.parametrize("cls", [ak.EKFAC, ak.KFAC])
def test_sign_duplicate_raises_and_flipped_label_lowers_the_margin(cls):
    x, y = blobs()
    model = trained_mlp(x, y)
    train = [(x[i:i + 20], y[i:i + 20]) for i in range(0, 60, 20)]
    test = [(torch.stack([x[0], x[0]]), torch.tensor([2, 0]))]  # the outlier with its label, and flipped
    s = cls(model, ak.tasks.Classification(), verbose=False).fit(train).score(test)  # train: fit's loader
    assert s[0, 0] > 0 and int(s[:, 0].argmax()) == 0  # its duplicate helps it most
    assert s[0, 1] < 0 and int(s[:, 1].argmin()) == 0  # and hurts the flipped label most


def test_checkpoints_average_scores():
    x, y = blobs()
    train = [(x[i:i + 20], y[i:i + 20]) for i in range(0, 60, 20)]
    test = [(x[:5], y[:5])]
    sd = [trained_mlp(x, y, steps).state_dict() for steps in (50, 300)]
    model, task = trained_mlp(x, y, 1), ak.tasks.Classification()
    kw = dict(fisher="empirical", verbose=False)
    both = ak.EKFAC(model, task, **kw).fit(train, checkpoints=[sd[0], ak.tasks.Checkpoint(sd[1], 2, 0.1)]).score(test)
    each = [ak.EKFAC(model, task, **kw).fit(train, checkpoints=[c]).score(test, train=train) for c in sd]
    assert rel(both, (each[0] + each[1]) / 2) < 1e-6
    assert torch.equal(model.state_dict()["0.weight"], trained_mlp(x, y, 1).state_dict()["0.weight"])


class NegLossTask(ak.tasks.Classification):
    def measure(self, model, batch):
        return -self.loss(model, batch)


def test_self_influence_is_the_diagonal_of_scores_with_measurement_minus_loss():
    x, y = blobs()
    model = trained_mlp(x, y)
    task = NegLossTask()
    train = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 60, 16)]
    for cls in (ak.EKFAC, ak.KFAC):
        m = cls(model, task, verbose=False).fit(train)
        s = m.score(train, train=train)
        si = m.self_influence(train)
        assert si.shape == (60,) and (si > 0).all()
        assert rel(si, torch.diagonal(s)) < 1e-4


def test_out_array_is_filled_tile_by_tile():
    x, y = blobs()
    model = trained_mlp(x, y)
    train = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 60, 16)]
    m = ak.EKFAC(model, ak.tasks.Classification(), verbose=False).fit(train)
    out = np.full((60, 4), np.nan, dtype=np.float32)
    got = m.score([(x[:4], y[:4])], train=train, out=out)
    assert got is out
    assert rel(torch.from_numpy(out), m.score([(x[:4], y[:4])], train=train)) < 1e-6
    with pytest.raises(ValueError, match="out has"):
        m.score([(x[:4], y[:4])], train=train, out=np.zeros((50, 4), np.float32))


# ---------------------------------------------------------------------------------------------
# True Fisher, store round trip, refusals


class Counting:
    """A loader that counts how many batches were drawn from it."""

    def __init__(self, batches):
        self.batches, self.drawn = batches, 0

    def __iter__(self):
        for b in self.batches:
            self.drawn += 1
            yield b


def test_true_fisher_is_seeded_and_needs_a_sampler():
    model, task = make_net(), NetTask()
    train = net_data(16, 4)
    a = ak.EKFAC(model, task, verbose=False).fit(train).factors[0]
    b = ak.EKFAC(model, task, verbose=False).fit(train).factors[0]
    c = ak.EKFAC(model, task, seed=1, verbose=False).fit(train).factors[0]
    assert torch.equal(a["head"].lam, b["head"].lam) and not torch.equal(a["head"].lam, c["head"].lam)
    with pytest.raises(TypeError, match="sampled_loss"):
        ak.EKFAC(nn.Linear(2, 1), Regression())


def test_save_load_score_round_trip(tmp_path):
    model, task = make_net(), NetTask()
    train, test, other = net_data(24, 5), net_data(5, 6), net_data(3, 7)
    first = ak.EKFAC(model, task, store=tmp_path / "f", verbose=False).fit(train)
    s1 = first.score(test, train=train)
    stages = sorted(p.name.split("_")[0] for p in (tmp_path / "f").glob("*.safetensors"))
    assert stages == ["covariance", "eigen", "lambda"]
    loader = Counting(train)
    again = ak.EKFAC(model, task, store=tmp_path / "f", verbose=False).fit(loader)
    # the first batch twice (params=None's probe for unbatched layers, the data signature): the factors were loaded
    assert loader.drawn == 2
    assert torch.equal(again.score(test, train=train), s1)
    fresh = ak.EKFAC(model, task, store=tmp_path / "f", damping=1e-2, verbose=False)  # no fit: found by weights
    assert rel(fresh.score(other, train=train), ak.EKFAC(model, task, damping=1e-2, verbose=False).fit(train).score(
        other, train=train)) < 1e-6


def test_store_refuses_another_model_or_settings(tmp_path):
    model, task = make_net(), NetTask()
    train = net_data(16, 8)
    ak.EKFAC(model, task, store=tmp_path / "f", verbose=False).fit(train)
    with pytest.raises(StoreMismatch, match="layers"):
        ak.EKFAC(make_net(head_in=5 + 27), task, store=tmp_path / "f",
                 verbose=False).fit(train)
    with pytest.raises(StoreMismatch, match="fisher"):
        ak.EKFAC(model, task, store=tmp_path / "f", fisher="empirical", verbose=False).fit(train)
    with pytest.raises(StoreMismatch, match="data"):
        ak.EKFAC(model, task, store=tmp_path / "f", verbose=False).fit(net_data(16, 9))
    with pytest.raises(ValueError, match="differ from every checkpoint"):
        ak.EKFAC(make_net(seed=1), task, store=tmp_path / "f", verbose=False).score(train, train=train)


def test_rank_deficient_factor_without_damping_raises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 3))
    x, y = torch.randn(4, 16), torch.tensor([0, 1, 2, 0])  # 4 examples: A has rank <= 4 < 17
    train = [(x, y)]
    m = ak.EKFAC(model, ak.tasks.Classification(), damping=0.0, fisher="empirical", verbose=False).fit(train)
    with pytest.raises(ValueError, match=r"layer '0'.*activation factor A is rank-deficient.*damping"):
        m.score(train, train=train)
    m.damping = None
    assert torch.isfinite(m.score(train, train=train)).all()
    with pytest.raises(ValueError, match="damping must be"):
        ak.EKFAC(model, ak.tasks.Classification(), damping=-1.0)


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.grouped = nn.Conv1d(6, 6, 1, groups=2)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.norm(self.fc(x))
        return self.out(self.grouped(h[:, :, None])[:, :, 0])


def test_unsupported_layers_are_skipped_by_default_and_refused_when_named():
    model = Normed()
    m = ak.EKFAC(model, ak.tasks.Classification(), verbose=False)
    assert [layer.name for layer in m.layers] == ["fc", "out"]
    assert m.skipped == ["norm.weight", "norm.bias", "grouped.weight", "grouped.bias"]
    with pytest.raises(ValueError, match=r"norm\.weight \(LayerNorm\)"):
        ak.EKFAC(model, ak.tasks.Classification(), params=["fc.weight", "norm.weight"])
    with pytest.raises(ValueError, match=r"grouped\.weight \(Conv1d with groups=2\)"):
        ak.EKFAC(model, ak.tasks.Classification(), params=["grouped.weight"])
    with pytest.raises(ValueError, match="a bias without its weight"):
        ak.EKFAC(model, ak.tasks.Classification(), params=["fc.bias"])
    with pytest.raises(ValueError, match="unknown parameters"):
        ak.EKFAC(model, ak.tasks.Classification(), params=["nope"])
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    only = ak.EKFAC(model, ak.tasks.Classification(), params=["out.weight"], fisher="empirical", verbose=False)
    assert [(layer.name, layer.bias) for layer in only.layers] == [("out", False)]
    assert only.fit([(x, y)]).score([(x, y)], train=[(x, y)]).shape == (8, 8)


def test_module_called_without_the_batch_dimension_is_left_out_or_refused():
    class PositionTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos, self.fc = nn.Embedding(20, 8), nn.Embedding(5, 8), nn.Linear(8, 3)

        def forward(self, idx):
            return self.fc(torch.tanh(self.emb(idx) + self.pos(torch.arange(idx.shape[1]))).mean(1))

    torch.manual_seed(0)
    model = PositionTable()
    batch = (torch.randint(0, 20, (4, 5)), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match=r"\['pos'\] are called without the batch dimension"):
        ak.EKFAC(model, ak.tasks.Classification(), params=["pos.weight", "fc.weight"], fisher="empirical",
                 verbose=False).fit([batch])
    only = ak.EKFAC(model, ak.tasks.Classification(), params=["emb.weight", "fc.weight", "fc.bias"],
                    fisher="empirical", verbose=False)
    want = only.fit([batch]).score([batch], train=[batch])
    assert want.shape == (4, 4)
    # params=None: the first batch shows 'pos' unbatched, so it is left out (listed in skipped)
    default = ak.EKFAC(model, ak.tasks.Classification(), fisher="empirical", verbose=False)
    torch.testing.assert_close(default.fit([batch]).score([batch], train=[batch]), want)
    assert default.skipped == ["pos.weight"] and [layer.name for layer in default.layers] == ["emb", "fc"]


def test_in_place_activation_after_a_layer_gives_the_same_scores():
    # an in-place ReLU overwrites the first Linear's output: the backward pass then asks for the
    # parameters' gradients instead of the outputs' (the capture sees the right gradient either way)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3))
    inplace = nn.Sequential(nn.Linear(3, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    inplace.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(10, 3, generator=gen), torch.randint(0, 3, (10,), generator=gen))]
    s = [ak.EKFAC(m, ak.tasks.Classification(), fisher="empirical", verbose=False).fit(data).score(data, train=data)
         for m in (plain, inplace)]
    assert rel(s[1], s[0]) < 1e-6


def test_score_before_fit_without_a_store_raises():
    with pytest.raises(RuntimeError, match="fit"):
        ak.EKFAC(nn.Linear(2, 2), ak.tasks.Classification(), verbose=False).score([], train=[])


# ---------------------------------------------------------------------------------------------
# Every pass over the data checked; the store's training data; non-finite values; out= a path


def blob_batches(x, y, size=16):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


class Changing:
    """A re-iterable loader whose examples change after its first complete pass (random
    augmentation; a look at the first batch, as params=None's probe takes, is no pass)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        first = self.passes == 0
        for x, y in self.batches:
            yield (x if first else x + 0.1), y
        self.passes += 1


@pytest.mark.parametrize("cls", [ak.EKFAC, ak.KFAC])
def test_every_pass_over_the_data_yields_the_same_examples(cls):
    from attrkernels.store import DataMismatch

    x, y = blobs()
    model, task = trained_mlp(x, y), ak.tasks.Classification()
    train = blob_batches(x, y)
    m = cls(model, task, verbose=False).fit(train)
    test = [(x[:4], y[:4])]
    with pytest.raises(DataMismatch, match="reorders"):
        m.score(test, train=blob_batches(x.flip(0), y.flip(0)))
    changed = x.clone()
    changed[37] += 1.0
    with pytest.raises(DataMismatch, match="train example 37 differs"):
        m.self_influence(blob_batches(changed, y))
    with pytest.raises(DataMismatch, match="the train loader yielded 48 examples"):
        m.score(test, train=blob_batches(x[:48], y[:48]))
    with pytest.raises(DataMismatch, match="train example 0 differs"):  # fit's Lambda pass, checkpoint 1
        cls(model, task, verbose=False).fit(Changing(train), [model.state_dict()] * 2)
    two = cls(model, task, verbose=False).fit(train, [model.state_dict()] * 2)
    with pytest.raises(DataMismatch, match=r"test example 0 differs .*\(checkpoint 1\)"):
        two.score(Changing(test))


def test_store_checks_every_training_example_against_the_stored_factors(tmp_path):
    from attrkernels.methods.ekfac.storage import StoredDataMismatch
    from attrkernels.store import DataMismatch, StoreDamaged

    x, y = blobs()
    model, task = trained_mlp(x, y), ak.tasks.Classification()
    train, test = blob_batches(x, y), [(x[:4], y[:4])]
    want = ak.EKFAC(model, task, store=tmp_path, verbose=False).fit(train).score(test)
    assert (tmp_path / "train_data.npz").exists()
    changed = x.clone()
    changed[50] += 1.0  # after the first batch: fit loads the factors, the score pass finds it
    with pytest.raises(StoredDataMismatch, match="train example 50 differs") as info:
        ak.EKFAC(model, task, store=tmp_path, verbose=False).fit(blob_batches(changed, y)).score(test)
    assert isinstance(info.value, StoreMismatch) and isinstance(info.value, DataMismatch)
    with pytest.raises(StoredDataMismatch, match="other training data"):  # no fit: found by weights
        ak.EKFAC(model, task, store=tmp_path, verbose=False).self_influence(blob_batches(changed, y))
    assert torch.equal(ak.EKFAC(model, task, store=tmp_path, verbose=False).fit(train).score(test), want)
    (tmp_path / "train_data.npz").unlink()
    with pytest.raises(StoreDamaged, match=r"train_data\.npz.*missing"):
        ak.EKFAC(model, task, store=tmp_path, verbose=False).fit(train)


@pytest.mark.parametrize("cls", [ak.EKFAC, ak.KFAC])
def test_non_finite_values_name_the_example_loader_and_checkpoint(cls):
    from attrkernels.utils.errors import ExampleError

    x, y = blobs()
    model, task = trained_mlp(x, y), ak.tasks.Classification()
    bad = x.clone()
    bad[21, 1] = float("inf")
    for fisher in ("true", "empirical"):
        with pytest.raises(ExampleError, match=r"examples \[21\] of the train loader \(checkpoint 0\)"):
            cls(model, task, fisher=fisher, verbose=False).fit(blob_batches(bad, y))
    m = cls(model, task, verbose=False).fit(blob_batches(x, y), [model.state_dict()] * 2)
    with pytest.raises(ExampleError, match=r"examples \[5\] of the test loader \(checkpoint 0\)"):
        m.score(blob_batches(bad[16:24], y[16:24], 4))
    diverged = {k: v.clone() for k, v in model.state_dict().items()}
    diverged["0.bias"][1] = float("nan")
    with pytest.raises(ValueError, match=r"checkpoint 1: '0\.bias' has .*NaN or Inf"):
        cls(model, task, verbose=False).fit(blob_batches(x, y), [model.state_dict(), diverged])


def test_sequence_first_layer_is_refused_when_time_equals_batch():
    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.head = nn.Linear(1, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.proj(x.T.unsqueeze(-1)).tanh().mean(0))  # [T=2, B, 1]

    x, y = blobs()
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"\['proj'\] .*sequence-first.*params="):
        ak.EKFAC(SequenceFirst(), ak.tasks.Classification(), verbose=False).fit(blob_batches(x, y, 2))


def test_out_path_holds_the_scores(tmp_path):
    x, y = blobs()
    model, task = trained_mlp(x, y), ak.tasks.Classification()
    train = Loader(blob_batches(x, y), 60)
    m = ak.EKFAC(model, task, verbose=False).fit(train, [model.state_dict()] * 2)
    got = m.score([(x[:4], y[:4])], out=tmp_path / "scores.npy")
    assert torch.equal(got, m.score([(x[:4], y[:4])]))
    assert np.array_equal(np.load(tmp_path / "scores.npy"), got.numpy())


@pytest.mark.parametrize("cls", [ak.EKFAC, ak.KFAC])
def test_curvature_without_inverse_is_the_library_not_positive_definite_error(cls):
    from attrkernels.utils.errors import NotPositiveDefiniteError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 3))
    train = [(torch.randn(4, 16), torch.tensor([0, 1, 2, 0]))]
    m = cls(model, ak.tasks.Classification(), damping=0.0, fisher="empirical", verbose=False).fit(train)
    with pytest.raises(NotPositiveDefiniteError, match="layer '0'"):
        m.self_influence()


@pytest.mark.parametrize("cls", [ak.EKFAC, ak.KFAC])
def test_float32_eigendecompositions_give_the_float64_scores_to_rounding(cls, tmp_path):
    model, task = make_net(), NetTask()
    train, test = net_data(24, 5), net_data(5, 6)
    s64 = cls(model, task, verbose=False).fit(train).score(test)
    s32 = cls(model, task, eigh_dtype=torch.float32, store=tmp_path / "f", verbose=False).fit(train).score(test)
    assert rel(s32, s64) < 1e-4
    with pytest.raises(StoreMismatch, match="eigh_dtype"):  # factors on file are of the other precision
        cls(model, task, store=tmp_path / "f", verbose=False).fit(train)
    with pytest.raises(ValueError, match="eigh_dtype must be"):
        cls(model, task, eigh_dtype="float32")
