"""``text-lm``: a byte-level GPT-2 fine-tuned on English text that ships with Python.

Data. The topic texts of Python's own help system (``pydoc_data.topics``: about 460,000
characters of English prose and code examples; part of the standard library, no download),
as UTF-8 bytes (vocabulary 256), cut into windows of ``length`` bytes. Topics are sorted by
name and shuffled with ``np.random.default_rng(split_seed)``; the first ``pretrain_fraction`` of
them form the pre-training corpus (all its windows, or ``n_pretrain`` of them drawn with the same
generator), the rest the attribution corpus, whose windows are shuffled
with the same generator: the first ``n_train`` are the training set, the next ``n_test`` the
test set. Pre-training and attribution texts never share a topic.

Model. ``transformers.GPT2LMHeadModel`` built from a config (``n_layer`` blocks of width
``n_embd``, ``n_head`` heads, ``length`` positions, vocabulary 256; the LM head tied to the
token embedding; dropout off), random initialisation: no weights are downloaded. Needs the
``[hf]`` extra (transformers).

Protocol (fine-tuning, as the published language-model LDS numbers use). One base model is
pre-trained once on the pre-training corpus (``pretrain`` recipe, seed ``pretrain_seed``) and
cached on disk (``$ATTRKERNELS_CACHE`` or ``~/.cache/attrkernels``, keyed by the hash of the
config). Every model of the evaluator — the full-data model and each subset's — starts from that
base and is fine-tuned with ``recipe`` on its training sequences; ``seed`` changes only the data
order. Training a tiny language model from scratch on half-subsets instead leaves the ground
truth dominated by seed noise (split-half reliability ~0.1). With fine-tuning, the quick
protocol (50 subsets x 2 seeds; 100 models of about 5 s each, 4.6 minutes on 2 cores) gives a
split-half correlation of 0.73 between single seeds (0.74 with each model's mean test
log-probability removed); the default protocol (100 x 4) averages twice as many seeds.

Measurement: the test sequence's log-probability (``LanguageModeling.measure`` = minus its
summed token loss).
"""
from __future__ import annotations

import fcntl
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..store.atomic import atomic_write
from .benchmark import Benchmark, register
from .language import LanguageModeling
from .training import Recipe, seeded_module, train_classifier


def topic_texts() -> list[str]:
    """The texts of ``pydoc_data.topics`` sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def byte_windows(texts: list[str], length: int) -> np.ndarray:
    """Non-overlapping windows [n, length] (uint8) of each text's UTF-8 bytes (tails dropped)."""
    rows = []
    for text in texts:
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        n = data.size // length
        if n:
            rows.append(data[:n * length].reshape(n, length))
    return np.concatenate(rows) if rows else np.zeros((0, length), np.uint8)


def cache_dir() -> Path:
    return Path(os.environ.get("ATTRKERNELS_CACHE", Path.home() / ".cache" / "attrkernels"))


@register
class TextLM(Benchmark):
    """Byte-level GPT-2 (from a config) fine-tuned on Python's help texts; log-likelihood measure."""

    name = "text-lm"
    task = LanguageModeling()
    recipe = Recipe(epochs=3, batch_size=32, lr=1e-3, optimizer="adam", schedule="linear")
    pretrain = Recipe(epochs=4, batch_size=32, lr=3e-3, optimizer="adam", schedule="linear")
    lds_protocols = {"default": {"m": 100, "r": 4, "alpha": 0.5},
                     "quick": {"m": 50, "r": 2, "alpha": 0.5}}

    def __init__(self, n_train: int = 1000, n_test: int = 100, length: int = 64, split_seed: int = 0,
                 pretrain_fraction: float = 0.5, pretrain_seed: int = 0, n_pretrain: int | None = None,
                 n_layer: int = 2, n_embd: int = 64, n_head: int = 4, recipe: Recipe | None = None,
                 pretrain: Recipe | None = None):
        if not 0 < pretrain_fraction < 1:
            raise ValueError(f"pretrain_fraction must lie in (0, 1), got {pretrain_fraction!r}")
        self.n_train, self.n_test, self.length, self.split_seed = n_train, n_test, length, split_seed
        self.pretrain_fraction, self.pretrain_seed, self.n_pretrain = pretrain_fraction, pretrain_seed, n_pretrain
        self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head
        if recipe is not None:
            self.recipe = recipe
        if pretrain is not None:
            self.pretrain = pretrain

    # -- data ----------------------------------------------------------------------------------
    def _corpora(self):
        def load():
            texts = topic_texts()
            rng = np.random.default_rng(self.split_seed)
            order = rng.permutation(len(texts))
            cut = int(round(self.pretrain_fraction * len(texts)))
            pre = byte_windows([texts[i] for i in order[:cut]], self.length)
            if self.n_pretrain is not None:
                pre = pre[rng.permutation(len(pre))[:self.n_pretrain]]
            rest = byte_windows([texts[i] for i in order[cut:]], self.length)
            rest = rest[rng.permutation(len(rest))]
            if self.n_train + self.n_test > len(rest):
                raise ValueError(f"n_train + n_test must be at most {len(rest)} windows of {self.length} "
                                 f"bytes, got {self.n_train} + {self.n_test}")
            as_ids = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
            return (as_ids(pre), as_ids(rest[:self.n_train]),
                    as_ids(rest[self.n_train:self.n_train + self.n_test]))

        return self.cached("corpora", load)

    def train_data(self):
        return torch.utils.data.TensorDataset(self._corpora()[1])

    def test_data(self):
        return torch.utils.data.TensorDataset(self._corpora()[2])

    # -- model ---------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        try:
            from transformers import GPT2Config, GPT2LMHeadModel
        except ImportError as err:
            raise ImportError("the text-lm task needs transformers: pip install 'attrkernels[hf]'") from err
        config = GPT2Config(vocab_size=256, n_positions=self.length, n_embd=self.n_embd, n_layer=self.n_layer,
                            n_head=self.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config)

    def base_state(self) -> dict:
        """The pre-trained base model's state dict (trained once, cached on disk)."""
        return self.cached("base", self._load_or_pretrain)

    def _load_or_pretrain(self) -> dict:
        path = cache_dir() / "text-lm" / f"base-{self.config_hash()[:16]}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process pre-trains, the others wait and load
            if path.exists():
                return torch.load(path, map_location="cpu", weights_only=True)
            model = seeded_module(self.build_model, self.pretrain_seed)
            generator = torch.Generator().manual_seed(self.pretrain_seed)
            train_classifier(model, self.task, (self._corpora()[0],), None, self.pretrain, generator)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            atomic_write(path, lambda f: torch.save(state, f))
            return state

    def make_model(self, seed: int) -> torch.nn.Module:
        """The pre-trained base (the same for every seed: seeds change the data order only)."""
        model = self.build_model()
        model.load_state_dict(self.base_state())
        return model

    def config(self) -> dict:
        return {
            "name": self.name,
            "data": {"source": "pydoc_data.topics (utf-8 bytes)", "length": self.length,
                     "n_train": self.n_train, "n_test": self.n_test, "split_seed": self.split_seed,
                     "pretrain_fraction": self.pretrain_fraction, "n_pretrain": self.n_pretrain},
            "model": {"arch": "transformers.GPT2LMHeadModel", "n_layer": self.n_layer, "n_embd": self.n_embd,
                      "n_head": self.n_head, "vocab": 256, "dropout": 0.0},
            "pretrain": {"recipe": asdict(self.pretrain), "seed": self.pretrain_seed},
            "recipe": asdict(self.recipe),
            "measure": type(self.task).__name__ + ".measure",
        }
