"""EK-FAC and K-FAC influence functions (Grosse et al., 2023; George et al., 2018; Martens & Grosse, 2015).

    m = ak.EKFAC(model, task, store="runs/ekfac")     # or ak.KFAC(...)
    m.fit(train_loader, checkpoints=[sd0, sd1])       # factors per checkpoint, saved in the store
    scores = m.score(test_loader)                     # [n_train, n_test], streamed over train_loader
    flagged = m.self_influence()                      # [n_train], large = unusual (e.g. mislabeled)

Scores. With g_i = d loss_i / d theta (``task.loss``), f_j = ``task.measure`` of test example j
and F the Fisher of the training loss (mean over training examples), the influence-function
estimate of how much including training example i raises f_j is

    scores[i, j] = -grad f_j^T (F + damping I)^{-1} g_i

(upweighting example i by eps moves theta by -eps (F + damping)^{-1} g_i). F is block-diagonal
over the tracked layers and each block is Kronecker-factored (``attrkernels.kernels.kfac``):
K-FAC uses (Q_S (x) Q_A) diag(e_S e_A^T) (Q_S (x) Q_A)^T, EK-FAC replaces the eigenvalues by
Lambda = E_b[(Q_S^T G_b Q_A)^2]. The inverse is applied in that eigenbasis, per layer:

    scores[i, j] = -sum_layers <Q_S^T G_i Q_A, (Q_S^T G_j Q_A) / (Lambda + damping)>.

``damping=None`` uses 0.1 x the mean eigenvalue of each layer (mean of Lambda for EK-FAC, of
e_S e_A^T for K-FAC), as kronfluence's heuristic; a float is added to every layer; 0 requires
full-rank factors and raises naming the layer otherwise. Multiple checkpoints average scores.

Fisher. ``fisher="true"`` (default) computes S and Lambda from gradients of the loss at labels
sampled from the model's own predictive distribution (one sample per example, seeded by
``seed``, the checkpoint and the batch position; the Lambda pass draws labels independent of
the covariance pass: reusing the same draws fits the eigenbasis and the eigenvalues to the same
noise, which cost 0.06 LDS on the digits MLP): the Fisher of the model, a positive
semi-definite approximation of the Hessian (the Gauss-Newton matrix for cross-entropy), as in
Grosse et al. and kronfluence's default. It needs a task with ``sampled_loss(model, batch, generator) -> [B]``
(``Classification`` samples labels from softmax of its logits).
``fisher="empirical"`` uses the dataset's labels (``task.loss``): deterministic and works for any
task, but the empirical Fisher weights examples by their own loss and attributes less
accurately (see ``benchmarks/results/ekfac_cpu.md``).

Layers. Linear (any leading dims), Conv1d / Conv2d (groups = 1, unfolded: T = output positions)
and Embedding (activation factor = token counts, diagonal, identity basis). A bias is the
homogeneous last input column. ``params=None`` tracks every trainable weight (and its bias) of
those layers and leaves out other parameters (norms, grouped convolutions, parameters used
functionally), listed in ``skipped``; naming such a parameter in ``params`` raises.

Cost. ``fit`` makes two passes over the training data per checkpoint for EK-FAC (covariances,
then Lambda; one for K-FAC) and a batched float64 eigendecomposition. ``score`` makes one pass
over the test set (preconditioned query gradients held in memory: n_test x tracked parameters
floats) and one over the training set, streaming [batch, n_test] tiles into ``out``; per layer
the training gradients are either rotated into the eigenbasis or the queries rotated back,
whichever costs fewer FLOPs. Per-example gradients exist only per layer, in chunks of at most
``memory_budget`` bytes. The backward passes ask only for the layers' output gradients (no weight
gradients). Convolutions avoid unfolding where they can: the activation factor of a stride-1
convolution from shifted correlations (``kernels.conv_covariance``), per-example gradients from
one grouped weight-gradient convolution (``kernels.conv_grad``).

Store. With ``store=path``, each checkpoint's factors are written as safetensors per stage
(covariance, eigen, lambda; named by the checkpoint's fingerprint) with JSON metadata, and a
rerun of ``fit`` (or a ``score`` on a model whose weights match a stored checkpoint) loads them
instead of recomputing: fit once, score many query sets. Damping is applied at score time and
is not part of the stored factors. A store written for another model, layer selection, Fisher,
seed, block width or training data raises ``StoreMismatch`` naming the differences.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..capture import Capture, make_plan
from ..capture.hooks import resolve_params, unbatched_modules
from ..utils.checks import check_positive_int
from ..kernels.conv_covariance import conv_covariance
from ..kernels.conv_covariance import preferred as conv_preferred
from ..kernels.conv_grad import conv_rotated_gradients
from ..kernels.conv_grad import supported as conv_grad_supported
from ..kernels.kfac import (DEFAULT_MEMORY, Basis, add_squares, covariance, ekfac_correction, example_chunk,
                            homogeneous, kron_eigh, rotated_gradients, rotation_cost, rotation_plan, token_counts)
from ..kernels.kron_score import (gradient_inner, gradient_self_inner, kron_inner, kron_self_inner,
                                  sparse_rows_inner, sparse_rows_self_inner)
from ..kernels.philox import derive_seed
from ..store import Store
from ..tasks.base import implements
from .base import (AttributionMethod, as_checkpoints, call_task, fingerprint, iterate, load_checkpoint,
                   preserved_weights)

FISHERS = ("true", "empirical")
HEURISTIC_DAMPING = 0.1
RANK_RTOL = 1e-6  # eigenvalues below this fraction of the largest count as zero (float32 sums)
STORE_KIND = "attrkernels-kfac-factors"


# ---------------------------------------------------------------------------------------------
# Layers


@dataclass(frozen=True)
class Layer:
    """A tracked layer: G [d_out, d_in] per example (d_in includes the bias column)."""

    name: str
    kind: str  # "linear" | "conv" | "embedding"
    module: nn.Module
    bias: bool
    d_in: int
    d_out: int

    def describe(self) -> dict:
        return {"module": type(self.module).__name__, "d_out": self.d_out, "d_in": self.d_in, "bias": self.bias}


def _unsupported(mname: str, module: nn.Module, functional: set) -> str | None:
    """Why a module's parameters cannot be Kronecker-factored, or None."""
    if any(mname == o or mname.startswith(o + ".") for o in functional):
        return f"used functionally inside the MultiheadAttention {mname.rsplit('.', 1)[0]!r}"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return None if module.groups == 1 else f"{type(module).__name__} with groups={module.groups}"
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return None
    return type(module).__name__


