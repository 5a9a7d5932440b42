"""Shared helpers of the benchmarks: timing, machine peaks, memory high-water marks, provenance."""
from __future__ import annotations

import csv
import io
import statistics
import time
from pathlib import Path

import torch

from attrkernels.provenance import provenance  # noqa: F401  (re-exported for the benchmarks)
from attrkernels.store import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, reps: int = 3, warmup: int = 1, budget_s: float = 30.0):
    """Median wall time of ``fn()`` over ``reps`` runs (fewer when one run exceeds ``budget_s``).

    On a GPU, CUDA events time the device work.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if sum(times) > budget_s:
            break
    return statistics.median(times)


def matmul_peak_gflops(device: torch.device, n: int = 4096, dtype=torch.float32) -> float:
    """fp32 GEMM throughput of this machine (torch.mm, n x n), GFLOP/s."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_call(lambda: torch.mm(a, b), device, reps=5)
    return 2 * n**3 / t / 1e9


def time_paired_with_peak(fn, device: torch.device, flops: float, reps: int = 5, n: int = 4096):
    """Time ``fn()`` and the fp32 matmul peak (torch.mm n x n) alternately, ``reps`` pairs.

    On a machine shared with other jobs the throughput available changes from second to second;
    a peak measured minutes apart can be off by 2x. Each pair is measured back to back, so its
    ratio compares like with like. Returns (median time of fn, median over pairs of fn's GFLOP/s
    as a fraction of that pair's peak, median peak GFLOP/s).
    """
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    fn()
    torch.mm(a, b)
    sync(device)
    times, ratios, peaks = [], [], []
    for _ in range(reps):
        tp = time_call(lambda: torch.mm(a, b), device, reps=1, warmup=0)
        t = time_call(fn, device, reps=1, warmup=0)
        peak = 2 * n**3 / tp / 1e9
        times.append(t)
        peaks.append(peak)
        ratios.append(flops / t / 1e9 / peak)
    return statistics.median(times), statistics.median(ratios), statistics.median(peaks)


def bandwidth_gbs(device: torch.device, nbytes: int = 1 << 29) -> float:
    """Copy bandwidth (bytes read + bytes written per second), GB/s."""
    src = torch.empty(nbytes // 4, device=device)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, reps=5)
    return 2 * nbytes / t / 1e9


def reset_peak_rss() -> int:
    """Reset the process's resident-set high-water mark (Linux); returns the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(stem: Path, rows: list, columns: list, info: dict, intro: str,
                  extra: dict | None = None, outro: str = "") -> None:
    """``stem``.csv (provenance and ``extra`` as # lines, then rows) and ``stem``.md (``intro``,
    the table, then ``outro``), both written atomically; prints the markdown."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    lines = {**info, **(extra or {})}
    buf = io.StringIO()
    buf.write("".join(f"# {key}: {val}\n" for key, val in lines.items()))
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    text = buf.getvalue().encode()
    atomic_write(stem.with_suffix(".csv"), lambda f: f.write(text))
    md = (intro + "\n\n" + markdown_table(rows, columns) + "\n" + outro).encode()
    atomic_write(stem.with_suffix(".md"), lambda f: f.write(md))
    print(md.decode())

