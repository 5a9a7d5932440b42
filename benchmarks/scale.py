"""Scale-out benchmarks (issue 14): out-of-core TRAK scoring from a 1M-example feature store, and
one vs two gloo processes for TRAK's fit.

(a) Scoring. A synthetic store of n_train = 1M rows (k = 512, float32 features + Q, written with
    the library's own feature files, ``methods.trak_store``) is scored against synthetic solves
    X [n_test, k] with the library's tiled path (``methods.trak_score.score_rows`` over
    ``Features.rows``: plain reads, row x column tiles): the cost of ``TRAK.score`` after the test
    features (model-dependent, excluded). Rows:
      * 1M x 10k: scores produced tile by tile and dropped (the 40 GB float32 matrix is not
        written on this shared disk): compute, feature reads and memory of the whole job;
      * 1M x 1k with ``out=`` a path (``ScoreOutput``'s positioned writes, 4 GB): the write path;
      * the 50k-query row as one rank's share: rows [0, 50k) of the 1M store x 50k queries
        (rank 0 of 20 ranks scoring 1M x 50k; each rank's memory is the same);
    each with wall time, throughput, peak RSS (VmHWM, reset before each row), and the floor: the
    larger of FLOPs / peak (torch.mm fp32 measured in the same run) and bytes read / the store
    file's read bandwidth (measured in the same run; page cache included).
(b) TRAK fit on digits-mlp (1000 examples, k = 512, 1 checkpoint) in one process and in two gloo
    processes (spawned), plus the collective alone: one ``all_reduce_sum`` of TRAK's payload
    (k x k float64 per checkpoint + n_train int64 digests) on two gloo processes.

    python -m benchmarks.scale                 # default (about 10 min on 2 idle cores)
    python -m benchmarks.scale --quick         # 100k rows, for a smoke run
Results: benchmarks/results/scale_score.{md,csv}, scale_fit.{md,csv}; the cost model is
benchmarks/results/scale_cost_model.md (written by hand).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attrkernels as ak
from attrkernels.distributed import all_reduce_sum
from attrkernels.methods.scores import ScoreOutput
from attrkernels.methods.trak_score import column_block, score_rows
from attrkernels.methods.trak_store import Features, Part, encode, feature_array, width

from .common import RESULTS, matmul_peak_gflops, peak_rss, provenance, reset_peak_rss, write_results
from .setup_task import checkpoints, loaders

CHUNK = 65536
ROWS = ["full", "out", "rank"]


def build_store(path: Path, n: int, k: int, dtype: str = "float32") -> Features:
    """A feature file of n synthetic rows (Gaussian Phi / sqrt(k), Q uniform in [0, 1]), reused
    when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = feature_array(path, n, k, CHUNK, dtype)
    g = torch.Generator().manual_seed(0)
    for i in arr.missing():
        r0, r1 = arr.rows(i)
        arr.write(i, encode(torch.randn(r1 - r0, k, generator=g) / k ** 0.5, torch.rand(r1 - r0, generator=g), dtype))
    arr.commit()
    return Features([Part(arr, 0, 0, n)], k, dtype)


def read_bandwidth(path: Path) -> float:
    """Bytes per second of a sequential read of ``path`` in 64 MiB blocks (page cache included)."""
    t0, total = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(64 << 20):
            total += len(block)
    return total / (time.perf_counter() - t0)


