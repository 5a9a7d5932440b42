"""Step ``frontier`` of the GPU check: the digits LDS-vs-cost frontier with the methods on the GPU.

``benchmarks.frontier_configs``' quick configurations (ours) on ``digits-mlp`` (quick protocol: 100 subsets x
4 seeds of ground truth, trained on the CPU cores), with the model and the data loaders on the
GPU: each method's fit + score (``method_s``) runs there; ``train_s`` is still the checkpoints'
training on the CPU, as in the CPU frontier, so the two frontiers differ only in method time.
Datamodels is left out (its cost is retraining on the CPU; nothing of it runs on the GPU).
Before the first configuration, one sketch per backend warms up CUDA, CuPy and Triton
(compilation and the self-check are not charged to the first method); each method's own
first-use costs (cuBLAS / cuSOLVER handles) are in its time.

    python -m benchmarks.gpu.frontier --out DIR [--device cuda] [--smoke]

Writes frontier.csv and frontier.png (and frontier.md, the table); caches ground truth and
checkpoints under runs/gpu-check/ (a temporary folder with --smoke).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import attrkernels as ak
from attrkernels import tasks
from attrkernels.eval import frontier as fr
from attrkernels.eval.report import plot, write_csv

from ..frontier_configs import ours

from .common import parse, time_left, write_table

SMOKE_PROTOCOL = {"m": 6, "r": 1, "alpha": 0.5}


class DeviceContext(fr.Context):
    """The frontier's context with the model and the training / test data on ``device``."""

    def __init__(self, task, runs, protocol, device, **kw):
        super().__init__(task, runs, protocol, **kw)
        self.device = device
        self.train = self._loader(task.train_data(), self.train.batch_size)
        self.test = self._loader(task.test_data(), self.test.batch_size)

    def _loader(self, dataset, batch_size):
        return DataLoader(TensorDataset(*(t.to(self.device) for t in dataset.tensors)),
                          batch_size=batch_size, shuffle=False)

    def model(self):
        return super().model().to(self.device)


def scores_on_cpu(run):
    """The frontier measures LDS on the CPU: bring the scores back (this synchronises the GPU,
    so the method's wall time includes all its device work)."""
    return lambda ctx, ckpts, rates: run(ctx, ckpts, rates).float().cpu()


def gpu_configs(smoke: bool) -> list:
    chosen = [c for c in ours(quick=True) if c.family != "Datamodels"]
    if smoke:
        chosen = [c for c in chosen if c.label in ("TRAK k=128 M=1", "EK-FAC M=1")]
    return [fr.Config(c.family, c.label, c.needs, scores_on_cpu(c.run), dict(c.settings, device="gpu"))
            for c in chosen]


def warm_up(device):
    x = torch.randn(4, 1000, device=device)
    for backend in (("cuda", "triton") if device == "cuda" else ("cpu",)):
        try:
            ak.sketch(x, 128, backend=backend)
        except Exception as err:  # noqa: BLE001  (the reference step reports backends; go on)
            print(f"warm-up of {backend}: {type(err).__name__}: {err}", flush=True)
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    args = parse(__doc__)
    dev = args.device
    task = tasks.get("digits-mlp")
    if args.smoke:
        runs = Path(tempfile.mkdtemp(prefix="gpu-check-frontier-"))
        task.lds_protocols = dict(task.lds_protocols, smoke=SMOKE_PROTOCOL)
        protocol = "smoke"
    else:
        runs, protocol = Path("runs") / "gpu-check", "quick"
    t0 = time.perf_counter()
    try:
        if args.smoke:  # 6 models: in this process (worker processes would take longer to start)
            from attrkernels.eval import build_ground_truth

            build_ground_truth(task, runs / "gt" / f"{task.name}-{protocol}", protocol, workers=1, verbose=False)
        ctx = DeviceContext(task, runs, protocol, dev, verbose=False)
        gt_s = time.perf_counter() - t0
        print(f"ground truth ({protocol}): {gt_s:.1f} s", flush=True)
        warm_up(dev)
        results = runs / "frontier" / f"{task.name}-{protocol}-{dev}"
        results.mkdir(parents=True, exist_ok=True)
        rows, failed, stopped = [], [], ""
        card = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
        for config in gpu_configs(args.smoke):
            if time_left() < 15:
                stopped = f"stopped before {config.label}: {time_left():.0f} s left of the step's time"
                break
            try:
                row = fr.evaluate(config, ctx, results)
            except Exception as err:  # noqa: BLE001  (one failing method must not lose the others)
                failed.append(f"{config.label}: {type(err).__name__}: {err}"[:300])
                print(f"FAILED {failed[-1]}", flush=True)
                continue
            rows.append(row)
            print(f"{row['label']:<24} LDS {row['lds']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]  "
                  f"method {row['method_s']:.2f} s on {dev}, train {row['train_s']:.1f} s (CPU)", flush=True)
            write_csv(rows, args.out / "frontier.csv",
                         {"task": task.name, "protocol": protocol, "machine": card,
                          "note": "method_s on the GPU, train_s on the CPU"})
        if rows and time_left() > 5:
            plot(rows, args.out / "frontier.png",
                    f"{task.name} ({protocol} protocol): LDS vs cost, methods on {card}")
        table = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
        table += [{"label": f, "family": "FAILED"} for f in failed]
        write_table(args.out, "frontier", table,
                    ["family", "label", "lds", "ci_low", "ci_high", "method_s", "train_s", "cost_s"],
                    f"Digits frontier ({protocol} protocol{', smoke' if args.smoke else ''}), methods on {card}: "
                    f"`method_s` fit + score on {dev}, `train_s` checkpoint training on the CPU; ground truth "
                    f"{gt_s:.0f} s. {stopped}", {"device": dev, "protocol": protocol})
    finally:
        if args.smoke:
            shutil.rmtree(runs, ignore_errors=True)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
