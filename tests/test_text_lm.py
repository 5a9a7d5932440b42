"""The text-lm built-in task: offline data, disjoint pre-training text, a cached deterministic base."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the text-lm task needs the [hf] extra (transformers)")

from attrkernels.tasks.text_lm import TextLM, byte_windows, topic_texts  # noqa: E402
from attrkernels.tasks.training import Recipe  # noqa: E402

TINY = dict(n_train=24, n_test=6, length=16, n_pretrain=64, n_layer=1, n_embd=16, n_head=2,
            recipe=Recipe(epochs=1, batch_size=8, lr=1e-3, optimizer="adam", schedule="linear"),
            pretrain=Recipe(epochs=1, batch_size=64, lr=3e-3, optimizer="adam", schedule="linear"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRKERNELS_CACHE", str(tmp_path))
    return tmp_path


def test_windows_are_bytes_of_the_help_texts():
    texts = topic_texts()
    assert len(texts) > 50 and sum(map(len, texts)) > 100_000
    w = byte_windows(["abcdefgh", "xyz"], 3)
    assert w.tolist() == [list(b"abc"), list(b"def"), list(b"xyz")]


def test_attribution_windows_come_from_topics_unseen_in_pretraining(cache):
    bench = TextLM(**TINY)
    pre, train, test = bench._corpora()
    assert train.shape == (24, 16) and test.shape == (6, 16) and train.dtype == torch.int64
    pre_rows = {tuple(r) for r in pre.tolist()}
    assert not pre_rows & {tuple(r) for r in train.tolist() + test.tolist()}


def test_base_is_pretrained_once_deterministically_and_shared_by_every_seed(cache):
    bench = TextLM(**TINY)
    a = bench.make_model(0).state_dict()
    files = list((cache / "text-lm").glob("base-*.pt"))
    assert len(files) == 1
    again = TextLM(**TINY).make_model(5).state_dict()  # loaded from the cache, any seed
    assert all(torch.equal(a[k], again[k]) for k in a)
    files[0].unlink()
    fresh = TextLM(**TINY).make_model(0).state_dict()  # pre-trained again: identical
    assert all(torch.equal(a[k], fresh[k]) for k in a)
    base = bench.make_model(0)
    assert base.lm_head.weight is base.transformer.wte.weight  # tied, as GPT-2


def test_fine_tuning_seeds_change_only_the_data_order(cache):
    bench = TextLM(**TINY)
    m1, _ = bench.train(np.arange(12), seed=1)
    m1b, _ = bench.train(np.arange(12), seed=1)
    m2, _ = bench.train(np.arange(12), seed=2)
    s1, s1b, s2 = m1.state_dict(), m1b.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s1b[k]) for k in s1)
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)
    out = bench.task.measure(m1, bench.test_data().tensors)
    assert out.shape == (6,) and (out < 0).all()


def test_config_names_what_changes_the_ground_truth(cache):
    assert TextLM(**TINY).config_hash() != TextLM(**{**TINY, "n_embd": 32}).config_hash()
    assert TextLM(**TINY).config_hash() != TextLM(**{**TINY, "pretrain_fraction": 0.4}).config_hash()
