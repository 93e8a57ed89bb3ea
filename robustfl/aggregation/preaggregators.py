"""Pre-aggregators: maps from the ``(n, d)`` client updates to ``m`` mixed vectors that any aggregation rule
then aggregates in their place (``defense_params: {pre: ...}``, applied by :mod:`robustfl.aggregation.defenses`).

Each returns ``(mixed (m, d), mix (m, n))`` with ``mixed = mix @ updates``: row k of ``mix`` holds the
coefficients of the clients in mixed vector k (non-negative, summing to 1). A rule's weights over the mixed
vectors map back to per-client weights as ``mix.T @ weights``: exact for rules whose aggregate is
``weights @ mixed`` (so ``update = (mix.T @ weights) @ updates``), and for the coordinate-wise rules the
mixture of their per-vector fractions. Randomness (bucketing's permutation) comes from a ``torch.Generator``,
never the global RNG. Choices the papers leave open: ``docs/decisions/defenses-suite.md``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from robustfl.aggregation.aggregators import check_updates, pairwise_sq_dists
from robustfl.aggregation.suite import _check_count, _check_generator

__all__ = ["nnm", "bucketing", "PRE_AGGREGATORS"]

F64 = torch.float64


def nnm(updates: Tensor, f: int) -> tuple[Tensor, Tensor]:
    """Nearest-neighbour mixing (Allouah et al., AISTATS 2023, Algorithm 1): every update is replaced by
    the mean of its ``n - f`` nearest neighbours in Euclidean distance, itself included
    (``y_i = (1/(n-f)) sum_{j in N_i} x_j``). Self is always among the neighbours (an exact duplicate does
    not displace it); other ties go to the lower index (stable sort). Needs ``0 <= f < n``.
    Returns ``(y (n, d), mix (n, n))`` with ``mix[i, j] = 1/(n-f)`` for j in N_i."""
    n, _ = check_updates(updates)
    f = _check_count(f, "f", 0)
    if not f < n:
        raise ValueError(f"NNM averages the n - f nearest neighbours and needs f < n (got n={n}, f={f})")
    k = n - f
    d2 = pairwise_sq_dists(updates)
    d2.fill_diagonal_(-1.0)  # self first
    neigh = torch.sort(d2, dim=1, stable=True).indices[:, :k]
    mix = torch.zeros((n, n), dtype=F64, device=updates.device)
    mix.scatter_(1, neigh, 1.0 / k)
    return mix.to(updates.dtype) @ updates, mix


def bucketing(updates: Tensor, s: int = 2, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Bucketing (Karimireddy, He, Jaggi, ICLR 2022, Algorithm 1): a uniformly random permutation pi of the
    clients (from ``generator``; a fixed-seed one when ``None``) is cut into ``ceil(n/s)`` consecutive
    buckets of ``s`` (the last one holds the remaining ``n mod s`` when s does not divide n) and each bucket
    is replaced by its mean. Bucket size ``s = 2`` (the paper's experiments).
    Returns ``(y (ceil(n/s), d), mix (ceil(n/s), n))`` with ``mix[k, i] = 1/|B_k|`` for i in bucket k."""
    n, _ = check_updates(updates)
    s = _check_count(s, "s", 1)
    g = _check_generator(generator)
    perm = torch.randperm(n, generator=g, device=g.device).to(updates.device)
    m = -(-n // s)
    mix = torch.zeros((m, n), dtype=F64, device=updates.device)
    for k in range(m):
        members = perm[k * s:(k + 1) * s]
        mix[k, members] = 1.0 / len(members)
    return mix.to(updates.dtype) @ updates, mix


#: config name -> (function, its parameters besides the updates)
PRE_AGGREGATORS = {"nnm": (nnm, ("f",)), "bucketing": (bucketing, ("s",))}
