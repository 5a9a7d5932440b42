"""ak.tasks.LanguageModeling: summed next-token cross-entropy, log-likelihood, padding, errors."""
import math

import pytest
import torch
import torch.nn as nn

from attrkernels.tasks.language import IGNORE, LanguageModeling


class TinyCausal(nn.Module):
    """Bigram model: logits at t depend on token t only (causal, no attention)."""

    def __init__(self, vocab=7, d=5):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, vocab)

    def forward(self, input_ids):
        return self.out(self.emb(input_ids).tanh())


class Wrapped(TinyCausal):
    """Returns an object with .logits, and takes attention_mask (as Hugging Face models do)."""

    def forward(self, input_ids=None, attention_mask=None):
        return type("Out", (), {"logits": super().forward(input_ids)})()


def reference_loss(model, ids, labels):
    logits = model(ids)
    total = []
    for b in range(ids.shape[0]):
        s = 0.0
        for t in range(ids.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != IGNORE:
                s -= torch.log_softmax(logits[b, t].double(), -1)[y].item()
        total.append(s)
    return torch.tensor(total, dtype=torch.float64)


def test_loss_is_the_summed_next_token_cross_entropy_and_measure_its_negative():
    model, task = TinyCausal(), LanguageModeling()
    ids = torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids}
    torch.testing.assert_close(task.loss(model, batch).double(), reference_loss(model, ids, ids), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(task.measure(model, batch), -task.loss(model, batch))
    torch.testing.assert_close(task.logit_loss(task.logits(model, batch), batch), task.loss(model, batch))
    assert torch.equal(task.out_to_loss(model, batch), torch.ones(3))
    assert task.batch_size(batch) == 3


def test_padding_contributes_nothing():
    model, task = TinyCausal(), LanguageModeling()
    ids = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 5), torch.zeros(2, 3)], 1).long()
    want = task.loss(model, {"input_ids": ids})
    torch.testing.assert_close(task.loss(model, {"input_ids": padded, "attention_mask": mask}), want)
    labels = padded.masked_fill(mask == 0, IGNORE)
    torch.testing.assert_close(task.loss(Wrapped(), {"input_ids": padded, "attention_mask": mask, "labels": labels}),
                               want)


def test_sampled_loss_draws_targets_from_the_model_and_keeps_padding_ignored():
    model, task = TinyCausal(), LanguageModeling()
    ids = torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, 3:] = IGNORE
    batch = {"input_ids": ids, "labels": labels}
    a = task.sampled_loss(model, batch, torch.Generator().manual_seed(0))
    b = task.sampled_loss(model, batch, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (4,) and (a > 0).all()
    # the expected sampled loss per token is the entropy of the prediction
    many = torch.stack([task.sampled_loss(model, {"input_ids": ids}, torch.Generator().manual_seed(s))
                        for s in range(400)]).mean(0)
    p = torch.softmax(model(ids)[:, :-1].double(), -1)
    entropy = -(p * p.log()).sum(-1).sum(1)
    torch.testing.assert_close(many.double(), entropy, rtol=0.05, atol=0.05)


def test_bad_batches_and_outputs_name_the_fix():
    model, task = TinyCausal(), LanguageModeling()
    ids = torch.randint(0, 7, (2, 4))
    with pytest.raises(TypeError, match="input_ids"):
        task.loss(model, {"tokens": ids})
    with pytest.raises(TypeError, match="dict batches"):
        task.loss(model, ids)
    torch.testing.assert_close(task.loss(model, (ids,)), task.loss(model, {"input_ids": ids}))
    labels = ids.clone()
    labels[1, 1:] = IGNORE
    with pytest.raises(ValueError, match=r"no target token .*: examples \[1\]; .*drop them"):
        task.loss(model, {"input_ids": ids, "labels": labels})
    labels = ids.clone()
    labels[0, 2] = 9
    with pytest.raises(ValueError, match="label 9 at sequence 0, position 2 is outside the vocabulary"):
        task.loss(model, {"input_ids": ids, "labels": labels})

    class NoLogits(nn.Module):
        def forward(self, input_ids):
            return {"hidden": input_ids.float()}

    with pytest.raises(TypeError, match="without logits"):
        task.loss(NoLogits(), {"input_ids": ids})
    with pytest.raises(ValueError, match="longer than the model's 3 positions"):
        LanguageModeling(max_positions=3).loss(model, {"input_ids": ids})


def test_hugging_face_gpt2_outputs_and_position_limit():
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra ([hf])")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=11, n_positions=8,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    task = LanguageModeling()
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(4))
    loss = task.loss(model, {"input_ids": ids})
    want = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1),
                                             reduction="none").reshape(2, 5).sum(1)
    torch.testing.assert_close(loss, want)
    # right padding with the attention mask changes nothing
    padded = torch.cat([ids, torch.zeros(2, 2, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 2)], 1).long()
    torch.testing.assert_close(task.loss(model, {"input_ids": padded, "attention_mask": mask}), loss,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="longer than the model's 8 positions"):
        task.loss(model, {"input_ids": torch.zeros(1, 9, dtype=torch.long)})
    assert math.isfinite(float(task.measure(model, {"input_ids": ids}).sum()))


@pytest.mark.parametrize("method", ["trak", "ekfac"])
def test_bad_input_reaches_the_user_through_the_methods(method):
    import attrkernels as ak

    def fit(model, batches, task=None):
        task = task or LanguageModeling()
        m = ak.TRAK(model, task, k=8, verbose=False) if method == "trak" else ak.EKFAC(model, task, verbose=False)
        return m.fit(batches)

    ids = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[2, 1:] = IGNORE  # every target of sequence 6 of the loader is ignored
    with pytest.raises(ValueError, match=r"no target token .*: examples \[6\] of the train loader.*drop them"):
        fit(TinyCausal(), [{"input_ids": ids}, {"input_ids": ids, "labels": labels}])
    with pytest.raises(ValueError, match="longer than the model's 4 positions; truncate or split them"):
        fit(TinyCausal(), [{"input_ids": ids}], LanguageModeling(max_positions=4))
    with pytest.raises(TypeError, match=r"expects dict batches with 'input_ids'.*got \['tokens'\]"):
        fit(TinyCausal(), [{"tokens": ids}])

    class NoLogits(TinyCausal):
        def forward(self, input_ids):
            return {"hidden": super().forward(input_ids)}

    with pytest.raises(TypeError, match="without logits.*object with .logits"):
        fit(NoLogits(), [{"input_ids": ids}])
