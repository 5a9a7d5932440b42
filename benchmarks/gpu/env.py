"""Step ``env`` of the GPU check: the machine and the software the results were measured with.

Writes env.json (and env.txt: the raw nvidia-smi and nvcc output): card, driver, memory, compute
capability, CUDA (torch's, nvcc's, CuPy's runtime and driver), versions of python, torch, triton,
cupy, numpy, transformers and the peers, the interpreter, date, commit and a fingerprint of the
sources.

The device machine gets a copy of the working tree without ``.git``: the commit comes from
``git`` when there is one, else from ``GPU_CHECK_COMMIT`` (set it in the command that starts the
check). The fingerprint (SHA-256 of the sources, ``python -m benchmarks.gpu.env --fingerprint``
prints the local one) says whether a result was measured on the code of a given checkout.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_GLOBS = ("attrkernels/**/*.py", "csrc/**/*.cu", "csrc/**/*.cuh", "csrc/**/*.cpp", "csrc/**/*.hpp",
                "csrc/**/*.inc", "benchmarks/**/*.py", "benchmarks/*.sh", "tests/*.py", "setup.py",
                "pyproject.toml")


def fingerprint(root: Path = ROOT) -> str:
    """SHA-256 (first 16 hex digits) over the paths and contents of the sources."""
    h = hashlib.sha256()
    files = sorted({p for g in SOURCE_GLOBS for p in root.glob(g) if p.is_file()})
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def run(cmd: list[str], timeout: float = 20) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable ({type(err).__name__})"
    return (r.stdout + r.stderr).strip()


def commit() -> str:
    out = run(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    if len(out) == 40 and all(c in "0123456789abcdef" for c in out):
        dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
        return out + ("+dirty" if dirty else "")
    given = os.environ.get("GPU_CHECK_COMMIT", "").strip()
    return f"{given} (GPU_CHECK_COMMIT; no .git here)" if given else "unknown (no .git; set GPU_CHECK_COMMIT)"


def version(dist: str) -> str:
    """Installed version of a distribution, without importing it (some peers import slowly)."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version(dist)
    except PackageNotFoundError:
        return "absent"


def collect() -> tuple[dict, str]:
    """(the facts, the raw text of nvidia-smi and nvcc)."""
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "source_fingerprint": fingerprint(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
    }
    cupy = [d for d in ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy") if version(d) != "absent"]
    info["cupy"] = ", ".join(f"{d} {version(d)}" for d in cupy) or "absent"  # two at once: a broken install
    for name in ("triton", "numpy", "scipy", "transformers", "traker", "dattri", "kronfluence", "scikit-learn",
                 "pybind11", "setuptools", "pip"):
        info[name] = version(name)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(card=props.name, card_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, gpus=torch.cuda.device_count())
    else:
        info.update(card="none visible to torch")
    smi = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
               "power.limit,pstate", "--format=csv,noheader"])
    info["nvidia_smi"] = smi.splitlines()[0] if smi else ""
    parts = [s.strip() for s in info["nvidia_smi"].split(",")]
    info["driver"] = parts[1] if len(parts) > 1 and not smi.startswith("unavailable") else "unknown"
    nvcc = run(["nvcc", "--version"])
    info["nvcc"] = next((ln.strip() for ln in nvcc.splitlines() if "release" in ln), nvcc[:80])
    try:
        import cupy

        rt, drv = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
        info["cupy_cuda_runtime"] = f"{rt // 1000}.{rt % 1000 // 10}"
        info["cuda_driver_api"] = f"{drv // 1000}.{drv % 1000 // 10}"
    except Exception as err:  # noqa: BLE001  (no CuPy or no GPU: say so)
        info["cupy_cuda_runtime"] = f"unavailable ({type(err).__name__})"
    return info, smi + "\n\n" + run(["nvidia-smi"]) + "\n\n" + nvcc + "\n"


def main() -> int:
    if sys.argv[1:] == ["--fingerprint"]:
        print(fingerprint())
        return 0
    from .common import parse

    args = parse(__doc__)
    info, raw = collect()
    (args.out / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    (args.out / "env.txt").write_text(raw)
    for k, v in info.items():
        print(f"{k:<20} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
