"""Kernel backends: which implementations exist, which devices they serve, which one runs.

A backend ("cpu", "triton", "cuda", "torch") declares the torch device types it serves and how
to tell whether it can load here. Each op (e.g. "sketch") registers the function implementing it
per backend; a backend may implement only some ops, the others fall back to "torch".

* ``backend="auto"`` tries the backends in ``AUTO_ORDER`` for the tensor's device and quietly
  takes the first that loads and serves it.
* A backend asked for by name that cannot load raises ``BackendUnavailable`` carrying the
  underlying error; one that does not serve the tensor's device raises ``ValueError``.
* On a GPU, the first use of each (op, backend, device, variant) runs the op's self-check against
  the reference and raises ``KernelSelfCheckError`` if they disagree.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run here; the message says why."""


class KernelSelfCheckError(RuntimeError):
    """A GPU kernel disagreed with the reference implementation on its first use."""


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    devices: Callable[[], tuple]  # torch device types served (may depend on the environment)
    probe: Callable[[], str]  # returns a short description of what loaded; raises if unusable


def _probe_cpu() -> str:
    from . import _C  # noqa: F401  (the C++ extension)

    return (f"attrkernels._C, instruction set {_C.isa('')}, sketch variant {_C.sketch_variant()} "
            f"({_C.cpu_vendor()}), OpenMP {'on' if _C.openmp() else 'off'}")


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_triton() -> str:
    import triton

    if _triton_interpreted():
        return f"triton {triton.__version__} (interpreter, TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        raise RuntimeError("triton needs a CUDA GPU (or TRITON_INTERPRET=1 to run on the CPU)")
    return f"triton {triton.__version__}"


def _probe_cuda() -> str:
    import cupy

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU visible to torch")
    n = cupy.cuda.runtime.getDeviceCount()
    if n < 1:
        raise RuntimeError("CuPy sees no CUDA device")
    return f"cupy {cupy.__version__}"


def _probe_torch() -> str:
    return f"torch {torch.__version__}"


BACKENDS = {
    "cpu": Backend("cpu", "C++ kernels (OpenMP, run-time SIMD dispatch)", lambda: ("cpu",), _probe_cpu),
    "triton": Backend(
        "triton",
        "Triton kernels",
        lambda: ("cuda", "cpu") if _triton_interpreted() else ("cuda",),
        _probe_triton,
    ),
    "cuda": Backend("cuda", "CUDA kernels compiled at run time through CuPy", lambda: ("cuda",), _probe_cuda),
    "torch": Backend("torch", "plain torch reference", lambda: ("cpu", "cuda", "mps", "xpu"), _probe_torch),
}

# Preference of "auto" per device type (fastest first).
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}

_OPS: dict[str, dict[str, str]] = {}
_SELF_CHECKS: dict[str, Callable] = {}
_probe_cache: dict[str, object] = {}
_checked: set = set()


def register(op: str, backend: str, target: str) -> None:
    """Declare that ``backend`` implements ``op`` by ``"module:function"`` (imported lazily)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _OPS.setdefault(op, {})[backend] = target


def register_self_check(op: str, check: Callable) -> None:
    """``check(fn, device, variant)`` raises if ``fn`` disagrees with the reference."""
    _SELF_CHECKS[op] = check


def probe(name: str) -> str:
    """What backend ``name`` loads here; raises ``BackendUnavailable`` with the reason."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + tuple(BACKENDS)}, got {name!r}")
    if name not in _probe_cache:
        try:
            _probe_cache[name] = BACKENDS[name].probe()
        except Exception as err:  # noqa: BLE001  (any import or driver failure means unusable)
            _probe_cache[name] = BackendUnavailable(f"backend {name!r} is unavailable: {err}")
            _probe_cache[name].__cause__ = err
    result = _probe_cache[name]
    if isinstance(result, BackendUnavailable):
        raise result
    return result


def status() -> dict:
    """{backend: (usable, description or reason)} for ``attrkernels info``."""
    out = {}
    for name in BACKENDS:
        try:
            out[name] = (True, probe(name))
        except BackendUnavailable as err:
            out[name] = (False, str(err.__cause__ or err))
    return out


def _load(target: str) -> Callable:
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def resolve(op: str, backend: str, device: torch.device, variant=()) -> tuple[str, Callable]:
    """The (backend name, function) that runs ``op`` for tensors on ``device``."""
    impls = _OPS.get(op, {})
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if name not in impls or device.type not in BACKENDS[name].devices():
                continue
            try:
                probe(name)
                fn = _load(impls[name])
            except (BackendUnavailable, ImportError):
                continue
            return name, _checked_fn(op, name, fn, device, variant)
        raise BackendUnavailable(f"no backend implements {op!r} for {device.type} tensors")
    probe(backend)  # raises with the reason when unusable
    served = BACKENDS[backend].devices()
    if device.type not in served:
        raise ValueError(
            f"backend {backend!r} runs on {'/'.join(served)} tensors, but the input is on {device}"
        )
    name = backend if backend in impls else "torch"
    try:
        fn = _load(impls[name])
    except ImportError as err:
        raise BackendUnavailable(f"backend {backend!r} cannot load {op!r}: {err}") from err
    return name, _checked_fn(op, name, fn, device, variant)


def _checked_fn(op, name, fn, device, variant):
    key = (op, name, str(device), variant)
    if device.type == "cuda" and name != "torch" and key not in _checked and op in _SELF_CHECKS:
        _SELF_CHECKS[op](fn, device, variant)
        _checked.add(key)
    return fn