def select_layers(model: nn.Module, params=None) -> tuple[list, list]:
    """(layers, skipped parameter names) for ``params`` (None: every supported trainable weight)."""
    functional = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    owners: dict = {}  # id(param) -> [(param name, module name, module, role)]
    for mname, module in model.named_modules(remove_duplicate=False):
        for role, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((f"{mname}.{role}" if mname else role, mname, module, role))
    chosen = resolve_params(model, params)
    explicit = params is not None
    by_name = dict(model.named_parameters())
    chosen_set = set(chosen)
    layers, skipped, bad = {}, [], []
    for name in chosen:
        entries = owners[id(by_name[name])]
        _, mname, module, role = entries[0]
        reason = _unsupported(mname, module, functional)
        if reason is None and len({id(m) for _, _, m, _ in entries}) > 1:
            reason = f"shared by the modules {sorted({n for _, n, _, _ in entries})}"
        if reason is None and role not in ("weight", "bias"):
            reason = f"parameter {role!r} of {type(module).__name__}"
        weight_name = f"{mname}.weight" if mname else "weight"
        if reason is None and role == "bias" and weight_name not in chosen_set:
            reason = "a bias without its weight"
        if reason is not None:
            (bad if explicit else skipped).append(name if not explicit else f"{name} ({reason})")
            continue
        if role == "weight":
            layers[mname] = module
    if bad:
        raise ValueError("EK-FAC/K-FAC cannot factor the parameters " + ", ".join(bad) +
                         "; supported: Linear, Conv1d, Conv2d (groups=1), Embedding. Leave them out of params=")
    out = []
    for mname, module in layers.items():
        bias_name = f"{mname}.bias" if mname else "bias"
        bias = getattr(module, "bias", None) is not None and bias_name in chosen_set
        if isinstance(module, nn.Embedding):
            if module.scale_grad_by_freq:
                raise ValueError(f"{mname}: Embedding(scale_grad_by_freq=True) mixes examples in its gradient")
            out.append(Layer(mname, "embedding", module, False, module.num_embeddings, module.embedding_dim))
        elif isinstance(module, nn.Linear):
            out.append(Layer(mname, "linear", module, bias, module.in_features + bias, module.out_features))
        else:
            d_in = module.weight[0].numel()
            out.append(Layer(mname, "conv", module, bias, d_in + bias, module.out_channels))
    if not out:
        raise ValueError("the model has no trainable Linear, Conv1d, Conv2d or Embedding weight to factor")
    return out, skipped


# ---------------------------------------------------------------------------------------------
# Factors of one checkpoint


@dataclass
class LayerFactors:
    """K-FAC / EK-FAC factors of one layer (A, S means; eigenvalues and bases; Lambda for EK-FAC)."""

    A: torch.Tensor  # [d_in, d_in] float64, or [d_in] diagonal (Embedding)
    S: torch.Tensor  # [d_out, d_out] float64
    eig_a: torch.Tensor | None = None  # [d_in] float64
    eig_s: torch.Tensor | None = None  # [d_out] float64
    basis_a: Basis | None = None  # float64
    basis_s: Basis | None = None
    lam: torch.Tensor | None = None  # [d_out, d_in] float32 (EK-FAC)
    _bases32: tuple | None = field(default=None, repr=False)

    def bases32(self) -> tuple[Basis, Basis]:
        """The bases in float32, for rotating float32 gradients."""
        if self._bases32 is None:
            self._bases32 = (self.basis_a.astype(torch.float32), self.basis_s.astype(torch.float32))
        return self._bases32


