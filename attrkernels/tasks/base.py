"""What a method needs to know about a user's data: per-example loss and measurement.

A task turns a model and a batch into one number per example. Methods differentiate these:
TRAK, TracIn and influence functions use ``loss`` for training examples and ``measure`` for
targets; LDS ground truth records ``measure`` of retrained models. Subclass ``Task`` (or
``Classification``) for your own batch format, as with kronfluence's Task.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Task:
    """Per-example training loss and measurement of a model on a batch."""

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        """Per-example training loss, shape [B]."""
        raise NotImplementedError

    def measure(self, model: torch.nn.Module, batch) -> torch.Tensor:
        """Per-example measurement whose change attribution predicts, shape [B]."""
        raise NotImplementedError

    def out_to_loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        """Per-example weight 1 - p of TRAK (minus d loss / d measure), shape [B]."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define out_to_loss, which TRAK needs"
        )

    def batch_size(self, batch) -> int:
        """Number of examples in a batch."""
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        return int(first.shape[0])


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Correct-class margin: logit of the label minus logsumexp of the other logits, [B].

    With p = softmax(logits), margin = log(p_y / (1 - p_y)), so p_y = sigmoid(margin).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [B, classes], got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels must have shape [{logits.shape[0]}], got {tuple(labels.shape)}"
        )
    correct = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


class Classification(Task):
    """Batches are ``(inputs, labels, ...)``; loss = cross-entropy, measure = margin."""

    def _split(self, batch):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(
                "Classification expects batches (inputs, labels, ...); got "
                f"{type(batch).__name__}. Subclass Task for another batch format."
            )
        inputs, labels = batch[0], batch[1]
        if not torch.is_tensor(labels) or labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
        return inputs, labels.long()

    def logits(self, model, batch) -> torch.Tensor:
        inputs, _ = self._split(batch)
        return model(inputs)

    def loss(self, model, batch):
        inputs, labels = self._split(batch)
        return F.cross_entropy(model(inputs), labels, reduction="none")

    def measure(self, model, batch):
        inputs, labels = self._split(batch)
        return margin(model(inputs), labels)

    def out_to_loss(self, model, batch):
        # loss = log(1 + exp(-margin)), so d loss / d margin = -(1 - p_y); TRAK uses 1 - p_y.
        return torch.sigmoid(-self.measure(model, batch))
