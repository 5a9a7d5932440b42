"""First LDS numbers on the text-lm benchmark (byte-level GPT-2 fine-tuned on Python's help
texts), quick protocol: TRAK, EK-FAC and K-FAC on the full-data fine-tuned models, raw and
centred LDS (``lds(..., centre=True)``), method wall time. No peer yet (kronfluence needs the
Conv1D -> Linear copy; see issue 13), so the times are for reading, not a comparison.

    python -m benchmarks.text_lm [--runs runs]

Builds (or reuses) the quick ground truth under <runs>/gt/text-lm-quick (about 5 minutes on 2
cores) and writes benchmarks/results/text_lm_quick.csv and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import attrkernels as ak
from attrkernels.eval import build_ground_truth

from .common import RESULTS, provenance, write_results


def conv1d_params(model) -> list:
    return [f"{n}.{p}" for n, m in model.named_modules() if type(m).__name__ == "Conv1D" for p in ("weight", "bias")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs")
    args = parser.parse_args(argv)
    bench = ak.tasks.get("text-lm")
    gt = build_ground_truth(bench, Path(args.runs) / "gt" / "text-lm-quick", "quick")
    train, test = bench.loaders(batch_size=50)
    models = [bench.train(None, seed=s)[0] for s in range(3)]
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    layers = conv1d_params(models[0])
    configs = [
        ("TRAK k=512 M=1 (all parameters)", lambda: ak.TRAK(models[0], bench.task, k=512, verbose=False).fit(train)),
        ("TRAK k=512 M=3 (all parameters)",
         lambda: ak.TRAK(models[0], bench.task, k=512, verbose=False).fit(train, states)),
        ("TRAK k=512 M=1 (Conv1D layers)",
         lambda: ak.TRAK(models[0], bench.task, k=512, params=layers, verbose=False).fit(train)),
        ("EK-FAC M=1 (Conv1D layers)", lambda: ak.EKFAC(models[0], bench.task, params=layers, verbose=False).fit(train)),
        ("K-FAC M=1 (Conv1D layers)", lambda: ak.KFAC(models[0], bench.task, params=layers, verbose=False).fit(train)),
    ]
    rows = []
    for label, fit in configs:
        t0 = time.perf_counter()
        scores = fit().score(test)
        seconds = time.perf_counter() - t0
        raw, centred = ak.lds(scores, gt.masks, gt.outputs), ak.lds(scores, gt.masks, gt.outputs, centre=True)
        rows.append({"method": label, "lds": f"{raw.mean:.3f}", "ci": f"[{raw.ci_low:.3f}, {raw.ci_high:.3f}]",
                     "lds_centred": f"{centred.mean:.3f}", "method_s": f"{seconds:.1f}"})
        print(rows[-1], flush=True)
    write_results(RESULTS / "text_lm_quick", rows, ["method", "lds", "ci", "lds_centred", "method_s"], provenance(),
                  f"text-lm, quick ground truth ({gt.masks.shape[0]} subsets x {gt.outputs.shape[1]} seeds); "
                  "method_s = fit + score wall seconds on this machine (no peer in this table).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
