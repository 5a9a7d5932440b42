"""Step ``reference`` of the GPU check: the cuda and triton sketch backends against the reference.

Checks (each a row of reference.csv, fresh random inputs per row, outputs poisoned with NaN
before the call so an unwritten element fails):

  p_rows       one-hot rows of x give rows of P itself, compared with the NumPy oracle of the
               spec (``projection_rows``): Rademacher bit for bit, Gaussian within 1e-6 of
               max(|entry|, 1/sqrt(k)) (relative, except for entries far below their scale,
               whose relative error the note gives); row offsets up to 2**63 - 64, odd k;
               float32, bfloat16 and float16 x.
  sketch       x @ P against ``backend="torch"`` (float64 P and product) on the same device,
               relative error (max |diff| / max |ref|) < 1e-5; B from 1 to 257, p from 1 to
               70,001 (several p slices), k from 1 to 4097 (odd), row offsets across 2**31,
               2**32 and up to 2**62, every dtype and kind.
  accumulate   ``out`` (a strided view) += x @ P, x a transposed (non-contiguous) view.
  huge_p       x of 3 x (2**30 + 777) elements (more than 2**31, 64-bit offsets into x) at row
               offset 2**33 + 5 (rows beyond 2**32): x is zero outside three windows of 1,000
               columns, so the reference is the sum of the windows' reference sketches.
  determinism  the same call twice gives the same bits (a moving result is a race).
  cpu_equal    GPU features equal the C++ CPU backend's (when the extension is built).
  auto         ``backend="auto"`` picks the cuda backend on a GPU.

    python -m benchmarks.gpu.reference --out DIR [--device cuda] [--smoke]

Writes reference.csv / .json / .md; exits 1 when any check fails.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

import attrkernels as ak
from attrkernels import backends
from attrkernels.kernels.projection import projection_rows

from .common import parse, rel_err, time_left, write_table

KINDS = ("rademacher", "gaussian")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SKETCH_TOL = 1e-5
P_TOL = 1e-6
# (row_offset, k) of the P-row checks
P_CASES = [(0, 1), (2**31 - 37, 127), (2**32 - 17, 300), (2**40 + 3, 4097), (2**63 - 64, 129)]
# (B, p, k, row_offset) of the sketch checks, most informative first
SHAPES = [(5, 4099, 128, 2**31 - 1000), (64, 777, 1000, 2**32 - 100), (7, 2000, 4097, 2**40 + 3),
          (16, 70001, 300, 0), (1, 1, 1, 0), (3, 100, 33, 5), (257, 1500, 129, 2**62),
          (33, 20000, 2048, 12345)]
HUGE_P = 2**30 + 777
HUGE_OFFSET = 2**33 + 5


def gpu_backends(device: str) -> list[str]:
    if device == "cuda":
        return ["cuda", "triton"]
    names = []
    for name in ("cpu", "triton"):  # the dry run: whatever serves CPU tensors here
        try:
            backends.probe(name)
        except backends.BackendUnavailable:
            continue
        if "cpu" in backends.BACKENDS[name].devices():
            names.append(name)
    return names


class Checker:
    def __init__(self, out, device, smoke):
        self.out, self.device, self.smoke = out, device, smoke
        self.rows: list[dict] = []
        self.stopped = ""

    def enough_time(self, need: float) -> bool:
        if time_left() < need:
            self.stopped = self.stopped or f"stopped early: {time_left():.0f} s left of the step's time"
            return False
        return True

    def record(self, check, backend, dtype, kind, B, p, k, offset, fn, tol):
        """Run fn() -> (error, note); record a row (an exception is a failure with its message)."""
        t0 = time.perf_counter()
        try:
            err, note = fn()
            ok = bool(err <= tol) if tol > 0 else bool(err == 0)
        except Exception as e:  # noqa: BLE001  (a crash is a failed check, the next one runs)
            err, ok, note = float("nan"), False, f"{type(e).__name__}: {e}"[:300]
        self.rows.append(dict(check=check, backend=backend, dtype=dtype, kind=kind, B=B, p=p, k=k,
                              row_offset=offset, error=err, tol=tol, ok="yes" if ok else "NO",
                              seconds=round(time.perf_counter() - t0, 3), note=note))
        if not ok:
            print(f"FAIL {self.rows[-1]}", flush=True)

    def x(self, B, p, dtype, seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(B, p, generator=g).to(device=self.device, dtype=dtype)

    def poisoned(self, B, k):
        return torch.full((B, k), float("nan"), device=self.device)

    # -----------------------------------------------------------------------------------------
    def p_rows(self, backend, dname, kind, offset, k):
        p = 16 if self.smoke else 64
        eye = torch.eye(p, device=self.device, dtype=DTYPES[dname])

        def fn():
            got = ak.sketch(eye, k, seed=5, kind=kind, backend=backend, row_offset=offset,
                            out=self.poisoned(p, k)).cpu().numpy()
            want = projection_rows(offset, p, k, seed=5, kind=kind)
            if kind == "rademacher":
                diff = int(np.count_nonzero(got != want))
                return diff, f"{diff} of {got.size} entries differ"
            diff = np.nan_to_num(np.abs(got.astype(np.float64) - want), nan=np.inf)
            # relative to the entry, or to the entries' scale 1/sqrt(k) for tiny entries
            err = (diff / np.maximum(np.abs(want), 1 / np.sqrt(k))).max()
            rel = (diff / np.maximum(np.abs(want), 1e-30)).max()
            return float(err), f"max relative error per entry {rel:.2g}"
        self.record("p_rows", backend, dname, kind, p, p, k, offset, fn, 0 if kind == "rademacher" else P_TOL)

    def sketch(self, backend, dname, kind, B, p, k, offset, seed):
        def fn():
            x = self.x(B, p, DTYPES[dname], seed)
            got = ak.sketch(x, k, seed=seed, kind=kind, backend=backend, row_offset=offset,
                            out=self.poisoned(B, k))
            want = ak.sketch(x, k, seed=seed, kind=kind, backend="torch", row_offset=offset)
            return rel_err(got, want), ""
        self.record("sketch", backend, dname, kind, B, p, k, offset, fn, SKETCH_TOL)

    def accumulate(self, backend, dname, kind):
        B, p, k = (3, 100, 70) if self.smoke else (40, 9000, 700)

        def fn():
            xt = self.x(p, B, DTYPES[dname], 11).t()  # [B, p], not contiguous
            wide = torch.randn(B, k + 50, device=self.device)
            before = wide.clone()
            out = wide[:, 20:20 + k]  # a strided view
            ak.sketch(xt, k, seed=2, kind=kind, backend=backend, row_offset=77, out=out, accumulate=True)
            want = before[:, 20:20 + k].double() + ak.sketch(xt.contiguous(), k, seed=2, kind=kind,
                                                             backend="torch", row_offset=77).double()
            outside = torch.cat([wide[:, :20] != before[:, :20], wide[:, 20 + k:] != before[:, 20 + k:]], 1)
            if outside.any():
                return float("inf"), f"wrote {int(outside.sum())} elements outside out"
            return rel_err(out, want), ""
        self.record("accumulate", backend, dname, kind, B, p, k, 77, fn, SKETCH_TOL)

    def huge(self, backend, dname, kind):
        B, k = 3, (40 if self.smoke else 256)
        p = 400 if self.smoke else HUGE_P
        w = 40 if self.smoke else 1000
        windows = [0, p // 2 + 3, p - w]

        def fn():
            x = torch.zeros(B, p, device=self.device, dtype=DTYPES[dname])
            want = torch.zeros(B, k, dtype=torch.float64, device=self.device)
            for i, c0 in enumerate(windows):
                x[:, c0:c0 + w] = self.x(B, w, DTYPES[dname], 100 + i)
                want += ak.sketch(x[:, c0:c0 + w].contiguous(), k, seed=3, kind=kind, backend="torch",
                                  row_offset=HUGE_OFFSET + c0).double()
            got = ak.sketch(x, k, seed=3, kind=kind, backend=backend, row_offset=HUGE_OFFSET,
                            out=self.poisoned(B, k))
            del x
            return rel_err(got, want), f"x has {B * p:,} elements"
        self.record("huge_p", backend, dname, kind, B, p, k, HUGE_OFFSET, fn, SKETCH_TOL)

    def determinism(self, backend, dname, kind):
        B, p, k = (4, 100, 50) if self.smoke else (64, 70001, 1000)

        def fn():
            x = self.x(B, p, DTYPES[dname], 21)
            a = ak.sketch(x, k, seed=9, kind=kind, backend=backend)
            b = ak.sketch(x, k, seed=9, kind=kind, backend=backend)
            diff = int((a != b).sum().item())
            return diff, f"{diff} of {a.numel()} entries differ between two calls"
        self.record("determinism", backend, dname, kind, B, p, k, 0, fn, 0)

    def cpu_equal(self, backend, kind):
        def fn():
            x = torch.randn(8, 3000, generator=torch.Generator().manual_seed(7))
            cpu = ak.sketch(x, 512, seed=7, kind=kind, backend="cpu")
            return rel_err(ak.sketch(x.to(self.device), 512, seed=7, kind=kind, backend=backend), cpu), ""
        self.record("cpu_equal", backend, "fp32", kind, 8, 3000, 512, 0, fn, SKETCH_TOL)

    def auto(self):
        def fn():
            name, _ = backends.resolve("sketch", "auto", torch.device(self.device),
                                       variant=(torch.float32, "rademacher"))
            want = "cuda" if self.device == "cuda" else "cpu"
            return (0 if name == want else 1), f"auto picked {name}"
        self.record("auto", "auto", "", "", 0, 0, 0, 0, fn, 0)


def main() -> int:
    args = parse(__doc__)
    names = gpu_backends(args.device)
    c = Checker(args.out, args.device, args.smoke)
    shapes = [(min(B, 5), min(p, 100), min(k, 70), off) for B, p, k, off in SHAPES[:2]] if args.smoke else SHAPES
    combos = [(b, d, kd) for b in names for d in DTYPES for kd in KINDS
              if not (args.smoke and b == "triton" and d == "bf16")]  # the interpreter widens bf16 anyway
    print(f"backends {names}; {len(combos)} backend x dtype x kind combinations", flush=True)

    def flush():
        passed = sum(r["ok"] == "yes" for r in c.rows)
        intro = (f"Sketch backends against the reference on {args.device}"
                 f"{' (smoke: tiny inputs)' if args.smoke else ''}: {passed} of {len(c.rows)} checks pass. "
                 f"Tolerances: P rows bit-exact (Rademacher) / {P_TOL:g} of max(|entry|, 1/sqrt(k)) (Gaussian); "
                 f"sketches {SKETCH_TOL:g} of the largest output. {c.stopped}")
        write_table(args.out, "reference", c.rows,
                    ["check", "backend", "dtype", "kind", "B", "p", "k", "row_offset", "error", "ok", "note"],
                    intro, {"backends": names, "device": args.device, "smoke": args.smoke})

    c.auto()
    p_cases = [(off, min(k, 300)) for off, k in P_CASES[1:3]] if args.smoke else P_CASES
    for offset, k in p_cases:  # cheap, and the spec's core: every combination first
        for b, d, kd in combos:
            if c.enough_time(5):
                c.p_rows(b, d, kd, offset, k)
    flush()
    for i, (B, p, k, off) in enumerate(shapes):
        for b, d, kd in combos:
            if c.enough_time(5):
                c.sketch(b, d, kd, B, p, k, off, seed=1000 * i + len(c.rows))
        flush()
    for b, d, kd in combos:
        if c.enough_time(5):
            c.accumulate(b, d, kd)
    for b in names:
        for kd in KINDS:
            if c.enough_time(10):
                c.determinism(b, "bf16", kd)
            if args.device == "cuda" and "cpu" in _usable() and c.enough_time(5):
                c.cpu_equal(b, kd)
    flush()
    for b in names:  # the largest: last, so that a slow one cannot crowd out the rest
        for d in ("bf16", "fp32"):
            if c.enough_time(20):
                c.huge(b, d, "gaussian" if d == "fp32" else "rademacher")
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    flush()
    bad = [r for r in c.rows if r["ok"] != "yes"]
    print(f"{len(c.rows) - len(bad)} of {len(c.rows)} checks pass{'; ' + c.stopped if c.stopped else ''}")
    if args.smoke:  # the dry run checks that this code runs; CPU correctness is the test suite's
        if bad:
            print(f"smoke: {len(bad)} checks disagree on the CPU (informative: the GPU run gates on them)")
        return 0
    return 1 if bad else 0


def _usable() -> list[str]:
    return [name for name, (ok, _) in backends.status().items() if ok]


if __name__ == "__main__":
    sys.exit(main())