def _save_bases(prefix: str, basis: Basis, out: dict) -> None:
    for i, q in enumerate(basis.blocks):
        out[f"{prefix}/{i}"] = q


def _load_basis(prefix: str, dim: int, tensors: dict) -> Basis:
    blocks = []
    while f"{prefix}/{len(blocks)}" in tensors:
        blocks.append(tensors[f"{prefix}/{len(blocks)}"])
    return Basis(dim, tuple(blocks))


@dataclass
class _Fitted:
    checkpoint: object  # a state_dict or a path
    fingerprint: str
    factors: dict  # layer name -> LayerFactors


@dataclass
class _Query:
    """Preconditioned query gradients of one layer: W [n, d_out, d_in] (or rows + W [n, U, d])."""

    rotated: bool
    W: torch.Tensor
    rows: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------


def _to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _dataset_len(loader) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _data_signature(loader, task) -> dict:
    """Number of examples (when the loader knows it) and a hash of the first batch's tensors."""
    h = hashlib.sha1()
    for _, batch, size in iterate(loader, task, "train"):
        stack = [batch]
        while stack:
            v = stack.pop()
            if torch.is_tensor(v):
                t = v.detach().cpu().contiguous()
                h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            elif isinstance(v, (tuple, list)):
                stack.extend(reversed(v))
            elif isinstance(v, dict):
                stack.extend(v[k] for k in sorted(v, reverse=True))
        break
    return {"examples": _dataset_len(loader), "first_batch_sha1": h.hexdigest()[:16]}


