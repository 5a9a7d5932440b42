"""Problems and process helpers of the scale-out tests (importable by spawned processes), and a
subprocess that fits one EK-FAC shard slowly so a test can kill it mid-pass (kill -9).

    python scale_worker.py <store> <index> <count> <pause> <progress file>
"""
import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import attrkernels as ak


class Net(nn.Module):
    """An Embedding (diagonal activation factor) and two Linear layers: tokens [B, 3] -> 3 classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 4)
        self.hidden = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        return self.head(self.hidden(self.emb(tokens).mean(1)).tanh())


def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def mlp_loaders(n: int, batch_size: int = 4, n_test: int = 5, nan_at=None):
    """Float inputs [n, 5] with 3 classes, and 5 test examples; ``nan_at``: a training example
    whose inputs are NaN."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n + n_test, 5, generator=g)
    if nan_at is not None:
        x[nan_at] = float("nan")
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return (DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch_size),
            DataLoader(TensorDataset(x[n:], y[n:]), batch_size=batch_size))


def data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (n, 3), generator=g)
    return TensorDataset(tokens, (tokens[:, 0] % 3).long())


def loaders(n: int, seed: int = 0, batch_size: int = 4, n_test: int = 5):
    return (DataLoader(data(n, seed), batch_size=batch_size),
            DataLoader(data(n_test, 99), batch_size=batch_size))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world: int, *args) -> dict:
    """Run ``worker(rank, world, port, *args, results)`` in ``world`` processes (a free port for
    their gloo group); returns ``results`` (a dict the workers fill, e.g. by rank)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(world, free_port(), *args, results), nprocs=world, join=True)
        return dict(results)


def init(rank: int, world: int, port: int) -> None:
    """A gloo group whose collectives time out after 5 minutes (a rank left waiting fails the test)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))


def failure(fn) -> str:
    """The error ``fn()`` raises, as "<type>: <message>" (for a test to compare across ranks)."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001
        kind = "ExampleError" if isinstance(err, ak.utils.errors.ExampleError) else type(err).__name__
        return f"{kind}: {err}"
    return "no error"


def factor_tensors(method) -> dict:
    """Every factor of the first checkpoint as float64 CPU tensors, keyed layer/name."""
    out = {}
    for name, f in method.factors[0].items():
        out[f"{name}/A"], out[f"{name}/S"] = f.A.double(), f.S.double()
        out[f"{name}/eig_a"], out[f"{name}/eig_s"] = f.eig_a.double(), f.eig_s.double()
        out[f"{name}/Q_a"], out[f"{name}/Q_s"] = f.basis_a.dense(), f.basis_s.dense()
        if f.lam is not None:
            out[f"{name}/lam"] = f.lam.double()
    return {k: v.clone() for k, v in out.items()}


class SlowData(Dataset):
    """``data(n)`` with a pause per example, counting the examples read into ``progress``."""

    def __init__(self, n, pause, progress):
        self.data, self.pause, self.progress, self.read = data(n), pause, progress, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        time.sleep(self.pause)
        self.read += 1
        with open(self.progress, "w") as f:
            f.write(str(self.read))
        return self.data[i]


if __name__ == "__main__":
    store, index, count, pause, progress = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), \
        sys.argv[5]
    torch.set_num_threads(1)
    train = DataLoader(SlowData(40, pause, progress), batch_size=4)
    ak.EKFAC(Net(), ak.tasks.Classification(), store=store, verbose=False).fit(train, shard=(index, count))
