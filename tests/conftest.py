"""Test-session setup shared by every test module."""
from __future__ import annotations

import os

import torch

# Without a GPU, robustfl.engine.triton_conv's kernels run in Triton's interpreter (NumPy on the CPU), so the
# ``triton`` layout is tested against the other layouts here too. The interpreter is chosen when the
# kernels are decorated, i.e. when robustfl.engine.triton_conv is first imported: this must come first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
