"""The main job: the LDS-vs-cost frontier of every method, ours and the peers', on one benchmark.

    python -m benchmarks.frontier --quick     # digits, quick protocol: under 10 minutes on 2 cores
    python -m benchmarks.frontier             # digits, default protocol, every configuration
    python -m benchmarks.frontier --task mnist1d-cnn --protocol medium --only SOURCE,EK-FAC

The configurations are those of ``benchmarks.frontier_configs``: ours and the installed peers
(traker's TRAK, kronfluence's EK-FAC, dattri's IF-CG) on the same checkpoints and ground truth,
cost measured the same way; the runner is ``attrkernels.eval.frontier``. Writes
frontier.csv and frontier.png to --out (default benchmarks/results/<task>/, or
<task>-<protocol>/ for another protocol than the default, e.g. <task>-quick/ with --quick), only when at least one configuration finished. Caches (ground truth, checkpoints,
finished configurations) live under --runs.

Arguments are checked before any work: an unknown --task, an --only that matches no label or an
--out / --runs that cannot be written stop with a message (exit status 2). Exit status 1 when a
configuration failed (the others are still written) or none finished.
"""
from __future__ import annotations

import argparse
import sys

from attrkernels.eval.frontier import FrontierArgumentError, resolve_benchmark, run_frontier

from .common import RESULTS
from .frontier_configs import ours, peers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frontier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="digits-mlp", help="a registered benchmark (attrkernels.tasks.available())")
    parser.add_argument("--quick", action="store_true", help="quick protocol and the cheap configurations")
    parser.add_argument("--protocol", default=None,
                        help="ground-truth protocol, a name in the task's lds_protocols (default: quick with "
                             "--quick, else default)")
    parser.add_argument("--no-peers", action="store_true", help="our methods only")
    parser.add_argument("--only", default=None, help="comma-separated substrings of labels to run")
    parser.add_argument("--out", default=None,
                        help="output folder (default benchmarks/results/<task>, or <task>-quick with --quick)")
    parser.add_argument("--runs", default="runs", help="cache folder (ground truth, checkpoints, results)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes training the ground truth (default: one per core)")
    args = parser.parse_args(argv)
    try:
        benchmark = resolve_benchmark(args.task)
    except FrontierArgumentError as err:
        parser.error(f"--task: {err}")
    configs = ours(args.quick) + ([] if args.no_peers else peers(args.quick))
    protocol = args.protocol or ("quick" if args.quick else "default")
    out = args.out if args.out is not None else RESULTS / (args.task + ("" if protocol == "default" else f"-{protocol}"))
    try:
        rows, failed = run_frontier(benchmark, configs, out=out, runs=args.runs,
                                    protocol=protocol,
                                    only=args.only.split(",") if args.only is not None else None,
                                    workers=args.workers)
    except FrontierArgumentError as err:
        parser.error(str(err))
    if rows:
        print(f"{len(rows)} configurations -> {out}/frontier.csv, frontier.png")
    if failed:
        print(f"{len(failed)} configuration(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 0 if rows and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
