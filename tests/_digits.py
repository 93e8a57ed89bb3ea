"""scikit-learn's 8x8 digits and the digits CNN, as the attack test modules' fixtures start from."""
from __future__ import annotations

import pytest
import torch

from robustfl.models import build_model
from robustfl.params import model_to_flat


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as float ``(N, 1, 8, 8)`` images in [0, 1] and int64 labels (the test skips without
    scikit-learn)."""
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    return torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1), torch.tensor(d.target, dtype=torch.int64)


def seeded_digits_cnn() -> tuple[torch.nn.Module, torch.Tensor]:
    """The digits CNN built after ``torch.manual_seed(0)`` (the global RNG is left where the build leaves it),
    and its flat parameters."""
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1)
    return model, model_to_flat(model)
