"""Causal language modelling: per-sequence losses and log-likelihoods of next-token predictions.

Batches are dicts (as Hugging Face collators make them)::

    {"input_ids": LongTensor [B, T],
     "attention_mask": [B, T] (optional; 0 marks padding),
     "labels": LongTensor [B, T] (optional; default input_ids with padding set to -100)}

or tuples ``(input_ids, [attention_mask, [labels]])`` in that order (what a ``TensorDataset``
of token ids yields).

The model is called as ``model(input_ids=..., attention_mask=...)`` (or ``model(input_ids)`` when
it takes no mask) and returns logits [B, T, V], either as a tensor or as an object with
``.logits``. Position t predicts token t + 1: with z = logits[:, :-1] and targets y = labels[:, 1:],
the per-token loss is l_bt = -log softmax(z_bt)[y_bt], and positions whose target is -100 count
for nothing. Then, per sequence b:

    loss_b    = sum_t l_bt                  (summed over tokens, not averaged)
    measure_b = -loss_b = log p(sequence b) (its tokens after the first)

so ``scores[i, j] > 0`` means that including training sequence i makes test sequence j more
likely. ``sampled_loss`` draws every target token from the model's own softmax (the true
Fisher of EK-FAC / K-FAC, per token); ``logits``/``logit_loss`` give the Gauss-Newton split.

Padding. ``token_mask`` (what EK-FAC / K-FAC count in their activation covariances) marks the
positions with ``attention_mask`` 1 up to the last target of the sequence: with causal attention
the positions after it affect no prediction, so right padding whose labels are -100 adds nothing
to the factors even without an attention mask. -100 labels inside a sequence (a prompt) still
count as context. Gradients need no mask: a position that affects no loss has zero gradient.

TRAK's out-to-loss weight: TRAK weights each training example by |d loss / d measure| at the
measurement (for classification 1 - p of the margin). Here the measurement is exactly -loss,
so the weight is 1 for every sequence (``out_to_loss`` returns ones): no per-sequence
reweighting, as the measurement already is the loss.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..utils.errors import ExampleError
from .base import Task
from .sampling import sample_categorical

IGNORE = -100


class LanguageModeling(Task):
    """Next-token prediction on dict batches; loss = summed token cross-entropy, measure = log p.

    ``max_positions``: the longest sequence the model accepts (default: read from
    ``model.config`` — ``n_positions`` or ``max_position_embeddings`` — when the model has one).
    """

    def __init__(self, max_positions: int | None = None):
        if max_positions is not None and (isinstance(max_positions, bool) or not isinstance(max_positions, int)
                                          or max_positions < 2):
            raise ValueError(f"max_positions must be None or an int >= 2, got {max_positions!r}")
        self.max_positions = max_positions

    # -- batches -------------------------------------------------------------------------------
    def _parts(self, batch):
        """(input_ids [B, T], attention_mask [B, T] or None, labels [B, T]) checked."""
        if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
            batch = dict(zip(("input_ids", "attention_mask", "labels"), batch))
        if not isinstance(batch, dict) or "input_ids" not in batch:
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise TypeError(f"LanguageModeling expects dict batches with 'input_ids' (and optionally "
                            f"'attention_mask', 'labels') or tuples (input_ids, [attention_mask, [labels]]); "
                            f"got {keys}. Subclass Task for another format.")
        ids = batch["input_ids"]
        if not torch.is_tensor(ids) or ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids must be an integer tensor [batch, sequence], got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        if ids.shape[1] < 2:
            raise ValueError(f"sequences must have at least 2 tokens to predict one, got length {ids.shape[1]}")
        mask = batch.get("attention_mask")
        if mask is not None and (not torch.is_tensor(mask) or mask.shape != ids.shape):
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, "
                             f"got {tuple(getattr(mask, 'shape', ()))}")
        labels = batch.get("labels")
        if labels is None:
            labels = ids.long() if mask is None else ids.long().masked_fill(mask == 0, IGNORE)
        elif not torch.is_tensor(labels) or labels.shape != ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(ids.shape)}, "
                             f"got {tuple(getattr(labels, 'shape', ()))}")
        return ids.long(), mask, labels.long()

    def batch_size(self, batch) -> int:
        return int(self._parts(batch)[0].shape[0])

    def _targets(self, labels: torch.Tensor, vocab: int) -> torch.Tensor:
        """labels[:, 1:], checked: in range or -100, at least one target per sequence."""
        y = labels[:, 1:]
        bad = (y != IGNORE) & ((y < 0) | (y >= vocab))
        if bad.any():
            b, t = (int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(f"label {int(y[b, t])} at sequence {b}, position {t + 1} is outside the "
                             f"vocabulary [0, {vocab}) (use -100 for positions to ignore)")
        empty = ((y != IGNORE).sum(1) == 0).nonzero().flatten()
        if empty.numel():
            raise ExampleError("sequences with no target token (every label after the first position is -100 "
                               "or padding)", empty.tolist(),
                               fix="they have no loss or likelihood; drop them from the data")
        return y

    # -- the model -----------------------------------------------------------------------------
    def _check_length(self, model, length: int) -> None:
        limit = self.max_positions
        config = getattr(model, "config", None)
        if limit is None and config is not None:
            limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if limit is not None and length > limit:
            raise ValueError(f"sequences of length {length} are longer than the model's {limit} positions; "
                             "truncate or split them")

    def _forward(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(full logits [B, T, V], labels [B, T])."""
        ids, mask, labels = self._parts(batch)
        self._check_length(model, ids.shape[1])
        if _takes(model, "input_ids"):
            out = model(input_ids=ids, attention_mask=mask) if mask is not None and _takes(model, "attention_mask") \
                else model(input_ids=ids)
        else:
            out = model(ids)
        logits = out if torch.is_tensor(out) else getattr(out, "logits", None)
        if not torch.is_tensor(logits):
            raise TypeError(f"the model returned {type(out).__name__} without logits; LanguageModeling "
                            "needs a tensor [B, T, vocab] or an object with .logits")
        if logits.ndim != 3 or logits.shape[:2] != ids.shape:
            raise ValueError(f"the model's logits must have shape [{ids.shape[0]}, {ids.shape[1]}, vocab], "
                             f"got {tuple(logits.shape)}")
        return logits, labels

    def logits(self, model, batch) -> torch.Tensor:
        """Next-token logits [B, T - 1, V] (position t predicts token t + 1)."""
        return self._forward(model, batch)[0][:, :-1]

    def logit_loss(self, logits, batch) -> torch.Tensor:
        _, _, labels = self._parts(batch)
        y = self._targets(labels, logits.shape[-1])
        return _summed_cross_entropy(logits, y)

    def loss(self, model, batch) -> torch.Tensor:
        logits, labels = self._forward(model, batch)
        return _summed_cross_entropy(logits[:, :-1], self._targets(labels, logits.shape[-1]))

    def measure(self, model, batch) -> torch.Tensor:
        return -self.loss(model, batch)

    def out_to_loss(self, model, batch) -> torch.Tensor:
        # measure = -loss exactly, so |d loss / d measure| = 1 for every sequence.
        return torch.ones(self.batch_size(batch), device=self._parts(batch)[0].device)

    def token_mask(self, batch) -> torch.Tensor:
        """[B, T] float: 1 at positions with attention_mask 1 at or before the last target of
        the sequence (see the module docstring), 0 elsewhere."""
        ids, mask, labels = self._parts(batch)
        T = ids.shape[1]
        has_target = torch.cat([torch.zeros_like(labels[:, :1], dtype=torch.bool), labels[:, 1:] != IGNORE], 1)
        last = torch.where(has_target, torch.arange(T, device=ids.device), -1).amax(1, keepdim=True)
        keep = torch.arange(T, device=ids.device) <= last
        return (keep if mask is None else keep & (mask != 0)).to(torch.float32)

    def sampled_loss(self, model, batch, generator) -> torch.Tensor:
        return self.sampled_losses(model, batch, [generator])[0]

    def sampled_losses(self, model, batch, generators, with_loss=False) -> list:
        # Every target token drawn from softmax of the model's prediction at its position (one
        # draw per token and generator); padding / -100 positions stay ignored.
        logits, labels = self._forward(model, batch)
        z = logits[:, :-1]
        y = self._targets(labels, z.shape[-1])
        out = []
        for g in generators:
            drawn = sample_categorical(z.reshape(-1, z.shape[-1]), g).reshape(y.shape)
            out.append(_summed_cross_entropy(z, torch.where(y == IGNORE, y, drawn)))
        return out + [_summed_cross_entropy(z, y)] if with_loss else out


def _takes(model, name: str) -> bool:
    """Whether the model's forward accepts keyword ``name`` (Hugging Face models do)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_t CE(logits[b, t], targets[b, t]) over targets != -100: [B]."""
    B, T, V = logits.shape
    tokens = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T), ignore_index=IGNORE,
                             reduction="none")
    return tokens.reshape(B, T).sum(1)


__all__ = ["LanguageModeling", "IGNORE"]
