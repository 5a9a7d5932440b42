"""nn.MultiheadAttention: its packed in_proj and its out_proj are used functionally (inside
F.multi_head_attention_forward), so no hook sees them. Their per-example gradients come from
torch.func (checked against autograd, with a key padding mask, batch-first or not); EK-FAC /
K-FAC list them as skipped with the reason and refuse them when named."""
import pytest
import torch
import torch.nn as nn

import attrkernels as ak

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TASK = ak.tasks.Classification()
MHA_PARAMS = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]


class Encoder(nn.Module):
    """Token embedding -> MultiheadAttention (key padding mask from token 0) -> LayerNorm -> mean -> Linear."""

    def __init__(self, batch_first=True, vocab=11, d=8, classes=3):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=batch_first)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, idx):
        x = self.emb(idx)
        pad = idx == 0
        if not self.batch_first:
            x = x.transpose(0, 1)
        h, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.norm(h + x if self.batch_first else h + x.transpose(0, 1))
        keep = (~pad).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))


def batch(seed, n=5, length=6):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, 11, (n, length), generator=g)
    idx[1, 4:] = 0  # padding
    return idx, torch.randint(0, 3, (n,), generator=g)


def autograd_grads(model, fn, b, names):
    params = dict(model.named_parameters())
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        fn(model, (b[0][i:i + 1], b[1][i:i + 1])).sum(), [params[n] for n in names])]) for i in range(b[0].shape[0])])


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_per_example_gradients_match_autograd(batch_first):
    torch.manual_seed(0)
    model = Encoder(batch_first).eval()
    b = batch(1)
    names = [n for n, _ in model.named_parameters()]
    assert set(MHA_PARAMS) <= set(names)
    want = autograd_grads(model, TASK.loss, b, names)
    grads = ak.capture.Gradients(model, TASK.loss)
    assert {n for n, _ in grads.plan.fallback} == set(MHA_PARAMS)  # no hook sees them
    torch.testing.assert_close(grads(b), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ak.Featurizer(model, TASK.loss, 32, seed=3)(b), ak.sketch(want, 32, seed=3),
                               rtol=1e-4, atol=1e-5)
    fz = ak.Featurizer(model, TASK.loss, 32, seed=3, mode="factored")
    assert "attn.out_proj" not in [layer.module_name for layer in fz._kron]
    assert fz(b).shape == (5, 32)


def test_ekfac_skips_mha_with_the_reason_and_refuses_it_when_named():
    torch.manual_seed(0)
    model = Encoder().eval()
    m = ak.EKFAC(model, TASK, fisher="empirical", verbose=False)
    assert set(MHA_PARAMS) <= set(m.skipped)
    assert [layer.name for layer in m.layers] == ["emb", "head"]
    scores = m.fit([batch(2), batch(3)]).score([batch(4, n=2)])
    assert scores.shape == (10, 2) and torch.isfinite(scores).all()
    for name in ("attn.in_proj_weight", "attn.out_proj.weight"):
        with pytest.raises(ValueError, match=rf"{name} \(used functionally inside the MultiheadAttention 'attn'\)"
                                             r".*Leave them out of params="):
            ak.EKFAC(model, TASK, params=[name, "head.weight"], verbose=False)
