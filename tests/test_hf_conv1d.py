"""transformers' Conv1D through its handler: per-example gradients against autograd, and every
method (EK-FAC, K-FAC, TRAK dense and factored, TracIn, IF-CG) on a GPT-2 equal to the same method
on a copy whose Conv1D layers are converted to nn.Linear."""

import pytest
import torch

import attrkernels as ak
from attrkernels.integrations.hf import conv1d_params
from attrkernels.integrations.hf import conv1d_to_linear as as_linear

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra ([hf])")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_gpt2(seed=0):
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=13, n_positions=8,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0,
                                     attn_implementation="eager")  # forward-mode AD for IF-CG
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def batch(seed, n=4, length=6):
    return (torch.randint(0, 13, (n, length), generator=torch.Generator().manual_seed(seed)),)


def test_conv1d_per_example_gradients_match_autograd():
    model, task = tiny_gpt2(), ak.tasks.LanguageModeling()
    names = conv1d_params(model)
    (ids,) = batch(1)
    got = ak.capture.Gradients(model, task.loss, params=names)((ids,))
    params = dict(model.named_parameters())
    want = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        task.loss(model, (ids[b:b + 1],)).sum(), [params[n] for n in names])]) for b in range(ids.shape[0])])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    phi = ak.Featurizer(model, task.loss, 24, params=names)((ids,))
    torch.testing.assert_close(phi, ak.sketch(want, 24), rtol=1e-4, atol=1e-5)


def test_ekfac_on_conv1d_equals_ekfac_on_the_linear_copy():
    model, task = tiny_gpt2(), ak.tasks.LanguageModeling()
    linear = as_linear(model)
    (ids,) = batch(2, n=12)
    torch.testing.assert_close(linear(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    train = [(ids[i:i + 4],) for i in range(0, 12, 4)]
    test = [batch(3, n=3)]
    names = conv1d_params(model)
    for cls in (ak.EKFAC, ak.KFAC):
        got = cls(model, task, params=names, fisher="empirical", verbose=False).fit(train).score(test)
        want = cls(linear, task, params=names, fisher="empirical", verbose=False).fit(train).score(test)
        assert got.shape == (12, 3)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["trak-factored", "tracin", "cg"])
def test_every_gradient_method_on_conv1d_equals_the_linear_copy(name):
    # each method over the Conv1D weights: the factored projection works in the layer's factor
    # layout [d_out, d_in] (a Conv1D's transposed storage), so it equals the Linear copy's too
    model, task = tiny_gpt2(), ak.tasks.LanguageModeling()
    linear = as_linear(model)
    assert [n for n, _ in linear.named_parameters()] == [n for n, _ in model.named_parameters()]
    (ids,) = batch(4, n=8)
    train, test = [(ids[:4],), (ids[4:],)], [batch(5, n=3)]
    names = conv1d_params(model)

    def run(m):
        if name.startswith("trak"):
            method = ak.TRAK(m, task, k=32, params=names, mode="factored" if name.endswith("factored") else "dense",
                             verbose=False)
        elif name == "tracin":
            return ak.TracIn(m, task, params=names, verbose=False).fit(train, learning_rates=[0.1]).score(test)
        else:
            method = ak.InfluenceCG(m, task, damping=0.1, curvature="gauss-newton", tol=1e-6, params=names,
                                    verbose=False)
        return method.fit(train).score(test)

    got, want = run(model), run(linear)
    assert got.shape == (8, 3) and got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5 * want.abs().max().item())


def test_dense_trak_on_conv1d_equals_the_linear_copy_up_to_the_projection():
    # dense features sketch the gradient flattened in each model's storage order (a Conv1D's
    # [d_in, d_out] is the transpose of the Linear's [d_out, d_in]): the same gradients under two
    # projections, so the scores agree as sketches do. Measured at k = 512 over 840 parameters:
    # relative difference 0.031, correlation 0.9995.
    model, task = tiny_gpt2(), ak.tasks.LanguageModeling()
    linear = as_linear(model)
    (ids,) = batch(4, n=8)
    train, test = [(ids[:4],), (ids[4:],)], [batch(5, n=3)]
    names = conv1d_params(model)
    got, want = (ak.TRAK(m, task, k=512, params=names, verbose=False).fit(train).score(test) for m in (model, linear))
    assert ((got - want).norm() / want.norm()).item() < 0.06


def test_ekfac_covariances_on_conv1d_are_their_definitions_per_token():
    # A = mean over tokens (attention_mask 1) of [a, 1][a, 1]^T, S = sum over positions of
    # d d^T / examples, for c_attn's input a and output-gradient d (loss summed over tokens)
    model, task = tiny_gpt2(), ak.tasks.LanguageModeling()
    ids = batch(6, n=6)[0]
    mask = torch.ones_like(ids)
    mask[0, 4:], mask[3, 2:] = 0, 0
    b = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"]
    m = ak.KFAC(model, task, params=names, fisher="empirical", verbose=False).fit([b])
    f = m.factors[0]["transformer.h.0.attn.c_attn"]

    seen = {}
    module = model.transformer.h[0].attn.c_attn

    def keep(mod, args, out):
        seen["a"] = args[0].detach()
        out.register_hook(lambda g: seen.update(d=g.detach()))

    handle = module.register_forward_hook(keep)
    task.loss(model, b).sum().backward()
    handle.remove()
    model.zero_grad()
    a = torch.cat([seen["a"], torch.ones(*seen["a"].shape[:2], 1)], -1)[mask.bool()].double()
    d = seen["d"].reshape(-1, seen["d"].shape[-1]).double()
    torch.testing.assert_close(f.A, a.T @ a / a.shape[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(f.S, d.T @ d / ids.shape[0], rtol=1e-5, atol=1e-9)
