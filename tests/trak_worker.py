"""Subprocess of test_trak.py: fits TRAK slowly so the parent can kill it mid-fit (kill -9)."""
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import attrkernels as ak


def kill_mid_run(argv: list, env: dict, mask, low: int, high: int, timeout: float):
    """Start ``python argv``, SIGKILL it once the done-mask file ``mask`` marks between ``low``
    (inclusive) and ``high`` (exclusive) chunks, and return that mask as it was left."""
    import signal
    import subprocess

    import numpy as np

    proc = subprocess.Popen([sys.executable, *argv], env=env)
    deadline = time.time() + timeout
    while time.time() < deadline and not (mask.exists() and low <= np.load(mask).sum() < high):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return np.load(mask)


def data(other=False):
    """96 examples; ``other``: the same inputs with the labels of the second half flipped."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long()
    if other:
        y[48:] = 1 - y[48:]
    return x, y


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


class SlowLoader:
    """Batches of 8 in order, with a pause before each (long enough to be killed in between)."""

    def __init__(self, pause, other=False):
        self.loader = DataLoader(TensorDataset(*data(other)), batch_size=8)
        self.batch_size, self.dataset, self.pause = 8, self.loader.dataset, pause

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.pause)
            yield batch


if __name__ == "__main__":
    store, ckpt, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    other = len(sys.argv) > 4 and sys.argv[4] == "other"
    m = model()
    ak.TRAK(m, ak.tasks.Classification(), k=40, store=store, verbose=False).fit(SlowLoader(pause, other), [ckpt])
