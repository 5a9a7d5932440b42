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
``sampled_losses`` EK-FAC (optional): several draws (and, ``with_loss``, the loss) from one
                   forward pass, so neither the eigenvalue correction nor the scores' training
                   gradients need another pass over the model (``methods.ekfac.replay``)
``logits`` and     influence with ``curvature="gauss-newton"``: loss(model, batch) must equal
``logit_loss``     logit_loss(logits(model, batch), batch), convex in the logits
``token_mask``     EK-FAC / K-FAC on sequences (optional): which positions are tokens, so that
                   padding does not count in the activation covariances
=================  =========================================================================
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils.batches import batch_size
from ..utils.errors import ExampleError
from .sampling import sample_categorical


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

    def sampled_losses(self, model: torch.nn.Module, batch, generators: list, with_loss: bool = False) -> list:
        """``[sampled_loss(model, batch, g) for g in generators]`` from one forward pass (each [B],
        each draw from its generator exactly as ``sampled_loss`` draws), followed, ``with_loss``,
        by ``loss(model, batch)`` from the same forward pass. Optional: without it EK-FAC's two
        factor stages each run the model, and without ``with_loss`` its scores run the model
        over the training data once more."""
        raise NotImplementedError(f"{type(self).__name__} does not define sampled_losses")

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

    def token_mask(self, batch) -> torch.Tensor | None:
        """[B, T] with 1 at the positions of each sequence that are tokens and 0 at padding, or
        None (every position counts; the default). EK-FAC / K-FAC count only the tokens in the
        activation covariance of every layer whose inputs are [B, T, d] (or [B, T] indices)."""
        return None

    def batch_size(self, batch) -> int:
        """Number of examples in a batch."""
        if isinstance(batch, dict):
            n = batch_size(batch)
            if n is None:
                raise TypeError("a dict batch needs a tensor with a batch dimension")
            return n
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        return int(first.shape[0])


def token_mask(task, batch) -> torch.Tensor | None:
    """The task's ``token_mask(batch)``, or None for a task without one or when every position
    of the batch is a token (the factors then need no weighting)."""
    fn = getattr(task, "token_mask", None)
    mask = fn(batch) if callable(fn) else None
    return None if mask is None or bool((mask == 1).all()) else mask


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
    """Batches are ``(inputs, labels, ...)``, or dicts with ``labels`` (as Hugging Face collators
    make them: the model is called as ``model(**rest)``, e.g. ``input_ids`` and
    ``attention_mask``); the model returns logits [B, classes], as a tensor or an object with
    ``.logits``. loss = cross-entropy, measure = margin. A dict's ``attention_mask`` is its
    ``token_mask``.

    Labels must be class indices in [0, C) for a model with C outputs; any other label (also
    -100, PyTorch's ``ignore_index``: Classification ignores no example) raises ``ExampleError``
    naming the example."""

    def _split(self, batch):
        if isinstance(batch, dict) and "labels" in batch:
            inputs, labels = {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            inputs, labels = batch[0], batch[1]
        else:
            raise TypeError(
                "Classification expects batches (inputs, labels, ...) or dicts with 'labels'; got "
                f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}. Subclass Task for "
                "another batch format."
            )
        if not torch.is_tensor(labels) or labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
        return inputs, labels.long()

    @staticmethod
    def _call(model, inputs) -> torch.Tensor:
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        if torch.is_tensor(out):
            return out
        logits = getattr(out, "logits", None)
        if not torch.is_tensor(logits):
            raise TypeError(f"the model returned {type(out).__name__} without logits; Classification needs "
                            "a tensor [B, classes] or an object with .logits")
        return logits

    def token_mask(self, batch):
        return batch.get("attention_mask") if isinstance(batch, dict) else None

    def logits(self, model, batch) -> torch.Tensor:
        inputs, _ = self._split(batch)
        return self._call(model, inputs)

    def logit_loss(self, logits, batch):
        _, labels = self._split(batch)
        check_labels(logits, labels)
        return F.cross_entropy(logits, labels, reduction="none")

    def loss(self, model, batch):
        inputs, labels = self._split(batch)
        logits = self._call(model, inputs)
        check_labels(logits, labels)
        return F.cross_entropy(logits, labels, reduction="none")

    def sampled_loss(self, model, batch, generator):
        return self.sampled_losses(model, batch, [generator])[0]

    def sampled_losses(self, model, batch, generators, with_loss=False):
        # Labels drawn from softmax(logits) (one per example and generator), then the cross-entropy.
        logits = self.logits(model, batch)
        out = [F.cross_entropy(logits, sample_categorical(logits, g), reduction="none") for g in generators]
        return out + [self.logit_loss(logits, batch)] if with_loss else out

    def measure(self, model, batch):
        inputs, labels = self._split(batch)
        logits = self._call(model, inputs)
        check_labels(logits, labels)
        return margin(logits, labels)

    def out_to_loss(self, model, batch):
        # loss = log(1 + exp(-margin)), so d loss / d margin = -(1 - p_y); TRAK uses 1 - p_y.
        return torch.sigmoid(-self.measure(model, batch))
