"""``cifar10-resnet9`` and ``cifar2-resnet9``: a local CIFAR-10 copy and ResNet-9 (GPU recommended).

Data. The python-pickle release of CIFAR-10 (``cifar-10-python.tar.gz`` from
https://www.cs.toronto.edu/~kriz/cifar.html, extracted to a ``cifar-10-batches-py`` directory
holding ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``). Its location is the ``root``
argument, else the ``ATTRKERNELS_CIFAR10`` environment variable; either may name the
``cifar-10-batches-py`` directory itself or its parent. Nothing is downloaded. Training set =
the five data batches in order (50,000 images), test set = ``test_batch`` (10,000). Images are
float32 [N, 3, 32, 32], normalised per channel with the CIFAR-10 training mean and standard
deviation (about 600 MB for the training set).

``cifar2-resnet9`` keeps the classes cat (CIFAR-10 label 3 -> 0) and dog (label 5 -> 1), in
their original order: 10,000 training and 2,000 test images.

Model. ResNet-9 (``resnet9.resnet9``, width 64: 6.6 M parameters).

Recipe. SGD with Nesterov momentum 0.9, batch 512, weight decay 5e-4, 24 epochs, learning rate
rising linearly to 0.4 at epoch 5 and falling linearly to 0 (the "triangle" schedule);
augmentation: random crop of the image padded by 4 pixels (reflection) and random horizontal
flip. Trains on ``device`` (default: CUDA when available); on a GPU, retraining is not bitwise
deterministic unless PyTorch's deterministic algorithms are enabled.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .benchmark import Benchmark, register
from .resnet9 import resnet9
from .training import Recipe

ENV_VAR = "ATTRKERNELS_CIFAR10"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
CAT, DOG = 3, 5


def find_cifar10(root: Optional[str | os.PathLike] = None) -> Path:
    """The ``cifar-10-batches-py`` directory from ``root`` or ``$ATTRKERNELS_CIFAR10``."""
    given = root if root is not None else os.environ.get(ENV_VAR)
    if given is None:
        raise FileNotFoundError(
            f"CIFAR-10 location unknown: pass root=... or set ${ENV_VAR} to the directory "
            f"'{BATCH_DIR}' extracted from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
        )
    source = "root" if root is not None else f"${ENV_VAR}"
    path = Path(given).expanduser()
    for candidate in (path, path / BATCH_DIR):
        if all((candidate / f).is_file() for f in TRAIN_FILES + (TEST_FILE,)):
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-10 python batches at {source}={str(path)!r}: expected {', '.join(TRAIN_FILES)} "
        f"and {TEST_FILE} in it or in {str(path / BATCH_DIR)!r}. Download "
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it there "
        "(tar xzf cifar-10-python.tar.gz)."
    )


def read_batches(directory: Path, files) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated (uint8 images [N, 3, 32, 32], int64 labels [N]) of CIFAR pickle ``files``."""
    images, labels = [], []
    for name in files:
        with open(directory / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 3, 32, 32] -> float32, scaled to [0, 1] and standardised per channel."""
    x = torch.from_numpy(images).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def crop_flip(inputs: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-example random crop of the reflection-padded image and random horizontal flip."""
    b, _, h, w = inputs.shape
    padded = F.pad(inputs, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # [b, h, 1]
    cols = dx[:, None] + torch.arange(w)  # [b, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # [b, 1, w]
    out = padded[torch.arange(b)[:, None, None], :, rows, cols]  # [b, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


class Cifar10ResNet9(Benchmark):
    """CIFAR-10 (50,000 train / 10,000 test) from a local copy, ResNet-9, margin measurement."""

    name = "cifar10-resnet9"
    classes: Optional[tuple[int, ...]] = None  # None = all ten; else kept labels, relabelled 0..
    recipe = Recipe(epochs=24, batch_size=512, lr=0.4, optimizer="sgd", momentum=0.9, nesterov=True,
                    weight_decay=5e-4, schedule="triangle", peak_epoch=5)
    lds_protocols = {"default": {"m": 100, "r": 5, "alpha": 0.5},
                     "quick": {"m": 50, "r": 1, "alpha": 0.5}}

    def __init__(self, root: Optional[str | os.PathLike] = None, width: int = 64,
                 recipe: Optional[Recipe] = None, device: Optional[str] = None):
        self.directory = find_cifar10(root)
        self.width = width
        if recipe is not None:
            self.recipe = recipe
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def _split(self, files) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = read_batches(self.directory, files)
        if self.classes is not None:
            keep = np.isin(labels, self.classes)
            images = images[keep]
            labels = np.searchsorted(np.array(self.classes), labels[keep])
        return normalise(images), torch.from_numpy(labels)

    def train_data(self) -> TensorDataset:
        return TensorDataset(*self.cached("train", lambda: self._split(TRAIN_FILES)))

    def test_data(self) -> TensorDataset:
        return TensorDataset(*self.cached("test", lambda: self._split((TEST_FILE,))))

    def build_model(self) -> nn.Module:
        return resnet9(classes=10 if self.classes is None else len(self.classes), width=self.width)

    def augment(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return crop_flip(inputs, generator)

    def config(self) -> dict:
        return {
            "name": self.name,
            "data": {"source": "CIFAR-10 python batches", "train": list(TRAIN_FILES),
                     "test": [TEST_FILE], "classes": None if self.classes is None else list(self.classes),
                     "normalise": {"mean": list(MEAN), "std": list(STD)},
                     "augment": "reflect-pad 4 random crop + horizontal flip"},
            "model": {"arch": "resnet9", "width": self.width},
            "recipe": asdict(self.recipe),
            "measure": type(self.task).__name__ + ".measure",
        }


class Cifar2ResNet9(Cifar10ResNet9):
    """CIFAR-2: cat (0) vs dog (1) from CIFAR-10 (10,000 train / 2,000 test), ResNet-9."""

    name = "cifar2-resnet9"
    classes = (CAT, DOG)


register(Cifar10ResNet9)
register(Cifar2ResNet9)
