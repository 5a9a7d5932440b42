"""Command line: ``attrkernels <command>`` (also ``python -m attrkernels``).

``info``: versions, usable backends, GPU and CPU features. The LDS-vs-cost frontier (the main
job) runs from the source tree with ``python -m benchmarks.frontier``: its configurations and
peers live in ``benchmarks/``; the runner is ``attrkernels.eval.frontier.run_frontier``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys

from .provenance import cpu_name


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as err:  # noqa: BLE001  (report any import failure as absent)
        return f"not usable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def info(_args=None) -> int:
    """Print versions, usable backends, GPU and CPU features."""
    import torch

    from . import __version__, backends

    print(f"attrkernels {__version__}")
    print(f"python      {platform.python_version()} ({sys.executable})")
    for name in ("torch", "numpy", "scipy", "triton", "cupy"):
        print(f"{name:<11} {_version(name)}")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    print(f"GPU         {', '.join(gpus) if gpus else 'none visible to torch'}")
    print("backends:")
    for name, (ok, text) in backends.status().items():
        print(f"  {name:<7} {'yes' if ok else 'no '}  {text}")
    print(f"CPU         {cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    try:
        from . import _C

        feats = [k for k, v in sorted(_C.cpu_features().items()) if v]
        print(f"CPU features {' '.join(feats) if feats else '(not detected on this architecture)'}")
        print(f"kernel ISA  {_C.isa('')} (usable builds: {', '.join(_C.usable_isas())}; "
              f"override with ATTRKERNELS_ISA)")
    except ImportError as err:
        print(f"C++ extension not loaded: {err}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="attrkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, usable backends, GPU, CPU features").set_defaults(func=info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
