"""The main job: the LDS-vs-cost frontier of every method, ours and the peers', on one task.

    python -m benchmarks.frontier --quick     # digits, quick protocol: under 10 minutes on 2 cores
    python -m benchmarks.frontier             # digits, default protocol, every configuration

Our configurations are those of ``attrkernels.frontier``; this adds the peers that are installed
(same checkpoints, same ground truth, cost measured the same way): traker's TRAK, kronfluence's
EK-FAC and dattri's IF-CG. Writes benchmarks/results/<task>/frontier.csv and frontier.png
(<task>-quick/ with --quick).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

from attrkernels.frontier import Config, run_frontier

from .common import RESULTS


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def peer_configs(quick: bool) -> list:
    out = []
    if _installed("trak"):
        from .trak import traker

        def run_traker(k):
            return lambda ctx, ckpts, rates: traker(ctx.task, ckpts, ctx.train, ctx.test, k)[0]

        for M in ((1, 5) if quick else (1, 5, 10)):
            out.append(Config("traker (peer)", f"traker TRAK k=512 M={M}", ("models", M),
                              run_traker(512), {"k": 512, "M": M}))
    if _installed("kronfluence"):
        from .ekfac import kronfluence_scores

        out.append(Config("kronfluence (peer)", "kronfluence EK-FAC M=1", ("models", 1),
                          lambda ctx, ckpts, rates: kronfluence_scores(ctx, ckpts), {"M": 1}))
    if _installed("dattri") and not quick:
        from .influence import dattri_ifcg_scores

        out.append(Config("dattri (peer)", "dattri IF-CG M=1", ("models", 1),
                          lambda ctx, ckpts, rates: dattri_ifcg_scores(ctx, ckpts), {"M": 1}))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="digits-mlp")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated substrings of labels to run")
    parser.add_argument("--runs", default="runs")
    args = parser.parse_args(argv)
    peers = [] if args.no_peers else peer_configs(args.quick)
    out = RESULTS / (args.task + ("-quick" if args.quick else ""))
    rows = run_frontier(args.task, quick=args.quick, out=out, runs=args.runs,
                        extra_configs=peers, only=args.only.split(",") if args.only else None)
    print(f"{len(rows)} configurations -> {out}/frontier.csv, frontier.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
