"""Padding contributes nothing: the same sequences padded to two lengths (attention_mask 0 and
labels -100 on the padding) give the same features (dense and factored), EK-FAC / K-FAC factors,
and scores of every method. With labels -100 and no attention mask, right padding (which a
causal model never attends to from a real token) leaves the factors unchanged too."""
import warnings

import pytest
import torch

import attrkernels as ak

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra ([hf])")
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # wpe (no batch dimension): torch.func

V, PAD = 13, 0
TASK = ak.tasks.LanguageModeling()
TRAIN_LENGTHS = [6, 4, 5, 3, 6, 2, 5, 4]
TEST_LENGTHS = [5, 3, 6]
# float32 forward passes over 6 and 8 positions differ by rounding: relative tolerances
RTOL, ATOL = 2e-4, 1e-6


def tiny_gpt2(seed=0):
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=V, n_positions=8,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0,
                                     attn_implementation="eager")  # forward-mode AD for IF-CG
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def sequences(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in lengths]


def padded(seqs, length, mask=True):
    """A dict batch of right-padded sequences (pad token 0; labels -100 on padding)."""
    ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
    attention = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], attention[i, :len(s)] = s, 1
    batch = {"input_ids": ids, "labels": ids.masked_fill(attention == 0, -100)}
    if mask:
        batch["attention_mask"] = attention
    return batch


def loaders(length, mask=True):
    train = sequences(TRAIN_LENGTHS, 1)
    return ([padded(train[i:i + 4], length, mask) for i in range(0, len(train), 4)],
            [padded(sequences(TEST_LENGTHS, 2), length, mask)])


def close(got, want):
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * max(1.0, want.abs().max().item()))


def test_token_mask_marks_tokens_up_to_the_last_target():
    batch = padded(sequences([3, 5], 0), 6)
    want = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    assert torch.equal(TASK.token_mask(batch), want)
    del batch["attention_mask"]  # -100 labels alone: positions after the last target are no tokens
    assert torch.equal(TASK.token_mask(batch), want)


@pytest.mark.parametrize("mode", ["dense", "factored"])
def test_padding_changes_no_feature(mode):
    model = tiny_gpt2()
    (short,), (long,) = loaders(6)[1], loaders(8)[1]
    fz = ak.Featurizer(model, TASK.loss, 48, seed=1, mode=mode)
    close(fz(long), fz(short))


@pytest.mark.parametrize("cls", [ak.EKFAC, ak.KFAC])
@pytest.mark.parametrize("mask", [True, False])
def test_padding_changes_no_factor_and_no_score_of_ekfac(cls, mask):
    model = tiny_gpt2()
    runs = []
    for length in (6, 8):
        train, test = loaders(length, mask)
        m = cls(model, TASK, fisher="empirical", verbose=False)
        runs.append((m.fit(train).score(test), m.factors[0]))
    (want, factors), (got, padded_factors) = runs
    assert "lm_head" in factors and "transformer.h.0.attn.c_attn" in factors
    for name, f in factors.items():
        for key in ("A", "S") + (("lam",) if cls is ak.EKFAC else ()):
            close(getattr(padded_factors[name], key), getattr(f, key))
    close(got, want)


@pytest.mark.parametrize("name", ["trak", "tracin", "cg"])
def test_padding_changes_no_score(name):
    model = tiny_gpt2()

    def make():
        if name == "trak":
            return ak.TRAK(model, TASK, k=32, verbose=False)
        if name == "tracin":
            return ak.TracIn(model, TASK, verbose=False)
        return ak.InfluenceCG(model, TASK, damping=0.1, curvature="gauss-newton", tol=1e-6, verbose=False)

    scores = []
    for length in (6, 8):
        train, test = loaders(length)
        m = make()
        m = m.fit(train, learning_rates=[0.1]) if name == "tracin" else m.fit(train)
        scores.append(m.score(test))
    close(scores[1], scores[0])


def test_empirical_ekfac_scores_from_kept_rotations_equal_the_stored_factors_path(tmp_path):
    # the tied lm_head / wte layer and padded dict batches through the correction's kept rotated
    # gradients (no store) and through a model pass over the training data (a store keeps nothing)
    model = tiny_gpt2()
    train, test = loaders(8)
    kept = ak.EKFAC(model, TASK, fisher="empirical", verbose=False).fit(train)
    assert list(kept.passes.rotated) == [0]
    stored = ak.EKFAC(model, TASK, fisher="empirical", store=tmp_path, verbose=False).fit(train)
    assert stored.passes.rotated == {}
    close(kept.score(test), stored.score(test))
    close(kept.self_influence(), stored.self_influence())
