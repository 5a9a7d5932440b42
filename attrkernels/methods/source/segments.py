"""The factors of SOURCE's segments: per checkpoint the covariances and the corrected eigenvalues
(EK-FAC's two passes, ``ekfac.passes``), per segment one eigendecomposition.

For segment l with checkpoints c in g_l (K = |g_l|) and each tracked layer:

    A_l = (1/K) sum_c A_c,   S_l = (1/K) sum_c S_c          (A_c, S_c: EK-FAC's per-example means at theta_c)
    A_l = Q_A diag(e_A) Q_A^T,  S_l = Q_S diag(e_S) Q_S^T    (one float64 eigendecomposition per segment)
    Lambda_l = (1/K) sum_c E_b[(Q_S^T G_b(theta_c) Q_A)^2]    [d_out, d_in], per-example means (not sums)

so the segment's curvature is H_l = (Q_S (x) Q_A) diag(vec Lambda_l) (Q_S (x) Q_A)^T. Segments are
fitted one after the other (covariance passes over its checkpoints, the eigendecomposition,
then the correction passes in its basis): one segment's running sums are held at a time.

Store (an EK-FAC ``FactorStore`` whose metadata has strategy "source"): ``covariance_<fp>`` per
checkpoint (fp its fingerprint), ``eigen_<segment fp>`` per segment (the fingerprint of its
checkpoints' fingerprints), ``lambda_<fp of segment and checkpoint>`` per checkpoint (its
corrected eigenvalues in its segment's basis). A resumed fit loads whatever is there and
computes only the rest.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..checkpoints import load_checkpoint, preserved_weights
from ..ekfac.factors import LayerFactors, covariance_factors, eigen, set_lambda


@dataclass
class Segment:
    """One segment: its checkpoints (indices into the fitted list), its fingerprint, its factors
    ({layer: LayerFactors} with Lambda_l in ``lam``), and its time s_l."""

    checkpoints: range
    fingerprint: str
    factors: dict
    time: float


def combined_fingerprint(*parts: str) -> str:
    return hashlib.sha1(",".join(parts).encode()).hexdigest()[:16]


def _load_weights(model, ckpt, k: int) -> None:
    load_checkpoint(model, ckpt, k)
    model.eval()


def _covariances(method, train, ckpt, k: int, fp: str, store, data, replay: bool) -> dict:
    """{layer: LayerFactors(A, S)} of checkpoint k: from the store, else a pass (saved; its
    captures kept for the correction of checkpoint k with ``replay``)."""
    if store is not None and store.exists("covariance", fp):
        store.check_data(fp, data.digests)
        return store.load(("covariance",), fp, method.layers, method._device())
    _load_weights(method.model, ckpt, k)
    sums = method.passes.covariances(train, k, method.fisher, method.seed, data, replay=replay)
    factors = covariance_factors(method.layers, sums)
    if store is not None:
        store.save("covariance", fp, factors, int(sums["examples"]), data.digests)
    return factors


def _lambda(method, train, ckpt, k: int, fp: str, factors: dict, store, data) -> dict:
    """{layer: corrected eigenvalues [d_out, d_in]} of checkpoint k in the segment's basis
    (``factors``): from the store, else a pass (saved)."""
    if store is not None and store.exists("lambda", fp):
        base = {name: LayerFactors(A=f.A, S=f.S) for name, f in factors.items()}
        loaded = store.load(("lambda",), fp, method.layers, method._device(), base)
        return {name: f.lam for name, f in loaded.items()}
    _load_weights(method.model, ckpt, k)
    set_lambda(method.layers, factors, method.passes.correction(train, k, factors, method.fisher, method.seed, data))
    if store is not None:
        store.save("lambda", fp, factors)
    return {name: f.lam for name, f in factors.items()}


def fit_segment(method, train, checkpoints: list, fps: list, group: range, time: float, store, data) -> Segment:
    """The ``Segment`` of the checkpoints ``group`` (see the module docstring)."""
    seg_fp = combined_fingerprint(*(fps[k] for k in group))
    with preserved_weights(method.model):
        sums = None
        for k in group:
            cov = _covariances(method, train, checkpoints[k], k, fps[k], store, data, replay=k == group[-1])
            if sums is None:
                sums = {name: LayerFactors(A=f.A.clone(), S=f.S.clone()) for name, f in cov.items()}
            else:
                for name, f in cov.items():
                    sums[name].A += f.A
                    sums[name].S += f.S
        factors = {name: LayerFactors(A=f.A / len(group), S=f.S / len(group)) for name, f in sums.items()}
        if store is not None and store.exists("eigen", seg_fp):
            store.load(("eigen",), seg_fp, method.layers, method._device(), factors)
        else:
            eigen(method.layers, factors, method.block_width, dtype=method.eigh_dtype)
            if store is not None:
                store.save("eigen", seg_fp, factors)
        total = None
        for k in reversed(group):  # the last covariance pass first: its captures are replayed
            lam = _lambda(method, train, checkpoints[k], k, combined_fingerprint(seg_fp, fps[k]), factors, store, data)
            total = {name: v.clone() for name, v in lam.items()} if total is None else \
                {name: total[name] + v for name, v in lam.items()}
    for name, f in factors.items():
        f.lam = total[name] / len(group)
    return Segment(group, seg_fp, factors, time)
