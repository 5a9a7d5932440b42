"""EK-FAC / K-FAC fit in one process vs two gloo processes on this machine: wall time, CPU time,
and the time and bytes of the collectives (issue 14, ``benchmarks/scale.py`` part (b)).

The digits-mlp model (``tasks.get("digits-mlp")``, seed-0 initialisation: the fit's cost does not
depend on training), its 1,000 training examples in batches of ``--batch``, the true Fisher. One
process fits ``--reps`` times; two processes (spawned here, gloo, one torch thread each) fit
``--reps`` times each after a barrier, rank 0 timing each fit. Time in collectives is the wall
time spent inside ``torch.distributed.all_reduce`` / ``barrier`` on rank 0, which includes
waiting for the slower rank (load imbalance and the other processes of this shared machine), so
it bounds the communication cost from above; bytes are those rank 0 hands to all_reduce.

    python -m benchmarks.ekfac_shards [--reps 3] [--batch 100] [--strategy ekfac]

Prints one line per configuration (medians over the reps) and the load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attrkernels as ak


def _setup(batch):
    bench = ak.tasks.get("digits-mlp")
    train, _ = bench.loaders(batch_size=batch)
    return bench.make_model(0), bench.task, train


def _fit(strategy, model, task, train):
    cls = {"ekfac": ak.EKFAC, "kfac": ak.KFAC}[strategy]
    wall, cpu = time.perf_counter(), time.process_time()
    cls(model, task, verbose=False).fit(train)
    return time.perf_counter() - wall, time.process_time() - cpu


class _Timed:
    """Wraps torch.distributed.all_reduce and barrier, adding up their wall time and bytes."""

    def __init__(self):
        self.seconds, self.bytes, self.calls = 0.0, 0, 0
        for name in ("all_reduce", "barrier"):
            setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
                if args and torch.is_tensor(args[0]):
                    self.bytes += args[0].numel() * args[0].element_size()
        return timed


def _worker(rank, world, port, strategy, batch, reps, results):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, task, train = _setup(batch)
        timed = _Timed()
        runs = []
        for _ in range(reps):
            dist.barrier()
            before = (timed.seconds, timed.bytes, timed.calls)
            wall, cpu = _fit(strategy, model, task, train)
            runs.append((wall, cpu, timed.seconds - before[0], timed.bytes - before[1], timed.calls - before[2]))
        results[rank] = runs
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--strategy", choices=("ekfac", "kfac"), default="ekfac")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, task, train = _setup(args.batch)
    _fit(args.strategy, model, task, train)  # warm-up (imports, first-call costs)
    one = [_fit(args.strategy, model, task, train) for _ in range(args.reps)]
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, port, args.strategy, args.batch, args.reps + 1, results), nprocs=2)
        two = list(results[0])[1:]  # the first run warms up
    med = statistics.median
    print(f"{args.strategy} fit, digits-mlp (1000 train, batch {args.batch}), 1 torch thread per process, "
          f"median of {args.reps}; load average {os.getloadavg()[0]:.1f}")
    print(f"  1 process : wall {med(r[0] for r in one):.3f} s, cpu {med(r[1] for r in one):.3f} s")
    print(f"  2 gloo    : wall {med(r[0] for r in two):.3f} s, cpu (rank 0) {med(r[1] for r in two):.3f} s, "
          f"collectives {med(r[2] for r in two):.3f} s in {two[0][4]} calls, {two[0][3] / 1e6:.2f} MB all-reduced "
          "by rank 0")


if __name__ == "__main__":
    main()
