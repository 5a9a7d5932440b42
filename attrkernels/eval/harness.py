"""The retraining harness: train r models on each of m subsets and record their measurements.

``build_ground_truth(benchmark, directory, protocol)`` trains, for every subset j and run k of
the protocol that has no stored output yet, ``benchmark.train(indices_j, model_seed(seed, j, k))``
and stores ``benchmark.task.measure`` of the trained model on every test example (float64 [n_test]) in
``directory`` (see ``store``). Models train in ``workers`` processes (default: one per
available core), each limited to one torch thread, so the result does not depend on the number
of workers. Each worker writes its model's output atomically as soon as the model is trained:
after ``kill -9`` a rerun trains only the models whose output is missing.

With the ``spawn`` start method (the default: safe with threads and CUDA) the benchmark is
pickled to the workers and a benchmark class defined in a script must be importable, i.e. the script's work
must sit under ``if __name__ == "__main__":``. ``workers=1`` trains in the calling process.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .store import GroundTruth, make_meta, open_store, output_path, save_output
from .subsets import model_seed, resolve_protocol, sample_masks


def _batches(dataset, batch_size: int):
    """Batches (tuples of tensors) of ``dataset`` in order."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        for start in range(0, len(dataset), batch_size):
            yield tuple(t[start:start + batch_size] for t in tensors)
    else:
        yield from torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def measure_dataset(task, model: torch.nn.Module, dataset, batch_size: int = 1024) -> np.ndarray:
    """``task.measure`` of ``model`` (in eval mode, no grad) on every example of ``dataset``, float64 [N].

    Raises ValueError naming the task if ``measure`` does not return one finite value per example.
    """
    model.eval()
    device = next(model.parameters()).device
    values = []
    with torch.no_grad():
        for batch in _batches(dataset, batch_size):
            batch = tuple(t.to(device) for t in batch)
            size = int(batch[0].shape[0])
            out = task.measure(model, batch)
            if not torch.is_tensor(out) or tuple(out.shape) != (size,):
                got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
                raise ValueError(f"{type(task).__name__}.measure must return one value per example, "
                                 f"shape [{size}] for this batch of {size}; it returned {got}")
            values.append(out.detach().to("cpu", torch.float64).numpy())
    result = np.concatenate(values) if values else np.zeros(0)
    if not np.isfinite(result).all():
        raise ValueError(f"{type(task).__name__}.measure returned non-finite values for "
                         f"{int((~np.isfinite(result)).sum())} examples (did training diverge?)")
    return result


def check_benchmark(benchmark, batch_size: int = 8) -> tuple[int, int]:
    """(n_train, n_test) of a Benchmark after checking its data and measurement on an untrained model."""
    for attr in ("train", "train_data", "test_data", "make_model", "config", "task"):
        if not hasattr(benchmark, attr):
            raise TypeError(f"benchmark must follow the Benchmark protocol (attrkernels.tasks.Benchmark); "
                            f"{type(benchmark).__name__} has no {attr!r}")
    n_train, n_test = len(benchmark.train_data()), len(benchmark.test_data())
    if n_train < 2 or n_test < 1:
        raise ValueError(f"benchmark {benchmark.name!r} needs >= 2 training and >= 1 test examples, "
                         f"got {n_train} and {n_test}")
    sample = torch.utils.data.Subset(benchmark.test_data(), range(min(batch_size, n_test)))
    measure_dataset(benchmark.task, benchmark.make_model(0), sample, batch_size)
    return n_train, n_test


@contextmanager
def _torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Trainer:
    """Trains one (subset, run) model and stores its test measurements."""

    def __init__(self, benchmark, directory: str, batch_size: int):
        self.benchmark, self.directory, self.batch_size = benchmark, Path(directory), batch_size
        self.test = benchmark.test_data()

    def __call__(self, job) -> tuple[int, int]:
        subset, run, seed, indices = job
        start = time.perf_counter()
        model, _ = self.benchmark.train(indices, seed)
        seconds = time.perf_counter() - start
        try:
            values = measure_dataset(self.benchmark.task, model, self.test, self.batch_size)
        except ValueError as e:
            raise ValueError(f"subset {subset}, run {run} (seed {seed}): {e}") from None
        save_output(self.directory, subset, run, values, seconds)
        return subset, run


_WORKER: Optional[_Trainer] = None


def _init_worker(benchmark, directory: str, batch_size: int) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = _Trainer(benchmark, directory, batch_size)


def _run_job(job) -> tuple[int, int]:
    return _WORKER(job)


def default_workers() -> int:
    """Number of cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_ground_truth(benchmark, directory, protocol="default", *, workers: Optional[int] = None,
                       start_method: str = "spawn", batch_size: int = 1024,
                       verbose: bool = True) -> GroundTruth:
    """Train the missing models of ``protocol`` for ``benchmark`` and return the stored ``GroundTruth``.

    ``benchmark``: a ``tasks.Benchmark``; ``directory``: the ground-truth directory (created, or
    resumed if it holds a ground truth of the same benchmark config and protocol;
    ``GroundTruthMismatch`` otherwise); ``protocol``: a name in ``benchmark.lds_protocols`` ("default", "quick"), a dict or a
    ``Protocol``; ``workers``: processes (default: all available cores; 1 = in this process);
    ``start_method``: multiprocessing start method; ``batch_size``: test batch size when measuring.
    """
    protocol = resolve_protocol(benchmark, protocol)
    n_train, n_test = check_benchmark(benchmark)
    masks = sample_masks(n_train, protocol.m, protocol.alpha, protocol.seed)
    directory = open_store(directory, make_meta(benchmark, protocol, n_train, n_test), masks)
    jobs = [(j, k, model_seed(protocol.seed, j, k), np.flatnonzero(masks[j]))
            for j in range(protocol.m) for k in range(protocol.r)
            if not output_path(directory, j, k).exists()]
    total = protocol.m * protocol.r
    workers = min(default_workers() if workers is None else workers, max(len(jobs), 1))
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    bar = tqdm(total=total, initial=total - len(jobs), unit="model", disable=not verbose,
               desc=f"ground truth {getattr(benchmark, 'name', '')}".rstrip())
    try:
        if jobs and workers == 1:
            with _torch_threads(1):
                trainer = _Trainer(benchmark, str(directory), batch_size)
                for job in jobs:
                    trainer(job)
                    bar.update()
        elif jobs:
            _run_pool(benchmark, directory, jobs, workers, start_method, batch_size, bar)
    finally:
        bar.close()
    return GroundTruth.load(directory)


def _run_pool(benchmark, directory, jobs, workers, start_method, batch_size, bar) -> None:
    context = multiprocessing.get_context(start_method)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                             initargs=(benchmark, str(directory), batch_size)) as pool:
        pending = {pool.submit(_run_job, job) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()
                    bar.update()
        except BrokenProcessPool as e:
            raise RuntimeError(
                f"a ground-truth worker process died (out of memory, killed, or unable to load the "
                f"benchmark). With start_method={start_method!r} the benchmark is pickled to fresh "
                f"processes: its class must be importable from a module (not defined in a notebook or an "
                f"unguarded __main__ script). Finished models are saved; rerun to resume, or use "
                f"workers=1 to train in this process."
            ) from e
        except BaseException:
            for future in pending:
                future.cancel()
            raise
