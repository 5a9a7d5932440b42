"""The sketch kernel on every backend that runs here, against the NumPy oracle of the spec.

Tolerances: Rademacher P is compared bit for bit; Gaussian P within 1e-6 relative per entry
(compiled backends use float32 polynomials, the oracle float64 libm); sketches against a float64
x @ P within 1e-5 of the largest output (float32 accumulation over p terms).
"""
import importlib
import os

import numpy as np
import pytest
import torch

import attrkernels as ak
from attrkernels import backends
from attrkernels.kernels.projection import projection_rows

KINDS = ["rademacher", "gaussian"]


def cpu_backends():
    names = ["torch"]
    for name in ("cpu", "triton"):
        try:
            backends.probe(name)
        except backends.BackendUnavailable:
            continue
        if "cpu" in backends.BACKENDS[name].devices():
            names.append(name)
    return names


BACKENDS = cpu_backends()
COMPILED = [b for b in BACKENDS if b != "torch"]


def isas():
    from attrkernels import _C

    return _C.usable_isas()


def oracle(row0, p, k, seed, kind):
    return projection_rows(row0, p, k, seed=seed, kind=kind).astype(np.float64)


def assert_same_p(got, want, kind):
    if kind == "rademacher":
        assert np.array_equal(got, want.astype(np.float32))
    else:
        rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
        assert rel.max() < 1e-6, rel.max()


