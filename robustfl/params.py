"""Flat-vector views of a model's parameters.

The server works on flattened updates ``delta_i = w_i - theta`` (Section 3.1): a client's model is
one ``(d,)`` vector, n clients are an ``(n, d)`` matrix. The flat order is the order of
``model.named_parameters()``; each tensor is flattened in C order.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class ParamSpec:
    """Names, shapes and flat offsets of a model's parameters."""

    def __init__(self, model: nn.Module) -> None:
        self.names: list[str] = []
        self.shapes: list[torch.Size] = []
        self.slices: list[tuple[int, int]] = []
        start = 0
        for name, p in model.named_parameters():
            self.names.append(name)
            self.shapes.append(p.shape)
            self.slices.append((start, start + p.numel()))
            start += p.numel()
        self.dim = start

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{name: (*shape)}`` -> ``(d,)``; with a leading stack dim ``(n, *shape)`` -> ``(n, d)``."""
        first = params[self.names[0]]
        lead = first.shape[: first.dim() - len(self.shapes[0])]
        return torch.cat([params[n].reshape(*lead, -1) for n in self.names], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`flatten` (views into ``flat``); accepts ``(d,)`` or ``(n, d)``."""
        if flat.shape[-1] != self.dim:
            raise ValueError(f"flat parameter vector has length {flat.shape[-1]}, the model has d = {self.dim}")
        lead = flat.shape[:-1]
        return {n: flat[..., a:b].reshape(*lead, *s) for n, s, (a, b) in zip(self.names, self.shapes, self.slices)}


def model_to_flat(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one detached ``(d,)`` vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def load_flat_(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy a ``(d,)`` vector into the model's parameters in place."""
    spec = ParamSpec(model)
    with torch.no_grad():
        for p, (n, t) in zip(model.parameters(), spec.unflatten(flat).items()):
            p.copy_(t)
    return model
