"""Layer handlers: the type -> handler table, and a new layer type added through one handler
class, run through the featurizer and EK-FAC / K-FAC against per-example autograd references.

Tolerances as in test_featurizer.py (1e-5) and test_ekfac.py (1e-4, float32 vs float64)."""
import pytest
import torch
import torch.nn as nn

import attrkernels as ak
from attrkernels.capture import Gradients, KroneckerHandler, handler_for, make_plan, register_handler
from attrkernels.capture.handlers import HANDLERS, ConvHandler, LinearHandler, NormHandler
from attrkernels.kernels.kfac import kron_eigh

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# The table


def test_table_lookup_follows_the_mro():
    class MyLinear(nn.Linear):
        pass

    assert handler_for(nn.Linear(2, 3)) is LinearHandler
    assert handler_for(MyLinear(2, 3)) is LinearHandler  # subclasses without an entry
    assert handler_for(nn.MultiheadAttention(4, 2).out_proj) is LinearHandler
    assert handler_for(nn.Conv1d(2, 2, 3)) is ConvHandler and handler_for(nn.Conv3d(2, 2, 3)) is None
    assert handler_for(nn.BatchNorm2d(3)) is NormHandler and handler_for(nn.ReLU()) is None
    assert LinearHandler.kronecker and not NormHandler.kronecker
    assert ConvHandler.why_not_kronecker(nn.Conv2d(4, 4, 3, groups=2)) == "Conv2d with groups=2"
    assert NormHandler.why_not_kronecker(nn.LayerNorm(3)) == "LayerNorm"
    with pytest.raises(TypeError, match="module_type"):
        register_handler(3, LinearHandler)
    with pytest.raises(TypeError, match="handler_cls"):
        register_handler(nn.Linear, object)


def test_handlers_validate_their_modules():
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        make_plan(nn.Embedding(5, 2, scale_grad_by_freq=True))
    with pytest.raises(ValueError, match="running statistics"):
        make_plan(nn.BatchNorm1d(3, track_running_stats=False))


# ---------------------------------------------------------------------------------------------
# A toy layer type: y = s x W^T (no bias), on sequences


class ScaledLinear(nn.Module):
    def __init__(self, d_in, d_out, scale):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5)
        self.scale = scale

    def forward(self, x):
        return self.scale * x @ self.weight.T


class ScaledLinearHandler(KroneckerHandler):
    """grad W_b = sum_t delta_bt (s a_bt)^T: factors A = s a, D = delta. Everything else (blocks,
    covariances, eigenvalue correction, queries, inner products) comes from KroneckerHandler."""

    def kron(self, examples=slice(None)):
        A = torch.cat([r.inputs[examples].reshape(-1, r.inputs.shape[1], r.inputs.shape[2]) for r in self.records], 1)
        D = torch.cat([r.grad_out[examples].reshape(-1, r.grad_out.shape[1], r.grad_out.shape[2])
                       for r in self.records], 1)
        return self.module.scale * A, D


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.toy = ScaledLinear(5, 6, scale=1.7)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x [B, T, 5]
        return self.head(torch.tanh(self.toy(x)).mean(1))


@pytest.fixture
def toy_registered():
    register_handler(ScaledLinear, ScaledLinearHandler)
    yield
    HANDLERS.pop(ScaledLinear)


def toy_data(n, seed, batch=8):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def toy_net():
    torch.manual_seed(0)
    return ToyNet()


def per_example(model, fn, batches):
    """[n, p] per-example gradients (named_parameters() order), one backward per example, float64."""
    params = list(model.parameters())
    rows = []
    for x, y in batches:
        for b in range(x.shape[0]):
            gs = torch.autograd.grad(fn(model, (x[b:b + 1], y[b:b + 1])).sum(), params)
            rows.append(torch.cat([g.reshape(-1) for g in gs]).double())
    return torch.stack(rows)


def kron_layout(g):
    """{layer: [n, d_out, d_in (+ bias column)]} from [n, p] gradients of ToyNet."""
    n = g.shape[0]
    toy, head_w, head_b = g[:, :30], g[:, 30:48], g[:, 48:]
    return {"toy": toy.reshape(n, 6, 5), "head": torch.cat([head_w.reshape(n, 3, 6), head_b[:, :, None]], 2)}