def rel_err(got, want):
    got = got.double() if torch.is_tensor(got) else torch.from_numpy(np.asarray(got, dtype=np.float64))
    want = want if torch.is_tensor(want) else torch.from_numpy(want)
    want = want.double()
    return ((got - want).abs().max() / want.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# The projection matrix


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_cpu_rows_equal_oracle(kind, isa):
    if isa not in isas():
        pytest.skip(f"{isa} build cannot run on this CPU")
    from attrkernels import _C

    for row0, p, k in [(0, 50, 300), (2**32 - 20, 40, 129), (2**40 + 3, 5, 4097), (7, 3, 1)]:
        out = torch.empty(p, k)
        _C.projection_rows(out.data_ptr(), k, row0, p, k, 99, KINDS.index(kind), 0, isa)
        assert_same_p(out.numpy(), oracle(row0, p, k, 99, kind), kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_p_equals_oracle(kind, backend):
    # sketch of the identity rows is P itself: a one-hot row picks one row of P exactly.
    p, k, row0 = 40, 300, 2**32 - 17
    eye = torch.eye(p)
    got = ak.sketch(eye, k, seed=5, kind=kind, backend=backend, row_offset=row0)
    assert_same_p(got.numpy(), oracle(row0, p, k, 5, kind), kind)


def test_torch_generator_on_device_matches_numpy():
    for kind in KINDS:
        a = projection_rows(3, 20, 200, seed=11, kind=kind, device=torch.device("cpu"))
        b = projection_rows(3, 20, 200, seed=11, kind=kind)
        assert np.array_equal(a.numpy(), b)


def test_sketch_matrix_rows_slice():
    full = ak.sketch_matrix(100, 37, seed=4, kind="gaussian")
    part = ak.sketch_matrix(100, 37, seed=4, kind="gaussian", rows=slice(10, 30))
    assert full.shape == (100, 37) and full.dtype == torch.float32
    assert torch.equal(full[10:30], part)
    with pytest.raises(ValueError, match="step"):
        ak.sketch_matrix(100, 37, rows=slice(0, 10, 2))


@pytest.mark.parametrize("kind", KINDS)
def test_distribution_of_p(kind):
    k = 1000
    P = oracle(0, 2000, k, 1, kind) * np.sqrt(k)
    assert abs(P.mean()) < 0.01
    assert abs(P.var() - 1) < 0.01
    if kind == "gaussian":
        assert abs((P**4).mean() - 3) < 0.05  # Gaussian kurtosis
    else:
        assert set(np.unique(np.round(P, 5))) == {-1.0, 1.0}


# ---------------------------------------------------------------------------------------------
# The sketch


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, p, k", [(1, 700, 1), (3, 300, 3), (2, 513, 1000), (1, 257, 4097)])
def test_sketch_equals_x_times_p(kind, backend, B, p, k):
    if backend == "triton" and B * p * k > 3 * 300 * 1000:
        pytest.skip("kept small for the Triton interpreter")
    x = torch.randn(B, p, generator=torch.Generator().manual_seed(B * p + k))
    got = ak.sketch(x, k, seed=12, kind=kind, backend=backend)
    want = x.double().numpy() @ oracle(0, p, k, 12, kind)
    assert got.shape == (B, k) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_large_batch_cpu(kind):
    x = torch.randn(300, 1000, generator=torch.Generator().manual_seed(0))
    got = ak.sketch(x, 130, seed=3, kind=kind, backend="cpu")
    want = x.double().numpy() @ oracle(0, 1000, 130, 3, kind)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_each_isa_build_sketches_correctly(kind, isa):
    if isa not in isas():
        pytest.skip(f"{isa} build cannot run on this CPU")
    from attrkernels import _C

    x = torch.randn(13, 3000, generator=torch.Generator().manual_seed(1))
    out = torch.empty(13, 777)
    _C.sketch(x.data_ptr(), 0, 13, 3000, 3000, out.data_ptr(), 777, 777, 8, KINDS.index(kind), 0,
              False, 0, 0, isa)
    assert rel_err(out, x.double().numpy() @ oracle(0, 3000, 777, 8, kind)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_inputs(backend, dtype, kind):
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = ak.sketch(x, 200, seed=1, kind=kind, backend=backend)
    want = x.double().numpy() @ oracle(0, 300, 200, 1, kind)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_64bit_row_offsets(backend):
    # rows straddling 2**32 and far beyond it, without allocating 2**32 floats
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    for row0 in (2**32 - 32, 2**40 + 12345, 2**62):
        for kind in KINDS:
            got = ak.sketch(x, 150, seed=9, kind=kind, backend=backend, row_offset=row0)
            assert rel_err(got, x.double().numpy() @ oracle(row0, 64, 150, 9, kind)) < 1e-5


def test_row_offsets_compose():
    # the sketch of a concatenation is the sum of the sketches of its pieces at their offsets
    x = torch.randn(5, 1000, generator=torch.Generator().manual_seed(4))
    whole = ak.sketch(x, 256, seed=2, kind="gaussian")
    out = ak.sketch(x[:, :300], 256, seed=2, kind="gaussian")
    ak.sketch(x[:, 300:], 256, seed=2, kind="gaussian", row_offset=300, out=out, accumulate=True)
    assert rel_err(out, whole) < 1e-5


@pytest.mark.parametrize("backend", COMPILED)
def test_linearity(backend):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(3, 500, generator=g), torch.randn(3, 500, generator=g)
    f = lambda v: ak.sketch(v, 64, seed=3, kind="gaussian", backend=backend)  # noqa: E731
    assert rel_err(f(2 * x - 3 * y), 2 * f(x) - 3 * f(y)) < 1e-5


def test_deterministic_and_independent_of_thread_count():
    x = torch.randn(37, 20000, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    try:
        for kind in KINDS:
            a = ak.sketch(x, 1000, seed=1, kind=kind, backend="cpu")
            b = ak.sketch(x, 1000, seed=1, kind=kind, backend="cpu")
            torch.set_num_threads(1)
            c = ak.sketch(x, 1000, seed=1, kind=kind, backend="cpu")
            torch.set_num_threads(threads)
            assert torch.equal(a, b) and torch.equal(a, c)
    finally:
        torch.set_num_threads(threads)


def test_rows_are_independent_of_batch():
    # a row's sketch does not depend on the other rows of the batch (fixed summation order)
    x = torch.randn(17, 3000, generator=torch.Generator().manual_seed(7))
    full = ak.sketch(x, 500, seed=4, backend="cpu")
    for i in (0, 6, 16):
        assert torch.equal(ak.sketch(x[i:i + 1], 500, seed=4, backend="cpu")[0], full[i])


def test_different_seeds_differ():
    x = torch.randn(2, 400)
    a = ak.sketch(x, 100, seed=0)
    b = ak.sketch(x, 100, seed=1)
    assert (a - b).abs().max() > 0.1 * a.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_norm_preservation(kind):
    # E||xP||^2 = ||x||^2 and Var(||xP||^2 / ||x||^2) = 2/k for Gaussian P (about that for signs)
    k, n = 1000, 200
    x = torch.randn(n, 3000, generator=torch.Generator().manual_seed(8))
    ratio = (ak.sketch(x, k, seed=21, kind=kind).norm(dim=1) / x.norm(dim=1)) ** 2
    assert abs(ratio.mean().item() - 1) < 4 * np.sqrt(2 / k / n)
    assert abs(ratio.std().item() - np.sqrt(2 / k)) < 0.3 * np.sqrt(2 / k)


def test_non_contiguous_input():
    x = torch.randn(600, 6)
    got = ak.sketch(x.t(), 50, seed=1)
    assert rel_err(got, ak.sketch(x.t().contiguous(), 50, seed=1)) < 1e-6


# ---------------------------------------------------------------------------------------------
# CPU kernel variants (micro-tile and generation/consumption split chosen per microarchitecture)


def raw_sketch(x, k, seed, kind, isa, variant, threads=0, row0=0, out=None, accumulate=False,
               colsum=None):
    """The C++ kernel called directly on one (ISA build, variant); returns (out, nonfinite)."""
    from attrkernels import _C

    B, p = x.shape
    out = torch.zeros(B, k) if out is None else out
    bad = torch.zeros(B, dtype=torch.uint8)
    dtype = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[x.dtype]
    _C.sketch(x.data_ptr(), dtype, B, p, x.stride(0), out.data_ptr(), out.stride(0), k, seed,
              KINDS.index(kind), row0, accumulate, threads, bad.data_ptr(), isa, variant,
              0 if colsum is None else colsum.data_ptr())
    return out, bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_cpu_column_sums_are_the_in_order_sums_on_every_variant_and_thread_count(isa, dtype):
    # colsum[i] += x[0, i] + x[1, i] + ... in that order: exactly the float32 loop below, and
    # the sketch itself is unchanged by asking for them.
    if isa not in isas():
        pytest.skip(f"{isa} build cannot run on this CPU")
    from attrkernels import _C

    for (B, p, k) in [(13, 3000, 777), (300, 1000, 129), (1, 700, 1), (32, 5000, 2048)]:
        x = torch.randn(B, p, generator=torch.Generator().manual_seed(B + p)).to(dtype)
        start = torch.randn(p, generator=torch.Generator().manual_seed(1))
        want = start.clone()
        for b in range(B):
            want += x[b].float()
        plain, _ = raw_sketch(x, k, 4, "rademacher", isa, "panel")
        for v in _C.sketch_variants(isa):
            for threads in (1, 2, 5):
                colsum = start.clone()
                got, _ = raw_sketch(x, k, 4, "rademacher", isa, v, threads=threads, colsum=colsum)
                assert torch.equal(colsum, want), (v, threads, B, p, k)
                assert torch.equal(got, plain), (v, threads, B, p, k)


@pytest.mark.parametrize("backend", cpu_backends())
def test_column_sums_through_the_api(backend):
    x = torch.randn(7, 900, generator=torch.Generator().manual_seed(2))
    colsum = torch.ones(900)
    ak.sketch(x, 64, backend=backend, colsum=colsum)
    assert rel_err(colsum, 1 + x.double().sum(0).numpy()) < 1e-6
    with pytest.raises(ValueError, match=r"colsum must be a float32 tensor of shape \(900,\)"):
        ak.sketch(x, 64, backend=backend, colsum=torch.zeros(899))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_cpu_variants_give_the_same_bits(kind, isa):
    # Variants differ in loop order and micro-tile only: same per-chunk summation order, same
    # bits, for any thread count; and they agree with the oracle.
    if isa not in isas():
        pytest.skip(f"{isa} build cannot run on this CPU")
    from attrkernels import _C

    variants = _C.sketch_variants(isa)
    assert variants[0] == "panel" and len(variants) >= 2
    for (B, p, k, row0) in [(13, 3000, 777, 0), (32, 1500, 1024, 2**33 + 5), (1, 700, 1, 0),
                            (37, 2000, 129, 7), (5, 300, 2050, 0), (300, 400, 200, 3)]:
        x = torch.randn(B, p, generator=torch.Generator().manual_seed(B + p + k))
        want = x.double().numpy() @ oracle(row0, p, k, 8, kind)
        first = None
        for v in variants:
            for threads in (1, 2, 5):
                got, _ = raw_sketch(x, k, 8, kind, isa, v, threads=threads, row0=row0)
                if first is None:
                    first = got
                    assert rel_err(got, want) < 1e-5
                assert torch.equal(got, first), (v, threads, B, p, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_variants_half_inputs_accumulate_and_flag_rows(dtype):
    from attrkernels import _C

    isa = _C.isa("")
    x = torch.randn(9, 1000, generator=torch.Generator().manual_seed(3))
    x[4, 517] = float("nan")
    xh = x.to(dtype)
    base = torch.randn(9, 300, generator=torch.Generator().manual_seed(4))
    outs = []
    for v in _C.sketch_variants(isa):
        out, bad = raw_sketch(xh, 300, 2, "rademacher", isa, v, out=base.clone(), accumulate=True)
        assert bad.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]
        outs.append(out)
    ok = [0, 1, 2, 3, 5, 6, 7, 8]  # (row 4 is NaN: unspecified)
    for out in outs[1:]:
        assert torch.equal(out[ok], outs[0][ok])
    want = base.double().numpy() + xh.double().numpy() @ oracle(0, 1000, 300, 2, "rademacher")
    assert rel_err(outs[0][ok], want[ok]) < 1e-5


def test_cpu_variant_choice(monkeypatch):
    from attrkernels import _C

    isa = _C.isa("")
    variants = _C.sketch_variants(isa)
    default = _C.sketch_variant("", isa)
    assert default in variants
    if isa == "avx512" and _C.cpu_vendor() == "intel":
        assert default.startswith("strip")
    if _C.cpu_vendor() == "amd":
        assert default == "panel"  # the EPYC-tuned kernel (91% of peak there)
    monkeypatch.setenv("ATTRKERNELS_SKETCH_VARIANT", variants[-1])
    assert _C.sketch_variant("", isa) == variants[-1]
    monkeypatch.setenv("ATTRKERNELS_SKETCH_VARIANT", "no-such-kernel")
    with pytest.raises(ValueError, match="sketch variant 'no-such-kernel' does not exist"):
        ak.sketch(torch.randn(2, 10), 4, backend="cpu")
    assert "sketch variant" in backends.status()["cpu"][1]


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_rank():
    with pytest.raises(ValueError, match=r"x must have shape \[B, p\]"):
        ak.sketch(torch.randn(10), 4)
    with pytest.raises(ValueError, match=r"x must have shape \[B, p\]"):
        ak.sketch(torch.randn(2, 3, 4), 4)


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        ak.sketch(torch.randn(2, 10), k)


def test_bad_dtype():
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        ak.sketch(torch.ones(2, 10, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        ak.sketch(torch.ones(2, 10, dtype=torch.float64), 4)


def test_bad_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        ak.sketch(torch.randn(2, 10), 4, kind="uniform")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows_are_named(backend):
    x = torch.randn(6, 50)
    x[1, 3] = float("nan")
    x[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf values in 2 of 6 rows: \[1, 4\]"):
        ak.sketch(x, 8, backend=backend)


def test_unavailable_backend_by_name():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(backends.BackendUnavailable, match="backend 'cuda' is unavailable"):
        ak.sketch(torch.randn(2, 10), 4, backend="cuda")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        ak.sketch(torch.randn(2, 10), 4, backend="fortran")


def test_bad_out_and_offset():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="out must be a float32 tensor of shape"):
        ak.sketch(x, 4, out=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="row_offset must be"):
        ak.sketch(x, 4, row_offset=-1)


# ---------------------------------------------------------------------------------------------
# GPU backends (skip here)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_backends_match_reference(backend, dtype, kind):
    x = torch.randn(37, 5000, device="cuda").to(dtype)
    got = ak.sketch(x, 1000, seed=3, kind=kind, backend=backend, row_offset=2**32 - 100)
    want = ak.sketch(x, 1000, seed=3, kind=kind, backend="torch", row_offset=2**32 - 100)
    assert rel_err(got.cpu(), want.cpu()) < 1e-5


@gpu
def test_gpu_features_equal_cpu_features():
    x = torch.randn(8, 3000)
    for kind in KINDS:
        cpu = ak.sketch(x, 512, seed=7, kind=kind, backend="cpu")
        for backend in ("cuda", "triton"):
            assert rel_err(ak.sketch(x.cuda(), 512, seed=7, kind=kind, backend=backend).cpu(), cpu) < 1e-5


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton needs a GPU or the interpreter")
def test_auto_never_picks_the_interpreter_on_cpu():
    name, _ = backends.resolve("sketch", "auto", torch.device("cpu"))
    assert name in ("cpu", "torch")


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("accumulate", [False, True])
def test_triton_p_slices_add_up(monkeypatch, accumulate):
    # GPU backends split p into slices whose partial sums are added afterwards; shrink the slice
    # so the interpreter exercises that path on a small problem.
    monkeypatch.setattr(importlib.import_module("attrkernels.kernels.sketch"), "SLICE_ROWS", 64)
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(9))
    start = torch.randn(3, 130, generator=torch.Generator().manual_seed(10))
    out = start.clone()
    ak.sketch(x, 130, seed=4, kind="gaussian", backend="triton", out=out, accumulate=accumulate)
    want = x.double().numpy() @ oracle(0, 300, 130, 4, "gaussian") + (start.double().numpy() if accumulate else 0)
    assert rel_err(out, want) < 1e-5
