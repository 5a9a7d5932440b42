"""nn.MultiheadAttention: torch's forward uses its packed in-projection and out_proj functionally, so
the capture replaces it with the same computation written out (``handlers.attention``). Checked
here: that forward equals torch's (masks, need_weights, batch-first or not, cross-attention);
per-example gradients from the hooks (no torch.func fallback) against autograd on torch's own
module; EK-FAC / K-FAC factors of the in-projection against their definitions on an independent
re-implementation; the settings it does not capture still go to torch.func and are skipped by
EK-FAC with the reason."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attrkernels as ak
from attrkernels.capture.handlers.attention import forward as written_out

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TASK = ak.tasks.Classification()
MHA_PARAMS = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]


class Encoder(nn.Module):
    """Token embedding -> MultiheadAttention (key padding mask from token 0) -> LayerNorm -> mean -> Linear.
    ``memory``: "self" (query = key = value), "kv" (key = value = a second embedding of the tokens,
    reversed: another length-preserving sequence) or "cross" (key and value different tensors)."""

    def __init__(self, batch_first=True, vocab=11, d=8, classes=3, memory="self", need_weights=False, mem_len=4,
                 **mha):
        super().__init__()
        self.batch_first, self.memory, self.need_weights, self.mem_len = batch_first, memory, need_weights, mem_len
        self.emb = nn.Embedding(vocab, d)
        if memory != "self":
            self.mem = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=batch_first, **mha)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def inputs(self, idx):
        """(query, key, value [B, *, E], key padding mask [B, S]) of the attention."""
        x = self.emb(idx)
        pad = idx == 0
        if self.memory == "self":
            return x, x, x, pad
        k = self.mem(idx.flip(1)[:, :self.mem_len])
        return x, k, (k if self.memory == "kv" else torch.tanh(k)), pad.flip(1)[:, :self.mem_len]

    def forward(self, idx=None, attention_mask=None, input_ids=None):  # attention_mask: read as idx != 0
        idx = input_ids if idx is None else idx
        q, k, v, pad = self.inputs(idx)
        x = q
        if not self.batch_first:  # [T, B, E], keeping which inputs are the same tensor
            moved = {}
            q, k, v = (moved.setdefault(id(t), t.transpose(0, 1)) for t in (q, k, v))
        h, _ = self.attn(q, k, v, key_padding_mask=pad, need_weights=self.need_weights)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.norm(h + x)
        keep = (idx != 0).unsqueeze(-1).float()
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
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("inputs", ["self", "kv", "cross"])
def test_written_out_forward_equals_torchs(batch_first, need_weights, inputs):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    B, T, S = 3, 5, 4
    shape = (lambda n: (B, n, 8)) if batch_first else (lambda n: (n, B, 8))
    q = torch.randn(shape(T))
    k = q if inputs == "self" else torch.randn(shape(S))
    v = k if inputs != "cross" else torch.randn(k.shape)
    if inputs == "self":
        k = v = q
    s = k.shape[1] if batch_first else k.shape[0]
    padding = torch.zeros(B, s, dtype=torch.bool)
    padding[1, -1] = True
    for attn_mask in (None, torch.randn(T, s), torch.rand(B * 2, T, s) < 0.3):
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask[..., 0] = False  # every query attends to something
        kpm = padding if attn_mask is None or attn_mask.dtype == torch.bool else padding.float() * -1e4
        want = m(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights)
        got = written_out(m, None, q, k, v, kpm, need_weights, attn_mask, True, False)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        if need_weights:
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
            per_head = m(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, average_attn_weights=False)[1]
            torch.testing.assert_close(written_out(m, None, q, k, v, kpm, True, attn_mask, False, False)[1],
                                       per_head, rtol=1e-5, atol=1e-6)
        else:
            assert got[1] is None and want[1] is None
    x = torch.randn(T, 8)  # unbatched
    want, got = m(x, x, x), written_out(m, None, x, x, x, None, True, None, True, False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first,memory,need_weights", [(True, "self", False), (False, "self", True),
                                                             (True, "kv", False), (False, "cross", False),
                                                             (True, "cross", True)])
def test_mha_per_example_gradients_from_hooks_match_autograd(batch_first, memory, need_weights):
    torch.manual_seed(0)
    model = Encoder(batch_first, memory=memory, need_weights=need_weights).eval()
    b = batch(1)
    names = [n for n, _ in model.named_parameters()]
    assert set(MHA_PARAMS) <= set(names)
    want = autograd_grads(model, TASK.loss, b, names)
    grads = ak.capture.Gradients(model, TASK.loss, params=names)
    assert {"attn", "attn.out_proj"} <= set(grads.plan.hooked)
    assert not grads.plan.fallback  # every parameter from the hooks
    torch.testing.assert_close(grads(b), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ak.Featurizer(model, TASK.loss, 32, seed=3, params=names)(b),
                               ak.sketch(want, 32, seed=3), rtol=1e-4, atol=1e-5)
    fz = ak.Featurizer(model, TASK.loss, 32, seed=3, mode="factored", params=names)
    assert {"attn", "attn.out_proj"} <= {layer.module_name for layer in fz._kron}
    assert fz(b).shape == (5, 32)
    # outside a capture the module runs torch's own forward
    assert "forward" not in model.attn.__dict__


def test_only_out_proj_tracked_still_intercepts_the_attention():
    torch.manual_seed(0)
    model = Encoder().eval()
    b = batch(2)
    names = ["attn.out_proj.weight", "attn.out_proj.bias"]
    grads = ak.capture.Gradients(model, TASK.loss, params=names)
    assert list(grads.plan.patched) == ["attn"] and not grads.plan.fallback
    torch.testing.assert_close(grads(b), autograd_grads(model, TASK.loss, b, names), rtol=1e-4, atol=1e-6)


def reference_projections(model, idx):
    """(uses, loss): the in-projection's uses [(input [B, T, E], output [B, T, rows] requiring grad,
    rows)] of an independent re-implementation of the Encoder's attention (explicit softmax), and
    the summed loss; checked equal to the module's logits."""
    m, E, H = model.attn, model.attn.embed_dim, model.attn.num_heads
    x, k_in, v_in, pad = model.inputs(idx)
    uses = []
    for inp, rows in ((x, slice(0, E)), (k_in, slice(E, 2 * E)), (v_in, slice(2 * E, 3 * E))):
        y = (inp.detach() @ m.in_proj_weight[rows].T + m.in_proj_bias[rows]).detach().requires_grad_()
        uses.append((inp.detach(), y, rows))
    B = idx.shape[0]
    q, k, v = (y.reshape(B, -1, H, E // H).transpose(1, 2) for _, y, _ in uses)
    scores = q @ k.transpose(-1, -2) / (E // H) ** 0.5 + torch.where(pad, float("-inf"), 0.0)[:, None, None]
    h = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, -1, E)
    h = model.norm(m.out_proj(h) + x)
    keep = (idx != 0).unsqueeze(-1).float()
    logits = model.head((h * keep).sum(1) / keep.sum(1))
    torch.testing.assert_close(logits, model(idx), rtol=1e-5, atol=1e-6)
    return uses, logits


@pytest.mark.parametrize("memory,masked", [("self", False), ("cross", False), ("self", True), ("cross", True)])
def test_kfac_factors_of_the_in_projection_are_their_definitions(memory, masked):
    # A = mean over positions of [a, 1][a, 1]^T, S = sum over positions of d d^T / examples, where a
    # self-attention's position is one token (d: the gradient of its q|k|v) and cross-attention's
    # uses are positions of their own (d zero outside the use's rows). With a dict batch's
    # attention_mask (``masked``), padded query tokens leave A; cross-attention's key / value
    # positions (a memory of the same length here) all stay, the mask not being theirs.
    torch.manual_seed(0)
    model = Encoder(memory=memory, mem_len=6).eval()
    idx, labels = batch(4)
    mask = (idx != 0).long()
    data = {"input_ids": idx, "attention_mask": mask, "labels": labels} if masked else (idx, labels)
    m = ak.KFAC(model, TASK, params=["attn.in_proj_weight", "attn.in_proj_bias"], fisher="empirical",
                verbose=False).fit([data])
    f = m.factors[0]["attn"]
    uses, logits = reference_projections(model, idx)
    F.cross_entropy(logits, labels, reduction="sum").backward()
    B, E = idx.shape[0], model.attn.embed_dim
    keep = mask.bool() if masked else torch.ones_like(idx, dtype=torch.bool)
    if memory == "self":
        a = uses[0][0]
        d = torch.cat([y.grad for _, y, _ in uses], -1)
        pairs = [(a, d, keep)]
    else:
        pairs = []
        for a, y, rows in uses:
            d = torch.zeros(*y.shape[:2], 3 * E)
            d[..., rows] = y.grad
            pairs.append((a, d, keep if rows.start == 0 else torch.ones(y.shape[:2], dtype=torch.bool)))
    a = torch.cat([torch.cat([p[0], torch.ones(*p[0].shape[:2], 1)], -1)[p[2]] for p in pairs]).double()
    d = torch.cat([p[1].reshape(-1, 3 * E) for p in pairs]).double()
    torch.testing.assert_close(f.A, a.T @ a / a.shape[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(f.S, d.T @ d / B, rtol=1e-5, atol=1e-9)


def kron_layout(model, grads, name):
    """A layer's per-example gradient [n, d_out, d_in + 1] (bias column last) from autograd's
    gradients {parameter name: [n, ...]}."""
    weight = "in_proj_weight" if name == "attn" else "weight"
    bias = "in_proj_bias" if name == "attn" else "bias"
    prefix = f"{name}." if name != "attn" else "attn."
    return torch.cat([grads[prefix + weight], grads[prefix + bias][:, :, None]], 2).double()


def test_ekfac_scores_of_the_attention_equal_the_explicit_reference():
    # -sum over layers of <Q_S^T G_train Q_A, Q_S^T G_test Q_A / (Lambda + damping)> with G from
    # autograd on torch's own module, in the bases EK-FAC fitted, Lambda the mean of the rotated
    # training gradients squared
    torch.manual_seed(0)
    model = Encoder(memory="kv").eval()
    names = MHA_PARAMS
    m = ak.EKFAC(model, TASK, params=names, fisher="empirical", damping=1e-3, verbose=False)
    assert [layer.name for layer in m.layers] == ["attn", "attn.out_proj"]
    train, test = [batch(2), batch(3)], [batch(4, n=2)]
    got = m.fit(train).score(test)

    def grads(fn, batches):
        g = torch.cat([autograd_grads(model, fn, b, names) for b in batches])
        out, start = {}, 0
        for n in names:
            p = dict(model.named_parameters())[n]
            out[n] = g[:, start:start + p.numel()].reshape(-1, *p.shape)
            start += p.numel()
        return out

    g_train, g_test = grads(TASK.loss, train), grads(TASK.measure, test)
    want = 0
    for name in ("attn", "attn.out_proj"):
        f = m.factors[0][name]
        Qa, Qs = f.basis_a.dense(), f.basis_s.dense()
        r_train = Qs.T @ kron_layout(model, g_train, name) @ Qa
        r_test = Qs.T @ kron_layout(model, g_test, name) @ Qa
        lam = r_train.square().mean(0)
        torch.testing.assert_close(f.lam.double(), lam, rtol=1e-4, atol=1e-9)
        want = want - torch.einsum("ioc,joc->ij", r_train, r_test / (lam + 1e-3))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_uncaptured_settings_fall_back_and_ekfac_skips_them_with_the_reason():
    torch.manual_seed(0)
    model = Encoder(add_bias_kv=True).eval()
    b = batch(1)
    names = [n for n, _ in model.named_parameters()]
    grads = ak.capture.Gradients(model, TASK.loss, params=names)
    fallback = {n for n, _ in grads.plan.fallback}
    assert set(MHA_PARAMS) | {"attn.bias_k", "attn.bias_v"} == fallback  # no hook sees them
    torch.testing.assert_close(grads(b), autograd_grads(model, TASK.loss, b, names), rtol=1e-4, atol=1e-6)
    m = ak.EKFAC(model, TASK, fisher="empirical", verbose=False)
    assert set(MHA_PARAMS) <= set(m.skipped)
    assert [layer.name for layer in m.layers] == ["emb", "head"]
    for name in ("attn.in_proj_weight", "attn.out_proj.weight"):
        with pytest.raises(ValueError, match=rf"{name} \(used functionally inside the MultiheadAttention 'attn': "
                                             r"add_bias_kv=True\).*Leave them out of params="):
            ak.EKFAC(model, TASK, params=[name, "head.weight"], verbose=False)


class TransformerClassifier(nn.Module):
    """torch's own nn.TransformerEncoder (2 layers, key padding mask) over token embeddings."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, idx):
        return self.head(self.enc(self.emb(idx), src_key_padding_mask=idx == 0).mean(1))


def test_torch_transformer_encoder_layers_are_captured_and_factored():
    torch.manual_seed(0)
    model = TransformerClassifier().eval()
    b = batch(5)
    names = [n for n, _ in model.named_parameters()]
    grads = ak.capture.Gradients(model, TASK.loss)
    assert list(grads.plan.patched) == ["enc.layers.0.self_attn", "enc.layers.1.self_attn"]
    assert not grads.plan.fallback
    torch.testing.assert_close(grads(b), autograd_grads(model, TASK.loss, b, names), rtol=1e-4, atol=1e-6)
    m = ak.EKFAC(model, TASK, fisher="empirical", verbose=False)
    assert {"enc.layers.0.self_attn", "enc.layers.1.self_attn.out_proj"} <= {layer.name for layer in m.layers}
    assert all(".norm" in name for name in m.skipped)
