"""What a method needs to know about a user's data: per-example loss and measurement.

A task turns a model and a batch into one number per example. Methods differentiate these:
TRAK, TracIn and influence functions use ``loss`` for training examples and ``measure`` for
targets; LDS ground truth records ``measure`` of retrained models. The task alone knows the
batch format: methods never index a batch themselves. Subclass ``Task`` (or ``Classification``)
for your own batch format, as with kronfluence's Task.

What each method needs:

=================  =========================================================================
``loss``           every method (per-example training loss, [B])
``measure``        every method (what attribution predicts, [B])
``out_to_loss``    TRAK (its per-example weight 1 - p)
``sampled_loss``   EK-FAC / K-FAC with ``fisher="true"`` (loss at targets drawn from the model)
``logits`` and     influence with ``curvature="gauss-newton"``: loss(model, batch) must equal
``logit_loss``     logit_loss(logits(model, batch), batch), convex in the logits
=================  =========================================================================
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils.errors import ExampleError


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

    def sampled_loss(self, model: torch.nn.Module, batch, generator: torch.Generator) -> torch.Tensor:
        """Per-example loss at targets sampled from the model's own predictive distribution
        (one draw per example from ``generator``), shape [B]: its gradients' covariance is the
        true Fisher, which EK-FAC / K-FAC use by default."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define sampled_loss(model, batch, generator), which the "
            "true Fisher needs; define it or pass fisher='empirical'"
        )

    def logits(self, model: torch.nn.Module, batch) -> torch.Tensor:
        """The model output the loss is a function of (``logit_loss``), e.g. [B, classes]."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define logits(model, batch), which the Gauss-Newton "
            "curvature needs; define logits and logit_loss or use curvature='hessian'"
        )

    def logit_loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        """Per-example loss as a function of ``logits(model, batch)``, shape [B]."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define logit_loss(logits, batch), which the Gauss-Newton "
            "curvature needs; define logits and logit_loss or use curvature='hessian'"
        )

    def batch_size(self, batch) -> int:
        """Number of examples in a batch."""
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        return int(first.shape[0])


def implements(task, name: str) -> bool:
    """Whether ``task`` provides method ``name`` (its class overrides the ``Task`` default, or it
    is not a ``Task`` subclass and has a callable of that name)."""
    fn = getattr(type(task), name, None)
    if fn is None:
        return callable(getattr(task, name, None))
    return fn is not getattr(Task, name, None)


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


def check_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise ExampleError naming the examples whose label is not a class index in [0, C) for
    logits [B, C] (no check under ``vmap``, where labels cannot be inspected)."""
    if logits.ndim < 1 or labels.ndim != 1:
        return
    classes = logits.shape[-1]
    try:
        bad = (labels < 0) | (labels >= classes)
        if not bool(bad.any()):
            return
        examples = torch.nonzero(bad).flatten().tolist()
        values = sorted({int(v) for v in labels[bad].tolist()})
    except RuntimeError:  # batched under vmap
        return
    fix = f"labels must be class indices in [0, {classes}) for a model with {classes} outputs"
    if -100 in values:
        fix += ("; Classification does not ignore labels (-100 is PyTorch's ignore_index): drop those "
                "examples, or use a Task that masks them")
    raise ExampleError(f"labels {values[:5]} out of range [0, {classes})", examples, fix=fix)


class Classification(Task):
    """Batches are ``(inputs, labels, ...)``; loss = cross-entropy, measure = margin.

    Labels must be class indices in [0, C) for a model with C outputs; any other label (also
    -100, PyTorch's ``ignore_index``: Classification ignores no example) raises ``ExampleError``
    naming the example."""

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

    def logit_loss(self, logits, batch):
        _, labels = self._split(batch)
        check_labels(logits, labels)
        return F.cross_entropy(logits, labels, reduction="none")

    def loss(self, model, batch):
        inputs, labels = self._split(batch)
        logits = model(inputs)
        check_labels(logits, labels)
        return F.cross_entropy(logits, labels, reduction="none")

    def sampled_loss(self, model, batch, generator):
        # Labels drawn from softmax(logits) in float64 (one per example), then the cross-entropy.
        logits = self.logits(model, batch)
        probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return F.cross_entropy(logits, labels, reduction="none")

    def measure(self, model, batch):
        inputs, labels = self._split(batch)
        logits = model(inputs)
        check_labels(logits, labels)
        return margin(logits, labels)

    def out_to_loss(self, model, batch):
        # loss = log(1 + exp(-margin)), so d loss / d margin = -(1 - p_y); TRAK uses 1 - p_y.
        return torch.sigmoid(-self.measure(model, batch))
