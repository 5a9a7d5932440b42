"""CUDA sketch kernels (csrc/cuda/sketch.cu) compiled at run time through CuPy's RawModule.

Pointers are passed as 64-bit integers (np.uint64), so any dtype crosses without a CuPy array.

float32 x runs the SIMT kernel; float16 / bfloat16 x run the tensor-core (wmma) kernels. The p
axis is split into slices (``sketch.run_in_p_slices``), so results do not depend on the GPU model.
Kernels launch on torch's current stream.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch


_KERNELS = {torch.float32: "sketch_f32", torch.float16: "sketch_wmma_f16",
            torch.bfloat16: "sketch_wmma_bf16"}
TB, TN, THREADS = 32, 128, 128


def cuda_source(name: str) -> str:
    """Text of a CUDA source: installed package data first, then the source tree."""
    here = Path(__file__).resolve().parent.parent
    for path in (here / "_cuda" / name, here.parent / "csrc" / "cuda" / name):
        if path.is_file():
            return path.read_text()
    raise FileNotFoundError(f"CUDA source {name} is neither in {here / '_cuda'} nor in csrc/cuda")


@functools.lru_cache(maxsize=None)
def _module(device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=cuda_source("sketch.cu"), options=("-std=c++17",))


def sketch_cuda(x, out, k, seed, kind, row_offset, accumulate, nonfinite=None):
    """CUDA backend of ``attrkernels.sketch`` (see kernels/sketch.py for the contract)."""
    import cupy

    from .sketch import run_in_p_slices

    if x.stride(1) != 1:
        x = x.contiguous()
    B, p = x.shape
    fn = _module(x.device.index or 0).get_function(_KERNELS[x.dtype])
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream)

    def launch(target, ld_slice, ld_row, slices, slice_rows, acc):
        args = (
            np.uint64(x.data_ptr()), np.uint64(target.data_ptr()), np.int64(B), np.int64(p),
            np.int64(k), np.int64(x.stride(0)), np.int64(ld_slice), np.int64(ld_row),
            np.int64(slice_rows), np.uint64(row_offset), np.uint64(seed),
            np.float32(1.0 / math.sqrt(k)), np.int32(kind == "gaussian"), np.int32(acc),
        )
        with cupy.cuda.Device(x.device.index or 0), stream:
            fn((-(-B // TB), -(-k // TN), slices), (THREADS,), args)

    return run_in_p_slices(x, out, k, accumulate, launch, align=32)
