"""What every path of the engine shares: the inputs' conversion and the masked cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def x_shape_nchw(x: torch.Tensor) -> tuple[int, int, int]:
    """(C, H, W) of a batch of images stored as uint8 NHWC or float NCHW."""
    if x.dtype == torch.uint8:
        return (x.shape[3], x.shape[1], x.shape[2])
    return tuple(x.shape[1:])  # type: ignore[return-value]


def prepare_inputs(xb: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1]; float inputs pass through."""
    if xb.dtype == torch.uint8:
        return xb.permute(0, 3, 1, 2).float().div_(255.0)
    return xb


def masked_ce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the real (mask = 1) samples of each batch: ``logits (..., B, classes)``,
    ``y`` and ``mask (..., B)`` -> ``(...)``, one value per model of a stack (a scalar for one batch).
    Padding (mask = 0) counts for nothing; an all-padding batch gives 0."""
    ce = F.cross_entropy(logits.float().flatten(0, -2), y.reshape(-1), reduction="none").view_as(mask)
    return (ce * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
