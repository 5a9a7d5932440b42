"""The Conv1D -> nn.Linear copy (``attrkernels.integrations.hf``) that peers tracking only
nn.Linear run on: same logits, same gradients (transposed), tied weights still tied, the
original untouched, and a clear error for a model with nothing to convert."""
import pytest
import torch
import torch.nn as nn

import attrkernels as ak
from attrkernels.integrations.hf import conv1d_names, conv1d_params, conv1d_to_linear

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra ([hf])")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_gpt2(dtype=torch.float32, seed=0):
    config = transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=13, n_positions=8,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def ids(n=5, length=7, seed=1):
    return torch.randint(0, 13, (n, length), generator=torch.Generator().manual_seed(seed))


def test_linear_copy_has_the_same_logits_and_transposed_gradients():
    x = ids()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        model = tiny_gpt2(dtype)
        linear = conv1d_to_linear(model)
        names = conv1d_names(model)
        assert len(names) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
        for name in names:
            assert type(linear.get_submodule(name)) is nn.Linear
        torch.testing.assert_close(linear(x).logits, model(x).logits, rtol=tol, atol=tol)
        model(x).logits.logsumexp(-1).sum().backward()
        linear(x).logits.logsumexp(-1).sum().backward()
        for name in names:
            conv, lin = model.get_submodule(name), linear.get_submodule(name)
            torch.testing.assert_close(lin.weight.grad, conv.weight.grad.T, rtol=tol, atol=tol)
            torch.testing.assert_close(lin.bias.grad, conv.bias.grad, rtol=tol, atol=tol)


def test_copy_keeps_ties_and_leaves_the_original_alone():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linear = conv1d_to_linear(model)
    assert linear.lm_head.weight is linear.transformer.wte.weight
    assert linear.lm_head.weight is not model.lm_head.weight
    assert conv1d_names(model) and not conv1d_names(linear)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad():
        linear.transformer.h[0].attn.c_attn.weight.add_(1.0)
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, before["transformer.h.0.attn.c_attn.weight"])


def test_same_gradient_inner_products_on_the_copy():
    model, task = tiny_gpt2(), ak.tasks.LanguageModeling()
    linear = conv1d_to_linear(model)
    params = conv1d_params(model)
    assert len(params) == 16
    train, test = [(ids(6, seed=2),)], [(ids(3, seed=3),)]
    # exact gradient inner products (TracIn without a sketch) do not depend on the storage layout;
    # a sketch would (it projects the flattened gradient, whose order the transpose changes)
    got = ak.TracIn(model, task, verbose=False).fit(train, learning_rates=1.0).score(test)
    want = ak.TracIn(linear, task, verbose=False).fit(train, learning_rates=1.0).score(test)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * got.abs().max().item())


def test_nothing_to_convert_is_an_error():
    with pytest.raises(ValueError, match="no transformers Conv1D"):
        conv1d_to_linear(nn.Sequential(nn.Linear(3, 2)))
