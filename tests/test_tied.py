"""Tied weights (GPT-2's lm_head.weight is wte.weight): one parameter whose per-example gradient
is the sum of both uses, counted once in features, gradients and EK-FAC / K-FAC factors and
scores (against autograd per-example gradients and a direct computation of the factors)."""
import warnings

import pytest
import torch

import attrkernels as ak

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra ([hf])")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, D = 13, 8
WTE = "transformer.wte.weight"


def tiny_gpt2(seed=0):
    config = transformers.GPT2Config(n_layer=1, n_embd=D, n_head=2, vocab_size=V, n_positions=8,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def ids(seed, n=4, length=6):
    return torch.randint(0, V, (n, length), generator=torch.Generator().manual_seed(seed))


def autograd_grads(model, fn, x, names):
    params = dict(model.named_parameters())
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        fn(model, {"input_ids": x[b:b + 1]}).sum(), [params[n] for n in names])]) for b in range(x.shape[0])])


def test_tied_weight_gradient_is_both_uses_summed_once():
    model, task = tiny_gpt2(), ak.tasks.LanguageModeling()
    assert model.lm_head.weight is model.transformer.wte.weight
    x = ids(1)
    names = [n for n, _ in model.named_parameters()]  # the tied weight appears once, as WTE
    want = autograd_grads(model, task.loss, x, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # wpe (no batch dimension) goes to torch.func
        got = ak.capture.Gradients(model, task.loss)({"input_ids": x})
        phi = ak.Featurizer(model, task.loss, 40, seed=2)({"input_ids": x})
        fz = ak.Featurizer(model, task.loss, 40, seed=2, mode="factored")
        factored = fz({"input_ids": x})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(phi, ak.sketch(want, 40, seed=2), rtol=1e-4, atol=1e-5)
    # factored: the tied weight is sketched densely with the rest (both uses summed), never
    # Kronecker-projected from one use
    assert WTE in [n for n, _ in fz._rest] and all(layer.param is not model.lm_head.weight for layer in fz._kron)
    offsets = fz.plan.offsets
    rest = torch.cat([want[:, offsets[id(p)]:offsets[id(p)] + p.numel()] for _, p in fz._rest], 1)
    torch.testing.assert_close(factored[:, fz._rest_col:], ak.sketch(rest, fz._rest_k, seed=fz._rest_seed),
                               rtol=1e-4, atol=1e-5)


def reference_factors(model, task, x):
    """A, S of the tied weight as K-FAC-expand over its two uses, computed directly: lm_head's
    positions (a = its input, d = d loss / d logits) and wte's (a = d loss / d embedding output,
    d = one-hot token); A averages over all positions, S sums over positions, averages over examples."""
    grabbed = {}
    hook = model.lm_head.register_forward_hook(lambda m, args, out: grabbed.update(h=args[0]))
    emb = model.transformer.wte(x).detach().requires_grad_(True)
    out = model(inputs_embeds=emb)
    hook.remove()
    logits = out.logits
    loss = task.logit_loss(logits[:, :-1], {"input_ids": x})
    d_logits, d_emb = torch.autograd.grad(loss.sum(), [logits, emb])
    h = grabbed["h"].detach()
    a = torch.cat([h, d_emb], 1).reshape(-1, D).double()
    d = torch.cat([d_logits, torch.nn.functional.one_hot(x, V).float()], 1).reshape(-1, V).double()
    return a.T @ a / a.shape[0], d.T @ d / x.shape[0]


@pytest.mark.parametrize("cls", [ak.EKFAC, ak.KFAC])
def test_ekfac_factors_the_tied_weight_once_over_both_uses(cls):
    model, task = tiny_gpt2(), ak.tasks.LanguageModeling()
    train, test = ids(2, n=12), ids(3, n=3)
    m = cls(model, task, params=[WTE], fisher="empirical", verbose=False)
    assert [(layer.name, layer.tied, layer.params) for layer in m.layers] == [("lm_head", ("transformer.wte",), (WTE,))]
    got = m.fit([{"input_ids": train[i:i + 4]} for i in range(0, 12, 4)]).score([{"input_ids": test}])

    A, S = reference_factors(model, task, train)
    f = m.factors[0]["lm_head"]
    torch.testing.assert_close(f.A, A, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(f.S, S, rtol=1e-4, atol=1e-7)
    eig_a, Q_a = torch.linalg.eigh(A)
    eig_s, Q_s = torch.linalg.eigh(S)
    G = autograd_grads(model, task.loss, train, [WTE]).double().reshape(-1, V, D)  # both uses, autograd
    Gq = autograd_grads(model, task.measure, test, [WTE]).double().reshape(-1, V, D)
    R, Rq = Q_s.T @ G @ Q_a, Q_s.T @ Gq @ Q_a
    values = (R ** 2).mean(0) if cls is ak.EKFAC else torch.outer(eig_s.clamp_min(0), eig_a.clamp_min(0))
    want = -torch.einsum("iov,jov->ij", R, Rq / (values + 0.1 * values.mean()))
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=1e-5 * want.abs().max().item())


def test_ekfac_with_default_params_leaves_out_the_position_table_and_keeps_the_tied_weight():
    model, task = tiny_gpt2(), ak.tasks.LanguageModeling()
    train = [{"input_ids": ids(4, n=4)}, {"input_ids": ids(5, n=4)}]
    m = ak.EKFAC(model, task, fisher="empirical", verbose=False)
    scores = m.fit(train).score([{"input_ids": ids(6, n=2)}])
    assert scores.shape == (8, 2) and torch.isfinite(scores).all()
    assert "transformer.wpe.weight" in m.skipped and WTE not in m.skipped
    assert "transformer.wpe" not in [layer.name for layer in m.layers]
    assert sum(WTE in layer.params for layer in m.layers) == 1
    with pytest.raises(ValueError, match=r"transformer.wpe.*without the batch dimension"):
        ak.EKFAC(model, task, params=["transformer.wpe.weight"], fisher="empirical", verbose=False).fit(train)


def test_ekfac_refuses_a_weight_also_used_where_no_hook_sees_it():
    class FunctionalTie(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4)

        def forward(self, idx):
            return self.fc(self.emb(idx).mean(1)) @ self.emb.weight.T  # functional use of the embedding

    torch.manual_seed(0)
    model, task = FunctionalTie(), ak.tasks.Classification()
    train = [(torch.randint(0, 10, (6, 3)), torch.randint(0, 10, (6,)))]
    with pytest.raises(ValueError, match=r"'emb.weight' do not add up .*EK-FAC / K-FAC cannot factor it: leave it "
                                         r"out of params="):
        ak.EKFAC(model, task, verbose=False).fit(train)
    m = ak.KFAC(model, task, params=["fc.weight", "fc.bias"], verbose=False).fit(train)
    assert m.score(train).shape == (6, 6)
