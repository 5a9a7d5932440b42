"""Test configuration: Triton kernels run on the CPU through its interpreter when no GPU is here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
