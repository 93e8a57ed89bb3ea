"""Test-session setup shared by every test module."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, robustfl.engine.triton_conv's kernels run in Triton's interpreter (NumPy on the CPU), so the
# ``triton`` layout is tested against the other layouts here too. The interpreter is chosen when the
# kernels are decorated, i.e. when robustfl.engine.triton_conv is first imported: this must come first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: as fast, and no stall when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
