"""Adam (Kingma & Ba 2015, as ``torch.optim.Adam`` computes it, lr 1e-3, Section 6.1) on stacked ``(n, ...)``
tensors: n independent optimisers, one per client or attacker (row).

* :func:`adam_step`: per-row step counts and an ``active`` flag (a row without a real sample, or whose
  loop has ended, is left untouched);
* :func:`adam_step_uniform`: every row active with the same step count (scalar bias corrections; on
  CUDA PyTorch's fused kernel; on the CPU the arithmetic of ``torch.optim.Adam``, bit for bit);
* :func:`adam_step_counted`: :func:`adam_step_uniform` with the count in a device tensor (CUDA graphs);
* :func:`adam_rows`: :func:`adam_step` on the rows of one ``(k, d)`` matrix, an inactive row's gradient
  never read (on CUDA the fused kernel once per row).
"""
from __future__ import annotations

import math

import torch

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def adam_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
              exp_avg_sq: list[torch.Tensor], step: torch.Tensor, active: torch.Tensor, lr: float) -> None:
    """One Adam step on stacked ``(n, ...)`` tensors, in place. ``step (n,)`` counts each row's own
    steps; rows with ``active = 0`` are left untouched, so unequal shards still give independent Adams."""
    b1, b2 = ADAM_BETAS
    step += active
    bc1 = 1 - b1 ** step.clamp_min(1)
    bc2_sqrt = torch.sqrt(1 - b2 ** step.clamp_min(1))
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        shape = (-1,) + (1,) * (p.dim() - 1)
        a = active.view(shape).to(p.dtype)
        m.mul_(1 - a * (1 - b1)).add_(a * (1 - b1) * g)
        v.mul_(1 - a * (1 - b2)).add_(a * (1 - b2) * g * g)
        denom = (v.sqrt() / bc2_sqrt.view(shape)).add_(ADAM_EPS)
        p.sub_(a * (lr / bc1.view(shape)) * m / denom)


def adam_step_uniform(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
                      exp_avg_sq: list[torch.Tensor], step: int, lr: float, *, fused: bool | None = None) -> None:
    """:func:`adam_step` when every row is active and all have taken ``step`` steps: the same arithmetic
    with scalar bias corrections, in a handful of foreach launches, or (``fused``; by default on CUDA)
    in one launch of ``torch._fused_adam_``, the kernel behind ``torch.optim.Adam(fused=True)`` (the
    same update up to float rounding: tests/test_train.py)."""
    b1, b2 = ADAM_BETAS
    if fused is None:
        fused = params[0].is_cuda
    if fused:  # the step count as a device scalar (a fill kernel, no host-device copy)
        step_t = torch.full((), float(step), dtype=torch.float32, device=params[0].device)
        grads = [g.contiguous() for g in grads]  # the kernel needs each gradient laid out as its parameter
        torch._fused_adam_(params, grads, exp_avg, exp_avg_sq, [], [step_t] * len(params), lr=lr, beta1=b1,
                           beta2=b2, weight_decay=0.0, eps=ADAM_EPS, amsgrad=False, maximize=False)
        return
    torch._foreach_lerp_(exp_avg, grads, 1 - b1)
    torch._foreach_mul_(exp_avg_sq, b2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - b2)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, math.sqrt(1 - b2 ** step))
    torch._foreach_add_(denom, ADAM_EPS)
    torch._foreach_addcdiv_(params, exp_avg, denom, value=-lr / (1 - b1 ** step))


def adam_rows(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: torch.Tensor,
              active: torch.Tensor, lr: float, *, fused: bool | None = None) -> None:
    """:func:`adam_step` on the rows of ``w (k, d)``: row i steps (its own count ``step[i]``) where
    ``active[i]`` is 1 and is left untouched, gradient unread, where it is 0. ``fused`` (default: on
    CUDA) runs the fused kernel per row, skipping an inactive row through its ``found_inf`` flag."""
    if fused is None:
        fused = w.is_cuda
    if not fused:
        adam_step([w], [torch.where(active.bool().unsqueeze(1), g, 0.0)], [m], [v], step, active, lr)
        return
    step += active
    skip = 1.0 - active
    b1, b2 = ADAM_BETAS
    for i in range(len(w)):
        torch._fused_adam_([w[i]], [g[i]], [m[i]], [v[i]], [], [step[i]], lr=lr, beta1=b1, beta2=b2,
                           weight_decay=0.0, eps=ADAM_EPS, amsgrad=False, maximize=False, found_inf=skip[i])


def adam_step_counted(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
                      exp_avg_sq: list[torch.Tensor], step: torch.Tensor, lr: float) -> None:
    """:func:`adam_step_uniform` with the shared step count kept in ``step`` (a one-element float tensor
    on the parameters' device), incremented here: on CUDA the fused kernel reads it on the device, so the
    step can be captured in a CUDA graph; on the CPU the foreach arithmetic (``torch.optim.Adam``'s, bit
    for bit)."""
    step += 1
    if params[0].is_cuda:
        b1, b2 = ADAM_BETAS
        grads = [g.contiguous() for g in grads]
        torch._fused_adam_(params, grads, exp_avg, exp_avg_sq, [], [step] * len(params), lr=lr, beta1=b1,
                           beta2=b2, weight_decay=0.0, eps=ADAM_EPS, amsgrad=False, maximize=False)
        return
    adam_step_uniform(params, grads, exp_avg, exp_avg_sq, int(step.item()), lr, fused=False)
