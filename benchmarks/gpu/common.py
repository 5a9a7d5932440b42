"""What every step of the GPU check (``benchmarks.gpu_check``) shares: its arguments, its time
left, how it reports a skip, and how it writes its table.

A step is ``python -m benchmarks.gpu.<name> --out DIR [--device cuda|cpu] [--smoke]``:

* ``--device cuda`` measures on the GPU; ``--smoke`` (the CPU dry run) runs the same code on tiny
  inputs on the CPU so that an API change breaks CI instead of the next GPU window.
* ``GPU_CHECK_DEADLINE`` (Unix time, set by the driver) is when the driver will kill the step:
  steps order their work by importance, write their table after every row and stop starting new
  rows when little time is left, so a slow step still leaves what it measured.
* Exit 0: done. Exit 77 (``skip``): not applicable here (a peer not installed), the reason on the
  last line of the output. Anything else: failed.

Nothing here imports attrkernels' internals, so the check keeps working while they move.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

SKIP = 77


def parse(description: str, extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results folder of the check")
    parser.add_argument("--device", default=None, choices=("cuda", "cpu"),
                        help="default: cuda when torch sees a GPU, else cpu")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny inputs (the CPU dry run): exercises the code, measures nothing")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        skip("no CUDA GPU visible to torch")
    if args.smoke:  # tiny problems: one thread (two spin at OpenMP barriers on a shared machine)
        torch.set_num_threads(1)
    return args


def time_left() -> float:
    """Seconds until the driver's deadline for this step (inf when run by hand)."""
    deadline = os.environ.get("GPU_CHECK_DEADLINE")
    return float(deadline) - time.time() if deadline else float("inf")


def skip(reason: str) -> None:
    print(f"skipped: {reason}", flush=True)
    sys.exit(SKIP)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


def write_table(out: Path, name: str, rows: list[dict], columns: list[str], intro: str,
                meta: dict | None = None, outro: str = "") -> None:
    """``name``.csv (all columns of every row), ``name``.json (meta + rows) and ``name``.md
    (intro, the table of ``columns``, outro), each replaced atomically."""
    every = list(columns) + sorted({k for r in rows for k in r} - set(columns))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=every, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    _atomic(out / f"{name}.csv", buf.getvalue())
    _atomic(out / f"{name}.json", json.dumps({"meta": meta or {}, "rows": rows}, indent=1, default=str))
    _atomic(out / f"{name}.md", f"{intro}\n\n{markdown(rows, columns)}\n{outro}")


def median_time(fn, device: str, reps: int = 5, warmup: int = 1, budget_s: float = 5.0) -> float:
    """Median seconds of ``fn()``: CUDA events on a GPU (device work only, after a synchronize),
    perf_counter on the CPU; fewer repetitions once ``budget_s`` is spent."""
    import torch

    for _ in range(warmup):
        fn()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if sum(times) > budget_s:
            break
    return statistics.median(times)


def wall(fn, device: str):
    """(result, wall seconds) of ``fn()``, synchronising a GPU before and after."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def rel_err(got, want) -> float:
    """max |got - want| / max |want| in float64 (inf when got has NaN or Inf)."""
    import torch

    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def installed(module: str) -> str | None:
    """Version of an importable module, else None."""
    import importlib

    try:
        m = importlib.import_module(module)
    except Exception:  # noqa: BLE001  (a broken peer counts as absent)
        return None
    return getattr(m, "__version__", "installed")