def score_row(features: Features, rows: int, n_test: int, k: int, peak: float, bw: float, out=None) -> dict:
    """Score rows [0, rows) against n_test synthetic solves; out None: tiles dropped."""
    solves = [np.random.default_rng(1).standard_normal((n_test, k), dtype=np.float32)]
    base = reset_peak_rss()
    t0 = time.perf_counter()
    if out is None:
        score_rows([features], solves, 0, rows, lambda r, c, tile: None, tile=4096,
                   cols=column_block(n_test, k, 1))
    else:
        with ScoreOutput(out, n_test, n_train=rows) as dest:
            score_rows([features], solves, 0, rows, lambda r, c, tile: dest.write(r, tile, col=c), tile=4096,
                       cols=column_block(n_test, k, 1))
            dest.finish(rows=rows)
    seconds = time.perf_counter() - t0
    flops = 2.0 * rows * n_test * k
    blocks = -(-n_test // column_block(n_test, k, 1))
    read = blocks * rows * width(k, features.dtype) * (4 if features.dtype == "float32" else 2)
    written = 0 if out is None else 4 * rows * n_test
    floor = max(flops / (peak * 1e9), read / bw)
    return {"n_train": rows, "n_test": n_test, "k": k, "dtype": features.dtype,
            "scores": "dropped" if out is None else "out= .npy", "seconds": round(seconds, 1),
            "GFLOP/s": round(flops / seconds / 1e9, 1), "peak GFLOP/s": round(peak, 1),
            "floor s": round(floor, 1), "x floor": round(seconds / floor, 2),
            "GB read": round(read / 1e9, 2), "GB written": round(written / 1e9, 2),
            "peak RSS GB": round(peak_rss() / 1e9, 3), "RSS before GB": round(base / 1e9, 3)}


# -- (b) one vs two gloo processes ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed_fit(task, train, state, k, store, barrier=lambda: None) -> float:
    """Seconds of a TRAK fit into a new store, after a first (warm-up) fit into another."""
    times = []
    for run in ("warm-up", "timed"):
        barrier()
        t0 = time.perf_counter()
        ak.TRAK(task.make_model(0), task.task, k=k, store=f"{store}-{run}", verbose=False).fit(train, [state])
        times.append(time.perf_counter() - t0)
    return times[-1]


def _fit_rank(rank, world, port, store, k, state, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        task = ak.tasks.get("digits-mlp")
        train, _ = loaders(task)
        fit = _timed_fit(task, train, state, k, store, barrier=dist.barrier)
        payload = [torch.zeros(k, k, dtype=torch.float64), torch.zeros(len(train.dataset), dtype=torch.int64)]
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(5):
            all_reduce_sum(payload, what="benchmark")
        results[rank] = (fit, (time.perf_counter() - t0) / 5)
    finally:
        dist.destroy_process_group()


def fit_rows(k: int) -> list[dict]:
    task = ak.tasks.get("digits-mlp")
    states, _ = checkpoints(task, 1)
    state = states[0]
    train, _ = loaders(task)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fit = _timed_fit(task, train, state, k, str(Path(tmp) / "one"))
        rows.append({"processes": 1, "fit s": round(fit, 2), "all_reduce s": 0.0})
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_fit_rank, args=(2, _free_port(), str(Path(tmp) / "two"), k, state, results), nprocs=2)
            fits, reduces = zip(*dict(results).values())
        rows.append({"processes": 2, "fit s": round(max(fits), 2), "all_reduce s": round(max(reduces), 4)})
    payload = 8 * k * k + 8 * len(train.dataset)
    for r in rows:
        r.update({"n_train": len(train.dataset), "k": k, "payload MB": round(payload / 1e6, 2)})
    return rows


def score_rows_to_results(args, n: int, queries: int, store: Path) -> None:
    """(a): build (or reuse) the store, measure the peaks, score the three rows, write the results."""
    info = provenance()
    info["load average"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    t0 = time.perf_counter()
    features = build_store(store / f"train_{n}x{args.k}.f32", n, args.k)
    info["store build s"] = round(time.perf_counter() - t0, 1)
    peak = matmul_peak_gflops(torch.device("cpu"), n=2048)
    bw = read_bandwidth(features.parts[0].array.path)
    info.update({"torch.mm fp32 GFLOP/s": round(peak, 1), "store read GB/s": round(bw / 1e9, 2)})
    rows = []
    if "full" in args.rows:
        rows.append(score_row(features, n, queries, args.k, peak, bw))
    if "out" in args.rows:
        with tempfile.TemporaryDirectory(dir=store) as tmp:
            rows.append(score_row(features, n, queries // 10, args.k, peak, bw, out=Path(tmp) / "scores.npy"))
    if "rank" in args.rows:
        rows.append(score_row(features, min(n, args.rank_rows // (10 if args.quick else 1)), queries * 5, args.k,
                              peak, bw))
    columns = ["n_train", "n_test", "k", "dtype", "scores", "seconds", "GFLOP/s", "peak GFLOP/s", "floor s",
               "x floor", "GB read", "GB written", "peak RSS GB", "RSS before GB"]
    stem = "scale_score" + ("_quick" if args.quick else "") + ("" if args.rows == ROWS else "_" + "_".join(args.rows))
    write_results(RESULTS / stem, rows, columns, info,
                  "# TRAK scoring from a feature store on disk (benchmarks/scale.py)\n\n"
                  "Synthetic float32 features; scores in float32 tiles (up to 4096 training rows, fewer when a tile would pass "
                  "256 MiB, x all test columns "
                  "that fit 1 GiB of solves); peak RSS is the process high-water mark reset before each row.")
    if not args.keep:
        path = features.parts[0].array.path
        for f in path.parent.glob(path.name + "*"):  # the data, its done-mask and checksums
            f.unlink()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100k rows, 2k queries: a smoke run")
    p.add_argument("--n-train", type=int, default=1_000_000)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--rank-rows", type=int, default=50_000, help="rows of the 50k-query row (one rank's share)")
    p.add_argument("--store", default=str(Path(__file__).resolve().parent.parent / "runs" / "scale"))
    p.add_argument("--keep", action="store_true", help="keep the synthetic store for the next run")
    p.add_argument("--skip-fit", action="store_true")
    p.add_argument("--skip-score", action="store_true")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS,
                   help="scoring rows to run (results of a subset go to scale_score_<rows>.md)")
    args = p.parse_args(argv)
    n, queries = (100_000, 2_000) if args.quick else (args.n_train, args.queries)
    store = Path(args.store)
    need = n * width(args.k, "float32") * 4 + 4 * n * (queries // 10)
    free = shutil.disk_usage(store.parent if store.parent.exists() else Path.cwd()).free
    print(f"disk: the store needs {need / 1e9:.1f} GB (features + the out= row), {free / 1e9:.0f} GB free")
    if need > free - 10e9:
        raise SystemExit("not enough free disk (keeping 10 GB for others)")
    if not args.skip_score:
        score_rows_to_results(args, n, queries, store)
    if not args.skip_fit:
        fit = fit_rows(args.k)
        write_results(RESULTS / ("scale_fit_quick" if args.quick else "scale_fit"), fit,
                      ["processes", "n_train", "k", "fit s", "all_reduce s", "payload MB"], provenance(),
                      "# TRAK fit on digits-mlp: one process vs two gloo processes (benchmarks/scale.py)\n\n"
                      "`all_reduce s`: one all_reduce_sum of TRAK's payload (k x k float64 + n_train int64), "
                      "mean of 5, on the two processes after their fit; each process uses cores / 2 threads; fit times "
                      "are of a second fit (the first one warms up), the slower rank's.")


if __name__ == "__main__":
    main()