class EKFAC(AttributionMethod):
    """EK-FAC influence functions; see the module docstring.

    EKFAC(model, task, *, damping=None, store=None, fisher="true", params=None, block_width=None,
          seed=0, memory_budget=24 MiB, verbose=True)

    damping: None (0.1 x mean eigenvalue per layer) or a float >= 0 added to every eigenvalue.
    store: directory for the factors (None: kept in memory only).
    fisher: "true" (sampled labels, default) or "empirical" (dataset labels).
    params: names of the parameters to attribute over (default: all supported, see ``skipped``).
    block_width: factors wider than this are eigendecomposed as block-diagonal (``kron_eigh``).
    seed: seeds the sampled labels of the true Fisher.
    memory_budget: bytes of per-example tensors (unfolded inputs, gradients) held at once; the
        default 24 MiB stays under glibc's mmap threshold (see ``kernels.kfac.DEFAULT_MEMORY``).
    """

    strategy = "ekfac"

    def __init__(self, model: nn.Module, task, *, damping: float | None = None, store=None,
                 fisher: str = "true", params=None, block_width: int | None = None, seed: int = 0,
                 memory_budget: int = DEFAULT_MEMORY, verbose: bool = True):
        super().__init__(model, task, verbose=verbose)
        if damping is not None:
            if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
                raise ValueError(f"damping must be None or a float >= 0, got {damping!r}")
            damping = float(damping)
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        if fisher == "true" and not implements(task, "sampled_loss"):
            raise TypeError("fisher='true' samples labels from the model: the task must define "
                            "sampled_loss(model, batch, generator) -> [B] (ak.tasks.Classification does); "
                            "or pass fisher='empirical'")
        check_positive_int("block_width", block_width, optional=True)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 4096:
            raise ValueError(f"memory_budget must be an int of at least 4096 bytes, got {memory_budget!r}")
        self.damping, self.fisher, self.block_width = damping, fisher, block_width
        self.seed, self.memory_budget, self.store_path = seed, memory_budget, store
        self.layers, self.skipped = select_layers(model, params)
        names = []
        for layer in self.layers:
            prefix = f"{layer.name}." if layer.name else ""
            names.append(prefix + "weight")
            if layer.bias:
                names.append(prefix + "bias")
        self.plan = make_plan(model, names)
        self._params = list(self.plan.params)
        self.fitted: list[_Fitted] = []
        self.train = None  # the loader given to fit
        self.query_modes: dict = {}  # per layer, where the last score() preconditioned the queries

    # -----------------------------------------------------------------------------------------
    # Public API

    @property
    def factors(self) -> list:
        """Per fitted checkpoint, {layer name: LayerFactors}."""
        return [f.factors for f in self.fitted]

    def fit(self, train, checkpoints=None) -> "EKFAC":
        """Fit (or load from the store) the factors of every checkpoint on the training loader.

        ``checkpoints``: state dicts, paths or ``ak.tasks.Checkpoint`` objects (None: the model's
        current weights). The loader is kept as the default training set of ``score``.
        """
        checkpoints = as_checkpoints(self.model, checkpoints)
        store = self._open_store(train)
        fitted = []
        with self._preserved_model():
            for k, ckpt in enumerate(checkpoints):
                load_checkpoint(self.model, ckpt, k)
                fp = fingerprint(ckpt)
                fitted.append(_Fitted(ckpt, fp, self._factors_of(train, k, fp, store)))
        self.fitted, self.train = fitted, train
        return self

    def score(self, test, *, train=None, out=None) -> torch.Tensor:
        """scores [n_train, n_test] (float32), averaged over the fitted checkpoints.

        ``train``: the training loader (default: the one given to ``fit``; needed when the
        factors come from the store without a ``fit``). ``out``: optional [n_train, n_test] tensor
        or NumPy array (e.g. a memmap) filled tile by tile and returned; otherwise a new tensor.
        """
        train = self._train_loader(train)
        fitted = self._ready(train)
        n_train_hint = _dataset_len(train)
        result, rows_seen = out, None
        with self._preserved_model():
            for k, fit in enumerate(fitted):
                load_checkpoint(self.model, fit.checkpoint, k)
                inverse = self._inverses(fit.factors)
                queries, n_test = self._queries(test, fit, inverse, n_train_hint)
                tiles, rows = [], 0
                for start, batch, size in self._batches(train, "train", f"scores (checkpoint {k})"):
                    handlers = self._record(batch, size, self.task.loss, "train")
                    tile = self._tile(handlers, fit.factors, queries, size, n_test).div_(-len(fitted))
                    if result is None:
                        tiles.append(tile)
                    else:
                        _accumulate(result, start, tile, first=k == 0)
                    rows = start + size
                if result is None:
                    result = torch.cat(tiles)
                if rows_seen is not None and rows != rows_seen:
                    raise ValueError(f"the train loader yielded {rows} examples for checkpoint {k} and "
                                     f"{rows_seen} before; it must yield the same examples each time")
                rows_seen = rows
        if result.shape[0] != rows_seen:
            raise ValueError(f"out has {result.shape[0]} rows but the train loader yielded {rows_seen} examples")
        return result

    def self_influence(self, train=None) -> torch.Tensor:
        """[n_train] g_i^T (F + damping)^{-1} g_i with g_i = grad loss_i, averaged over checkpoints.

        In the sign convention of ``score`` with measurement -loss_i: how much including example i
        lowers its own loss. Large values flag examples the rest of the data does not explain,
        e.g. mislabeled ones. ``train`` defaults to the loader given to ``fit``.
        """
        train = self._train_loader(train)
        fitted = self._ready(train)
        total = None
        with self._preserved_model():
            for k, fit in enumerate(fitted):
                load_checkpoint(self.model, fit.checkpoint, k)
                inverse = self._inverses(fit.factors)
                parts = []
                for _, batch, size in self._batches(train, "train", f"self-influence (checkpoint {k})"):
                    handlers = self._record(batch, size, self.task.loss, "train")
                    s = torch.zeros(size, dtype=torch.float32)
                    for layer in self.layers:
                        s += self._self_inner(layer, handlers[layer.name], fit.factors[layer.name],
                                              inverse[layer.name]).cpu()
                    parts.append(s)
                values = torch.cat(parts) / len(fitted)
                if total is not None and total.shape != values.shape:
                    raise ValueError("the train loader must yield the same examples for every checkpoint")
                total = values if total is None else total + values
        return total

    def _train_loader(self, train):
        if train is not None:
            return train
        if self.train is None:
            raise RuntimeError(f"pass train= (the training loader) or call {type(self).__name__}.fit(train) first")
        return self.train

    # -----------------------------------------------------------------------------------------
    # Passes over data

    def _batches(self, loader, what, desc):
        device = next(self.model.parameters()).device
        total = len(loader) if hasattr(loader, "__len__") else None
        bar = tqdm(iterate(loader, self.task, what), total=total, desc=desc, unit="batch",
                   disable=not self.verbose, leave=False)
        for start, batch, size in bar:
            yield start, _to_device(batch, device), size

    def _record(self, batch, size, fn, what):
        """Run ``fn(model, batch)`` under capture and backpropagate its sum; returns the handlers.

        The backward pass asks autograd for the gradients of the tracked layers' outputs, not of
        their parameters, so no weight gradient is computed (a third of a backward pass). When an
        output was modified in place afterwards its tensor no longer holds the layer's output, and
        the parameters are asked for instead (the capture's hooks see the right gradient either way).
        """
        outputs = []

        def keep(module, args, output):
            outputs.append((output, output._version))

        hooks = [layer.module.register_forward_hook(keep) for layer in self.layers]
        try:
            with Capture(self.plan) as cap, torch.enable_grad():
                out = call_task(fn, self.model, batch, size, what)
        finally:
            for h in hooks:
                h.remove()
        unbatched = unbatched_modules(cap.handlers, size)
        if unbatched:
            raise ValueError(f"modules {unbatched} are called without the batch dimension, so their "
                             "per-example statistics cannot be captured; leave their parameters out "
                             "with params=")
        bad = ~torch.isfinite(out.detach())
        if bad.any():
            raise ValueError(f"the {what} loss or measurement is NaN or Inf for examples "
                             f"{torch.nonzero(bad).flatten().tolist()[:10]} of a batch")
        if not out.requires_grad:
            raise ValueError(f"the task's output on the {what} loader does not depend on any tracked parameter")
        intact = all(o.requires_grad and o._version == v for o, v in outputs)
        torch.autograd.grad(out.sum(), [o for o, _ in outputs] if intact else self._params, allow_unused=True)
        for layer in self.layers:
            records = cap.handlers[layer.name].records
            if not records or any(r.grad_out is None for r in records):
                raise ValueError(f"layer {layer.name!r} received no gradient from the task on the {what} "
                                 "loader; leave its parameters out of params=")
        return cap.handlers

    def _fisher_loss(self, stage: int, checkpoint: int, start: int):
        """The loss whose gradients define the Fisher: sampled labels, fresh for each stage
        (0 covariances, 1 Lambda), checkpoint and batch; or the dataset's labels."""
        if self.fisher == "empirical":
            return self.task.loss
        seed = derive_seed(derive_seed(derive_seed(self.seed, stage), checkpoint), start)
        task = self.task

        def sampled_loss(model, batch):
            device = next(model.parameters()).device
            return task.sampled_loss(model, batch, torch.Generator(device=device).manual_seed(seed))

        sampled_loss.__name__ = "sampled_loss"
        return sampled_loss

    @staticmethod
    def _positions(layer: Layer, handler) -> int:
        """T: output positions per example, over all calls of the layer."""
        return sum(r.grad_out[0].numel() for r in handler.records) // layer.d_out

    def _kron_chunks(self, layer: Layer, handler):
        """(first example, A, D) for chunks of the batch whose unfolded inputs fit in
        ``memory_budget`` (A homogeneous when the layer has a bias); the kernels bound the
        per-example gradients they form themselves."""
        size = handler.records[0].grad_out.shape[0]
        step = example_chunk(size, 4 * self._positions(layer, handler) * (layer.d_in + layer.d_out), self.memory_budget)
        for b0 in range(0, size, step):
            A, D = handler.kron(slice(b0, b0 + step))
            yield b0, (homogeneous(A) if layer.bias else A.to(torch.float32)), D.to(torch.float32)

    def _rotated_chunks(self, layer: Layer, handler, bases):
        """Formed (rotated) per-example gradients of a Linear / conv layer, chunk by chunk."""
        if self._direct(layer, handler, bases):
            for _, R in self._gradient_chunks(layer, handler, bases):
                yield R
            return
        for _, A, D in self._kron_chunks(layer, handler):
            step = example_chunk(A.shape[0], 4 * layer.d_in * layer.d_out, self.memory_budget)
            for b0 in range(0, A.shape[0], step):
                yield rotated_gradients(A[b0:b0 + step], D[b0:b0 + step], *bases)

    def _direct(self, layer: Layer, handler, bases) -> bool:
        """Whether this layer's (rotated) per-example gradients are formed by a grouped
        weight-gradient convolution instead of unfolding: a supported convolution whose input
        side is rotated after the product (or not at all)."""
        if layer.kind != "conv" or not conv_grad_supported(layer.module):
            return False
        return bases is None or not rotation_plan(self._positions(layer, handler), *bases)[0]

    def _gradient_chunks(self, layer: Layer, handler, bases):
        """(first example, formed (rotated) per-example gradients [chunk, d_out, d_in]) for a
        ``_direct`` layer, in chunks under ``memory_budget``."""
        size = handler.records[0].grad_out.shape[0]
        step = example_chunk(size, 4 * layer.d_in * layer.d_out, self.memory_budget)
        for b0 in range(0, size, step):
            rows = slice(b0, b0 + step)
            yield b0, conv_rotated_gradients([r.inputs[rows] for r in handler.records],
                                             [r.grad_out[rows] for r in handler.records],
                                             layer.module, layer.bias, *(bases or (None, None)))

    @staticmethod
    def _embedding_tokens(layer: Layer, handler):
        """(indices [B, T], D [B, T, d] zero at padding positions)."""
        B = handler.records[0].inputs.shape[0]
        idx = torch.cat([r.inputs.reshape(B, -1) for r in handler.records], 1)
        D = torch.cat([r.grad_out.reshape(B, -1, layer.d_out) for r in handler.records], 1).to(torch.float32)
        if layer.module.padding_idx is not None:
            D = D * (idx != layer.module.padding_idx).unsqueeze(-1)
        return idx, D

    def _covariance_pass(self, train, k) -> tuple[dict, int]:
        sums = {layer.name: [None, None, 0] for layer in self.layers}  # A sum, S sum, positions
        n = 0
        for start, batch, size in self._batches(train, "train", f"covariances (checkpoint {k})"):
            handlers = self._record(batch, size, self._fisher_loss(0, k, start), "train")
            for layer in self.layers:
                acc, handler = sums[layer.name], handlers[layer.name]
                if layer.kind == "embedding":
                    idx, D = self._embedding_tokens(layer, handlers[layer.name])
                    acc[0] = token_counts(idx, layer.d_in, layer.module.padding_idx, out=acc[0])
                    pad = layer.module.padding_idx
                    acc[2] += int(idx.numel() if pad is None else (idx != pad).sum())
                    acc[1] = covariance(D, out=acc[1])
                elif layer.kind == "conv" and conv_preferred(layer.module, handler.records[0].inputs.shape):
                    # stride-1 convolutions: the activation factor without unfolding the input
                    for r in handler.records:
                        acc[0] = conv_covariance(r.inputs, layer.module, layer.bias, out=acc[0],
                                                 memory_budget=self.memory_budget)
                    D = torch.cat([r.grad_out.flatten(2) for r in handler.records], 2).transpose(1, 2)
                    acc[2] += D.shape[0] * D.shape[1]
                    acc[1] = covariance(D, out=acc[1])
                else:
                    for _, A, D in self._kron_chunks(layer, handlers[layer.name]):
                        acc[0] = covariance(A, out=acc[0])
                        acc[1] = covariance(D, out=acc[1])
                        acc[2] += A.shape[0] * A.shape[1]
            n += size
        factors = {}
        for layer in self.layers:
            a_sum, s_sum, positions = sums[layer.name]
            factors[layer.name] = LayerFactors(A=a_sum.to(torch.float64) / max(positions, 1),
                                               S=s_sum.to(torch.float64) / n)
        return factors, n

    def _eigen(self, factors: dict) -> None:
        mats = []
        for layer in self.layers:
            mats += [factors[layer.name].A, factors[layer.name].S]
        solved = kron_eigh(mats, self.block_width)
        for i, layer in enumerate(self.layers):
            f = factors[layer.name]
            (f.eig_a, f.basis_a), (f.eig_s, f.basis_s) = solved[2 * i], solved[2 * i + 1]

    def _lambda_pass(self, train, k, factors: dict) -> None:
        device = next(self.model.parameters()).device
        sums = {layer.name: torch.zeros(layer.d_out, layer.d_in, device=device) for layer in self.layers}
        n = 0
        for start, batch, size in self._batches(train, "train", f"eigenvalue correction (checkpoint {k})"):
            handlers = self._record(batch, size, self._fisher_loss(1, k, start), "train")
            for layer in self.layers:
                basis_a, basis_s = factors[layer.name].bases32()
                if layer.kind == "embedding":
                    rows, R = handlers[layer.name].sparse_rows()
                    sums[layer.name][:, rows] += basis_s.rotate(R).square().sum(0).T
                elif self._direct(layer, handlers[layer.name], (basis_a, basis_s)):
                    for _, R in self._gradient_chunks(layer, handlers[layer.name], (basis_a, basis_s)):
                        add_squares(R, sums[layer.name])
                else:
                    for _, A, D in self._kron_chunks(layer, handlers[layer.name]):
                        ekfac_correction(A, D, basis_a, basis_s, out=sums[layer.name], memory_budget=self.memory_budget)
            n += size
        for layer in self.layers:
            factors[layer.name].lam = sums[layer.name] / n

    # -----------------------------------------------------------------------------------------
    # Factors: fit, save, load

    def _stages(self) -> tuple:
        return ("covariance", "eigen", "lambda")

    def _open_store(self, train) -> Store | None:
        if self.store_path is None:
            return None
        meta = {
            "kind": STORE_KIND,
            "strategy": self.strategy,
            "fisher": self.fisher,
            "seed": self.seed if self.fisher == "true" else None,
            "block_width": self.block_width,
            "layers": {layer.name: layer.describe() for layer in self.layers},
            "data": _data_signature(train, self.task),
        }
        return Store(self.store_path, meta)

    def _factors_of(self, train, k: int, fp: str, store: Store | None) -> dict:
        files = {stage: f"{stage}_{fp}.safetensors" for stage in self._stages()}
        if store is not None and all(store.exists(f) for f in files.values()):
            return self._load(store, files, fp)
        factors = None
        if store is not None and store.exists(files["covariance"]):
            factors = self._load(store, {"covariance": files["covariance"]}, fp)
        if factors is None:
            factors, n = self._covariance_pass(train, k)
            self._save(store, files["covariance"], fp, n, {
                f"{name}/{key}": getattr(f, key) for name, f in factors.items() for key in ("A", "S")})
        if store is not None and store.exists(files["eigen"]):
            self._load(store, {"eigen": files["eigen"]}, fp, factors)
        else:
            self._eigen(factors)
            tensors = {}
            for name, f in factors.items():
                tensors[f"{name}/eig_a"], tensors[f"{name}/eig_s"] = f.eig_a, f.eig_s
                _save_bases(f"{name}/basis_a", f.basis_a, tensors)
                _save_bases(f"{name}/basis_s", f.basis_s, tensors)
            self._save(store, files["eigen"], fp, None, tensors)
        if "lambda" in files:
            self._lambda_pass(train, k, factors)
            self._save(store, files["lambda"], fp, None, {f"{name}/lam": f.lam for name, f in factors.items()})
        return factors

    def _save(self, store, name, fp, n, tensors) -> None:
        if store is None:
            return
        store.save_tensors(name, {k: v.cpu() for k, v in tensors.items()},
                           {"fingerprint": fp, "strategy": self.strategy, "examples": "" if n is None else n})

    def _load(self, store: Store, files: dict, fp: str, base: dict | None = None) -> dict:
        tensors = {}
        device = next(self.model.parameters()).device
        for name in files.values():
            tensors.update(store.load_tensors(name, device=device))
        factors = base or {}
        for layer in self.layers:
            key = layer.name
            if key not in factors:
                if f"{key}/A" not in tensors:
                    raise ValueError(f"store {store.path} has no factors of layer {key!r} for checkpoint {fp}")
                factors[key] = LayerFactors(A=tensors[f"{key}/A"], S=tensors[f"{key}/S"])
            f = factors[key]
            if f"{key}/eig_a" in tensors:
                f.eig_a, f.eig_s = tensors[f"{key}/eig_a"], tensors[f"{key}/eig_s"]
                f.basis_a = _load_basis(f"{key}/basis_a", layer.d_in, tensors)
                f.basis_s = _load_basis(f"{key}/basis_s", layer.d_out, tensors)
            if f"{key}/lam" in tensors:
                f.lam = tensors[f"{key}/lam"]
        return factors

    def _ready(self, train) -> list:
        """The fitted checkpoints; loads the store's factors for the model's current weights if needed."""
        if self.fitted:
            return self.fitted
        if self.store_path is None:
            raise RuntimeError(f"call {type(self).__name__}.fit(train, checkpoints) before scoring")
        store = self._open_store(train)
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        fp = fingerprint(state)
        files = {stage: f"{stage}_{fp}.safetensors" for stage in self._stages()}
        if not all(store.exists(f) for f in files.values()):
            last = self._stages()[-1]
            have = sorted({p.name[len(last) + 1:].split(".")[0] for p in store.path.glob(f"{last}_*.safetensors")})
            raise ValueError(f"the model's weights (fingerprint {fp}) differ from every checkpoint whose factors "
                             f"the store {store.path} holds ({have or 'none'}); call fit(train, checkpoints) "
                             "with the checkpoints to score")
        self.fitted = [_Fitted(state, fp, self._load(store, files, fp))]
        return self.fitted

    @contextmanager
    def _preserved_model(self):
        """Evaluation mode inside; the model's weights and mode restored afterwards."""
        with preserved_weights(self.model):
            self.model.eval()
            yield

    # -----------------------------------------------------------------------------------------
    # Preconditioning and scores

    def _eigenvalues(self, f: LayerFactors) -> torch.Tensor:
        return f.lam.to(torch.float64)

    def _inverses(self, factors: dict) -> dict:
        """{layer: 1 / (eigenvalues + damping)} as float32 [d_out, d_in]."""
        out = {}
        for layer in self.layers:
            f = factors[layer.name]
            values = self._eigenvalues(f)
            damping = self.damping if self.damping is not None else HEURISTIC_DAMPING * float(values.mean())
            if damping == 0:
                self._check_invertible(layer, f, values)
            out[layer.name] = (1.0 / (values + damping)).to(torch.float32)
        return out

    def _check_invertible(self, layer: Layer, f: LayerFactors, values: torch.Tensor) -> None:
        hint = ("pass damping=None (0.1 x the mean eigenvalue of each layer) or a positive damping")
        for label, e in (("activation factor A", f.eig_a), ("gradient factor S", f.eig_s)):
            top = float(e.max())
            if top <= 0 or float(e.min()) <= RANK_RTOL * top:
                raise ValueError(f"layer {layer.name!r}: the {label} is rank-deficient (smallest / largest "
                                 f"eigenvalue {float(e.min()) / top if top > 0 else 0:.1e}), so with damping=0 "
                                 f"the curvature has no inverse; {hint}")
        if float(values.min()) <= 0:
            raise ValueError(f"layer {layer.name!r}: some corrected eigenvalues are zero, so with damping=0 "
                             f"the curvature has no inverse; {hint}")

    def _queries(self, test, fit: _Fitted, inverse: dict, n_train_hint: int | None) -> tuple[dict, int]:
        """Preconditioned test gradients per layer, in the eigenbasis or rotated back to parameter
        space, whichever makes scoring cheaper (decided on the first batch from the loaders' sizes
        when they are known, else as if both had the first batch's size)."""
        parts = {layer.name: [] for layer in self.layers}
        back, n_test = {}, 0
        for _, batch, size in self._batches(test, "test", "query gradients"):
            handlers = self._record(batch, size, self.task.measure, "test")
            for layer in self.layers:
                basis_a, basis_s = fit.factors[layer.name].bases32()
                if layer.kind == "embedding":
                    rows, R = handlers[layer.name].sparse_rows()
                    parts[layer.name].append((rows, basis_s.rotate(R) * inverse[layer.name][:, rows].T))
                    continue
                handler, bases = handlers[layer.name], (basis_a, basis_s)
                if layer.name not in back:
                    n_q = _dataset_len(test) or size
                    cost = layer.d_out * basis_a.cost() + layer.d_in * basis_s.cost()
                    rotation = rotation_cost(self._positions(layer, handler), basis_a, basis_s)
                    back[layer.name] = n_q * cost <= (n_train_hint or n_q) * rotation
                for R in self._rotated_chunks(layer, handler, bases):
                    W = R.mul_(inverse[layer.name])
                    if back[layer.name]:
                        W = basis_s.rotate(basis_a.rotate(W, dim=2, transpose=True), dim=1, transpose=True)
                    parts[layer.name].append(W)
            n_test += size
        queries = {}
        for layer in self.layers:
            if layer.kind == "embedding":
                queries[layer.name] = _embedding_query(parts[layer.name], n_test, layer.d_out)
            else:
                queries[layer.name] = _Query(not back[layer.name], torch.cat(parts[layer.name]))
        self.query_modes = {name: "eigenbasis" if q.rotated else "parameters" for name, q in queries.items()}
        return queries, n_test

    def _tile(self, handlers, factors: dict, queries: dict, size: int, n_test: int) -> torch.Tensor:
        """sum over layers of <G_i, preconditioned G_j> for the batch: [size, n_test] (sign not applied)."""
        tile = torch.zeros(size, n_test, dtype=torch.float32)
        for layer in self.layers:
            q = queries[layer.name]
            basis_a, basis_s = factors[layer.name].bases32()
            if layer.kind == "embedding":
                rows, R = handlers[layer.name].sparse_rows()
                tile += sparse_rows_inner(rows, R, q.rows, q.W, basis_s).cpu()
                continue
            bases = (basis_a, basis_s) if q.rotated else None
            if self._direct(layer, handlers[layer.name], bases):
                for b0, R in self._gradient_chunks(layer, handlers[layer.name], bases):
                    tile[b0:b0 + R.shape[0]] += gradient_inner(R, q.W).cpu()
                continue
            for b0, A, D in self._kron_chunks(layer, handlers[layer.name]):
                tile[b0:b0 + A.shape[0]] += kron_inner(A, D, q.W, *(bases or (None, None)), self.memory_budget).cpu()
        return tile

    def _self_inner(self, layer: Layer, handler, f: LayerFactors, inverse: torch.Tensor) -> torch.Tensor:
        basis_a, basis_s = f.bases32()
        if layer.kind == "embedding":
            rows, R = handler.sparse_rows()
            return sparse_rows_self_inner(rows, R, inverse, basis_s)
        if self._direct(layer, handler, (basis_a, basis_s)):
            chunks = self._gradient_chunks(layer, handler, (basis_a, basis_s))
            return torch.cat([gradient_self_inner(R, inverse) for _, R in chunks])
        return torch.cat([kron_self_inner(A, D, inverse, basis_a, basis_s, self.memory_budget)
                          for _, A, D in self._kron_chunks(layer, handler)])


