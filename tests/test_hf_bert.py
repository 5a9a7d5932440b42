"""A BERT-style encoder classifier from Hugging Face (tiny, random init) with dict batches
(input_ids, attention_mask, labels) through ak.tasks.Classification and every method: the
featurizer equals the sketch of autograd's per-example gradients, and TRAK, EK-FAC, K-FAC,
TracIn and IF-CG give finite scores that more padding of the queries does not change."""
import pytest
import torch

import attrkernels as ak

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra ([hf])")
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # position table (no batch dimension): torch.func

TASK = ak.tasks.Classification()
V = 17


def tiny_bert(seed=0):
    config = transformers.BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation="eager")  # forward-mode AD for IF-CG
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def batch(seed, n=4, length=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 4:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,), generator=g)}


def one(b, i):
    return {k: v[i:i + 1] for k, v in b.items()}


def test_classification_takes_dict_batches_and_output_objects():
    model = tiny_bert()
    b = batch(1)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(TASK.loss(model, b), torch.nn.functional.cross_entropy(logits, b["labels"],
                                                                                      reduction="none"))
    torch.testing.assert_close(TASK.measure(model, b), ak.tasks.base.margin(logits, b["labels"]))
    assert TASK.batch_size(b) == 4 and torch.equal(TASK.token_mask(b), b["attention_mask"])
    with pytest.raises(TypeError, match="dicts with 'labels'"):
        TASK.loss(model, {"input_ids": b["input_ids"]})

    class NoLogits(torch.nn.Module):
        def forward(self, input_ids):
            return {"hidden": input_ids.float()}

    with pytest.raises(TypeError, match="without logits"):
        TASK.loss(NoLogits(), {"input_ids": b["input_ids"], "labels": b["labels"]})


def test_featurizer_on_bert_is_the_sketch_of_autograd_gradients():
    model = tiny_bert()
    b = batch(2)
    params = dict(model.named_parameters())
    names = list(params)
    want = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        TASK.loss(model, one(b, i)).sum(), [params[n] for n in names])]) for i in range(4)])
    torch.testing.assert_close(ak.capture.Gradients(model, TASK.loss)(b), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ak.Featurizer(model, TASK.loss, 64, seed=1)(b), ak.sketch(want, 64, seed=1),
                               rtol=1e-4, atol=1e-5)
    assert ak.Featurizer(model, TASK.loss, 64, mode="factored")(b).shape == (4, 64)


@pytest.mark.parametrize("name", ["trak", "ekfac", "kfac", "tracin", "cg"])
def test_every_method_runs_on_bert_dict_batches(name):
    model = tiny_bert()
    train, test = [batch(3), batch(4)], [batch(5, n=3)]
    if name == "trak":
        m = ak.TRAK(model, TASK, k=32, verbose=False).fit(train)
    elif name in ("ekfac", "kfac"):
        m = (ak.EKFAC if name == "ekfac" else ak.KFAC)(model, TASK, verbose=False).fit(train)
        assert "bert.embeddings.position_embeddings.weight" in m.skipped  # looked up without the batch
        assert "classifier" in [layer.name for layer in m.layers]
    elif name == "tracin":
        m = ak.TracIn(model, TASK, verbose=False).fit(train, learning_rates=[0.1])
    else:
        m = ak.InfluenceCG(model, TASK, damping=0.1, curvature="gauss-newton", verbose=False).fit(train)
    scores = m.score(test)
    assert scores.shape == (8, 3) and torch.isfinite(scores).all() and scores.abs().max() > 0
    # more padding on every sequence (attention_mask 0) changes no score
    wider = [{k: (torch.cat([v, torch.zeros(v.shape[0], 2, dtype=v.dtype)], 1) if v.ndim == 2 else v)
              for k, v in b.items()} for b in test]
    torch.testing.assert_close(m.score(wider), scores, rtol=1e-3, atol=1e-5 * scores.abs().max().item())
