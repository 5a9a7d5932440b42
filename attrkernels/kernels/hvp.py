"""Products of the damped Hessian (or Gauss-Newton matrix) of a mean loss with a block of vectors.

For per-example losses l_i(theta), i = 1..N, spread over the batches of a loader, and V vectors
v_1 .. v_V (the leading dimension of ``vectors``), ``hvp`` returns, for every v,

    hessian        (1/N) sum_i  d^2 l_i / d theta^2  v              + damping * v
    Gauss-Newton   (1/N) sum_i  J_i^T (d^2 l_i / d z_i^2) J_i v     + damping * v

where, in the Gauss-Newton case, z_i = outputs(theta, x_i) are the model outputs (e.g. logits
[B, C]), J_i = d z_i / d theta and the loss is written as a function of z_i. The Gauss-Newton
matrix drops the second-derivative terms of the network itself, so it is positive
semi-definite whenever the loss is convex in z (cross-entropy, squared error).

How it is computed. One pass over the batches; each batch's forward and backward pass is shared
by the vectors of a chunk (see ``chunk`` below):

* hessian: forward-over-reverse, jvp(grad(sum_b l_b), theta; v), vmapped over the vectors
  (``torch.func.vmap`` of ``torch.func.jvp`` of ``torch.func.grad``). The primal forward and
  backward do not depend on v and run once per batch and chunk; only the tangents carry the
  vector dimension, so every layer's tangent work is a matrix product batched over the chunk.
* Gauss-Newton: u = J v (jvp of the outputs), w = (d^2 l / d z^2) u (jvp of the loss gradient
  in z), J^T w (the pullback of ``torch.func.vjp``, computed once per batch and chunk, applied
  to the chunk's cotangents under vmap).

Per batch of B examples with a model of p parameters the Hessian product costs about
6 B p FLOPs (forward + backward, repeated per chunk: 6 / (12 x 32), 2% with the CPU default)
plus 12 B p per vector (tangent forward and backward). ``chunk`` bounds how many vectors are
vmapped at once: the tangent activations take chunk x the activation memory of one batch. On a CPU the default is 32 vectors, which keeps them near the
caches (1.5x faster than all 300 at once for batches of 250-1000 examples of the digits MLP,
benchmarks/influence.py); elsewhere all V at once.

Parameters are a flat vector ``theta`` [p] with ``vectors`` [V, p], or a dict {name: tensor}
with ``vectors`` {name: [V, *shape]}; ``loss`` / ``outputs`` take the parameters in the same
form. The result has the form and dtype of ``vectors``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.func import grad, jvp, vjp, vmap

from ..utils.checks import check_damping, check_positive_int

CPU_CHUNK = 32


def _block_size(params, vectors) -> int:
    """V, after checking that ``vectors`` has the structure of ``params`` plus a leading V."""
    if torch.is_tensor(params):
        if params.ndim != 1:
            raise ValueError(f"flat params must be a 1-D tensor [p], got shape {tuple(params.shape)}")
        if not torch.is_tensor(vectors) or vectors.ndim != 2 or vectors.shape[1] != params.shape[0]:
            raise ValueError(f"vectors must be a tensor [V, p={params.shape[0]}] for flat params, got "
                             f"{tuple(vectors.shape) if torch.is_tensor(vectors) else type(vectors).__name__}")
        return vectors.shape[0]
    if not isinstance(params, Mapping) or not params:
        raise TypeError(f"params must be a 1-D tensor or a non-empty dict of tensors, got {type(params).__name__}")
    if not isinstance(vectors, Mapping) or set(vectors) != set(params):
        raise ValueError("vectors must be a dict with the keys of params, each [V, *shape]")
    sizes = set()
    for name, p in params.items():
        v = vectors[name]
        if not torch.is_tensor(v) or tuple(v.shape[1:]) != tuple(p.shape):
            raise ValueError(f"vectors[{name!r}] must have shape [V, {', '.join(map(str, p.shape))}], "
                             f"got {tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}")
        sizes.add(v.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"every entry of vectors must hold the same number of vectors, got {sorted(sizes)}")
    return sizes.pop()


def _device(vectors) -> torch.device:
    return vectors.device if torch.is_tensor(vectors) else next(iter(vectors.values())).device


def _rows(vectors, start: int, stop: int):
    if torch.is_tensor(vectors):
        return vectors[start:stop]
    return {k: v[start:stop] for k, v in vectors.items()}


def _add_rows(acc, start: int, part) -> None:
    if torch.is_tensor(acc):
        acc[start:start + part.shape[0]] += part.to(acc.dtype)
        return
    for k, v in part.items():
        acc[k][start:start + v.shape[0]] += v.to(acc[k].dtype)


def _per_example(values, what: str, sizes: list) -> torch.Tensor:
    if not torch.is_tensor(values) or values.ndim != 1:
        raise ValueError(f"{what} must return one value per example, a tensor [B]; got "
                         f"{tuple(values.shape) if torch.is_tensor(values) else type(values).__name__}")
    sizes.append(values.shape[0])
    return values


def _hessian_batch(loss, params, batch, block, sizes):
    """sum_b d^2 l_b / d theta^2 v for the rows v of ``block``; records B in ``sizes``."""

    def total(theta):
        return _per_example(loss(theta, batch), "loss", sizes).sum()

    gradient = grad(total)

    def product(v):
        return jvp(gradient, (params,), (v,))[1]

    return vmap(product)(block)


def _gauss_newton_batch(loss, outputs, params, batch, block, sizes):
    """sum_b J_b^T (d^2 l_b / d z_b^2) J_b v for the rows v of ``block``; records B in ``sizes``."""
    z, pullback = vjp(lambda theta: outputs(theta, batch), params)
    z = z.detach()

    def total(out):
        return _per_example(loss(out, batch), "loss", sizes).sum()

    loss_gradient = grad(total)

    def product(v):
        jv = jvp(lambda theta: outputs(theta, batch), (params,), (v,))[1]
        hjv = jvp(loss_gradient, (z,), (jv,))[1]
        return pullback(hjv)[0]

    return vmap(product)(block)


class ForwardModeUnsupported(ValueError):
    """An operation of the model has no forward-mode AD formula, which curvature-vector products
    (jvp) need."""


def _forward_mode_error(err: Exception) -> Exception:
    """A clear error for a missing forward-mode AD formula (e.g. cuDNN / oneDNN LSTMs, CPU
    flash attention); other errors are returned unchanged."""
    text = str(err)
    if "forward AD" not in text and "forward-mode" not in text and "Forward AD" not in text:
        return err
    op = text.split("forward AD with ", 1)[1].split()[0] if "forward AD with " in text else "an operation"
    return ForwardModeUnsupported(
        f"attrkernels: influence functions' curvature-vector products need forward-mode AD (torch.func.jvp), "
        f"which {op} of this model does not support ({text.splitlines()[0][:200]}). Use ak.EKFAC or ak.KFAC "
        "(no forward-mode AD), ak.TRAK or ak.TracIn (gradients only) instead, or replace that layer (e.g. an "
        "LSTM written with nn.LSTMCell or with the math sdpa backend)")


def hvp(loss, params, vectors, batches, *, damping: float = 0.0, outputs=None, chunk=None):
    """Damped curvature-vector products for a block of vectors, in one pass over ``batches``.

    Args:
        loss: ``loss(params, batch) -> [B]`` per-example losses (Hessian), or, when ``outputs``
            is given, ``loss(z, batch) -> [B]`` on the model outputs z (Gauss-Newton).
        params: the point theta, a flat tensor [p] or a dict {name: tensor}.
        vectors: [V, p] (flat params) or {name: [V, *shape]} (dict params).
        batches: an iterable of batches (e.g. a DataLoader) covering the N examples of the mean.
        damping: lambda >= 0, added as lambda * v.
        outputs: ``outputs(params, batch) -> z [B, ...]``; selects the Gauss-Newton matrix.
        chunk: at most this many vectors per vmapped call (default: 32 on a CPU, else all V).

    Returns the products in the form and dtype of ``vectors``.
    """
    damping = check_damping(damping)
    V = _block_size(params, vectors)
    if V == 0:
        raise ValueError("vectors must hold at least one vector (V >= 1)")
    if chunk is None:
        chunk = CPU_CHUNK if _device(vectors).type == "cpu" else V
    check_positive_int("chunk", chunk)
    if not callable(loss):
        raise TypeError(f"loss must be callable, got {type(loss).__name__}")
    if outputs is not None and not callable(outputs):
        raise TypeError(f"outputs must be callable or None, got {type(outputs).__name__}")
    if torch.is_tensor(params):
        params = params.detach()
        acc = torch.zeros_like(vectors)
    else:
        params = {k: v.detach() for k, v in params.items()}
        acc = {k: torch.zeros_like(v) for k, v in vectors.items()}
    count = 0
    for batch in batches:
        sizes: list = []
        for start in range(0, V, chunk):
            block = _rows(vectors, start, min(V, start + chunk))
            try:
                if outputs is None:
                    part = _hessian_batch(loss, params, batch, block, sizes)
                else:
                    part = _gauss_newton_batch(loss, outputs, params, batch, block, sizes)
            except (NotImplementedError, RuntimeError) as err:
                clear = _forward_mode_error(err)
                if clear is err:
                    raise
                raise clear from err
            _add_rows(acc, start, part)
        count += sizes[0] if sizes else 0
    if count == 0:
        raise ValueError("batches yielded no examples")
    if torch.is_tensor(acc):
        result = acc.div_(count).add_(vectors, alpha=damping)
        finite = bool(torch.isfinite(result).all())
    else:
        result = {k: a.div_(count).add_(vectors[k], alpha=damping) for k, a in acc.items()}
        finite = all(bool(torch.isfinite(r).all()) for r in result.values())
    if not finite:
        raise ValueError("curvature-vector products contain NaN or Inf (non-finite losses, outputs or vectors?)")
    return result


__all__ = ["hvp", "ForwardModeUnsupported"]