class KFAC(EKFAC):
    """K-FAC influence functions: EKFAC without the eigenvalue correction (eigenvalues e_S e_A^T).

    Same arguments and methods as ``EKFAC``; ``fit`` makes one pass over the training data.
    """

    strategy = "kfac"

    def _stages(self) -> tuple:
        return ("covariance", "eigen")

    def _eigenvalues(self, f: LayerFactors) -> torch.Tensor:
        return torch.outer(f.eig_s.clamp_min(0), f.eig_a.clamp_min(0))


def _embedding_query(parts: list, n: int, d: int) -> _Query:
    """Dense [n, U, d] preconditioned rows over the union U of the query batches' rows."""
    rows = torch.unique(torch.cat([r for r, _ in parts]))
    W = torch.zeros(n, rows.numel(), d, dtype=torch.float32, device=rows.device)
    start = 0
    for r, w in parts:
        W[start:start + w.shape[0], torch.searchsorted(rows, r)] = w
        start += w.shape[0]
    return _Query(True, W, rows)


def _accumulate(out, start: int, tile: torch.Tensor, first: bool) -> None:
    """out[start:start + len(tile)] = tile (first checkpoint) or += tile, for tensors and arrays."""
    stop = start + tile.shape[0]
    if stop > out.shape[0] or tuple(out.shape[1:]) != tuple(tile.shape[1:]):
        raise ValueError(f"out has shape {tuple(out.shape)}, too small for rows [{start}, {stop}) of "
                         f"{tile.shape[1]} test examples")
    values = tile if torch.is_tensor(out) else tile.numpy()
    if first:
        out[start:stop] = values
    else:
        out[start:stop] += values