def test_toy_layer_is_captured_by_its_handler(toy_registered):
    model, task = toy_net(), ak.tasks.Classification()
    plan = make_plan(model)
    assert plan.hooked["toy"][1] is ScaledLinearHandler and plan.fallback == []
    batch = toy_data(6, 1)[0]
    ref = per_example(model, task.measure, [batch]).float()
    assert rel(Gradients(model, task.measure)(batch), ref) < 1e-5
    phi = ak.Featurizer(model, task.measure, 64, seed=5)(batch)
    assert rel(phi, ak.sketch(ref, 64, seed=5)) < 1e-5
    # factored mode projects the toy weight by its own Kronecker factors: E phi_i.phi_j = g_i.g_j
    assert ak.Featurizer(model, task.measure, 64, seed=5, mode="factored")(batch).shape == (6, 64)


def test_unregistered_toy_layer_goes_to_the_fallback_and_is_skipped_by_ekfac():
    model, task = toy_net(), ak.tasks.Classification()
    plan = make_plan(model)
    assert "toy" not in plan.hooked and [n for n, _ in plan.fallback] == ["toy.weight"]
    batch = toy_data(4, 2)[0]
    assert rel(Gradients(model, task.measure)(batch), per_example(model, task.measure, [batch]).float()) < 1e-5
    m = ak.EKFAC(model, task, verbose=False)
    assert [layer.name for layer in m.layers] == ["head"] and m.skipped == ["toy.weight"]
    with pytest.raises(ValueError, match=r"toy\.weight \(ScaledLinear\)"):
        ak.EKFAC(model, task, params=["toy.weight"])


@pytest.mark.parametrize("cls,strategy", [(ak.EKFAC, "ekfac"), (ak.KFAC, "kfac")])
@pytest.mark.parametrize("damping", [None, 1e-3])
def test_toy_layer_in_ekfac_equals_the_explicit_reference(toy_registered, cls, strategy, damping):
    model, task = toy_net(), ak.tasks.Classification()
    train, test = toy_data(24, 3), toy_data(5, 4, batch=5)
    m = cls(model, task, fisher="empirical", damping=damping, memory_budget=4096, verbose=False).fit(train)
    assert [(layer.name, layer.handler, layer.d_in, layer.d_out) for layer in m.layers] == [
        ("toy", ScaledLinearHandler, 5, 6), ("head", LinearHandler, 7, 3)]
    got = m.score(test, train=train)

    g_train = kron_layout(per_example(model, task.loss, train))
    g_test = kron_layout(per_example(model, task.measure, test))
    # factors from their definitions: the layer's inputs (scaled: s a) and output gradients
    inputs, outputs = {}, {}

    def keep(name, scale):
        def hook(module, args, out):
            inputs.setdefault(name, []).append(args[0].detach() * scale)
            out.retain_grad()
            outputs.setdefault(name, []).append(out)
        return hook

    hooks = [model.toy.register_forward_hook(keep("toy", model.toy.scale)),
             model.head.register_forward_hook(keep("head", 1.0))]
    for batch in train:
        task.loss(model, batch).sum().backward()
    for h in hooks:
        h.remove()
    model.zero_grad()
    ref = si_ref = 0
    for name in ("toy", "head"):
        a = torch.cat(inputs[name]).detach().double()
        d = torch.cat([o.grad for o in outputs[name]]).double()
        a = a.reshape(-1, a.shape[-1])
        if name == "head":
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=torch.float64)], 1)
        A, S = a.T @ a / a.shape[0], d.reshape(-1, d.shape[-1]).T @ d.reshape(-1, d.shape[-1]) / 24
        f = m.factors[0][name]
        assert rel(f.A, A) < 1e-5 and rel(f.S, S) < 1e-5, name
        (ea, Qa), (es, Qs) = kron_eigh([A, S])
        Qa, Qs = Qa.dense(), Qs.dense()
        r_train, r_test = Qs.T @ g_train[name] @ Qa, Qs.T @ g_test[name] @ Qa
        if strategy == "ekfac":
            values = r_train.square().mean(0)
            assert rel(f.lam, (f.basis_s.dense().T @ g_train[name] @ f.basis_a.dense()).square().mean(0)) < 1e-4
        else:
            values = torch.outer(es.clamp_min(0), ea.clamp_min(0))
        lam = damping if damping is not None else 0.1 * values.mean()
        ref = ref - torch.einsum("ioc,joc->ij", r_train, r_test / (values + lam))
        si_ref = si_ref + (r_train.square() / (values + lam)).sum((1, 2))
    assert got.shape == (24, 5) and rel(got, ref) < 1e-4
    assert rel(m.self_influence(train), si_ref) < 1e-4


# ---------------------------------------------------------------------------------------------
# Gradients: the capture core without a sketch


@pytest.mark.parametrize("name", ["mlp", "cnn2d_bn", "cnn1d", "embedding", "transformer_sdpa"])
def test_gradients_equal_reference_without_a_featurizer(name):
    from test_featurizer import MODELS, batch_for, reference_gradients

    torch.manual_seed(1)
    model = MODELS[name]()
    batch = batch_for(model)
    grads = Gradients(model, ak.tasks.Classification().measure, memory_budget=4096)
    assert not isinstance(grads, ak.Featurizer)
    g = grads(batch)
    assert g.shape == (batch[0].shape[0], grads.num_params) and grads.num_params == grads.plan.total
    assert rel(g, reference_gradients(model, ak.tasks.Classification().measure, batch)) < 1e-5
    assert grads.peak_bytes <= 4096 or name == "transformer_sdpa"  # torch.func parameters come whole


def test_gradients_checks_its_arguments_and_tied_weights():
    with pytest.raises(TypeError, match="output_fn must be callable"):
        Gradients(nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="memory_budget"):
        Gradients(nn.Linear(2, 2), ak.tasks.Classification().loss, memory_budget=10)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)

        def forward(self, idx):
            return torch.tanh(self.emb(idx)).mean(1) @ self.emb.weight.T  # functional use of the weight

    torch.manual_seed(0)
    model, task = Tied(), ak.tasks.Classification()
    batch = (torch.randint(0, 7, (3, 4)), torch.randint(0, 7, (3,)))
    with pytest.raises(RuntimeError, match="do not add up"):
        Gradients(model, task.loss)(batch)
    g = Gradients(model, task.loss, fallback=["emb.weight"])(batch)
    ref = torch.stack([torch.autograd.grad(task.loss(model, (batch[0][b:b + 1], batch[1][b:b + 1])).sum(),
                                           model.emb.weight)[0].reshape(-1) for b in range(3)])
    assert rel(g, ref) < 1e-5


def test_batch_dependent_modules_are_refused_even_when_untracked():
    from attrkernels.capture import check_batch_independent

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"module '1': BatchNorm1d with track_running_stats=False"):
        check_batch_independent(model)
    with pytest.raises(ValueError, match="track_running_stats=True"):
        Gradients(model, lambda m, b: m(b).sum(1), params=["0.weight"])
    check_batch_independent(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.LayerNorm(4)))


def test_stacked_query_chunks_equal_their_concatenation_and_are_released():
    from attrkernels.capture.handlers.kron import stacked

    gen = torch.Generator().manual_seed(3)
    chunks = [torch.randn(c, 4, 5, generator=gen) for c in (2, 3, 1)]
    want = torch.cat(chunks)
    parts = list(chunks)
    got = stacked(parts, 6)
    assert torch.equal(got, want) and got.is_contiguous() and parts == []
    one = [chunks[1]]
    assert stacked(one, 3) is chunks[1] and one == []
    cols = stacked(list(chunks), 6, columns=True)
    assert torch.equal(cols, want) and cols.reshape(6, -1).T.is_contiguous()


def test_rotated_positions_inner_with_query_columns_equals_the_formed_gradients_in_row_blocks():
    from attrkernels.capture.handlers.kron import Rotated

    gen = torch.Generator().manual_seed(4)
    a, d = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 5, 6, generator=gen)
    columns = torch.randn(6 * 7, 4, generator=gen)
    want = torch.bmm(d.transpose(1, 2), a).reshape(3, -1) @ columns
    for budget in (1, 4 * 3 * 7 * 2, 1 << 20):  # one output row a block, two, all six
        torch.testing.assert_close(Rotated(a=a, d=d).inner(columns, budget), want, rtol=1e-5, atol=1e-5)
    R = torch.bmm(d.transpose(1, 2), a)
    torch.testing.assert_close(Rotated(R=R).inner(columns, 1), want, rtol=1e-5, atol=1e-5)
