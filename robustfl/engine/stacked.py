"""The forward pass of n client models at once, written out layer by layer on stacked parameters.

:func:`robustfl.engine.train.train_vectorised` can get every client's gradient from
``torch.func.vmap(grad(loss))``; vmap then decides how the per-client layers run (a grouped
convolution in NCHW for ``Conv2d``). This module computes the same function explicitly, so that the
layout and the kernels are ours to pick and the step is plain autograd (which CUDA graphs can capture):

* ``Linear``: one batched matrix product, ``baddbmm(b, x, W^T)`` over the client dimension
  (:func:`dense`, whose backward leaves the weight gradient in the weight's layout; in the
  ``"triton"`` layout a GPU layer with many inputs runs its forward as a split-K Triton kernel,
  :mod:`robustfl.engine.triton_dense`);
* ``Conv2d``, three ways (``layout``):

  - ``"grouped"``: the clients' channels side by side, ``(B, n*C, H, W)``, one grouped convolution
    with ``groups = n`` (what vmap produces, without vmap's bookkeeping);
  - ``"channels_last"``: the same grouped convolution on channels-last (NHWC) memory, where cuDNN has
    other kernels;
  - ``"triton"``: the clients' activations in NHWC, ``(n, B, H, W, C)``, each convolution one
    implicit-GEMM Triton kernel over all clients (:mod:`robustfl.engine.triton_conv`; CUDA, or Triton's
    interpreter on the CPU; stride 1 only), with the ReLU or the 2x2 max-pool and ReLU that follow it
    applied in the convolution kernel's epilogue (and their backward by robustfl.engine.triton_conv);

* ``ReLU``, ``MaxPool2d``, ``Dropout``, ``Identity``, ``Flatten``: applied to every client's activations
  (in the ``"triton"`` layout, ``[ReLU] [Dropout] Flatten`` on NHWC activations as one kernel each way,
  :mod:`robustfl.engine.triton_flatten`).

Only ``nn.Sequential`` stacks of these layers are supported (all models of :mod:`robustfl.models`);
:func:`supports` says whether a model qualifies. The loss is the sum over clients of each client's
masked mean cross-entropy, so the gradient with respect to client i's parameters is client i's own
gradient (the clients' losses share no parameter).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustfl.engine.common import masked_ce
from robustfl.engine.options import LAYOUTS
_ELEMENTWISE = (nn.ReLU, nn.Identity, nn.Dropout)
_LEAVES = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.Flatten) + _ELEMENTWISE


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's leaf layers in execution order with their parameter-name prefixes (``features``
    then ``head`` for a :class:`~robustfl.models.PLRModel`). Raises ``NotImplementedError`` for a model
    this module cannot compute."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, m: nn.Module) -> None:
        if isinstance(m, nn.Sequential):
            for k, c in m.named_children():
                walk(f"{prefix}{k}.", c)
        elif isinstance(m, _LEAVES) and type(m) in _LEAVES:
            out.append((prefix, m))
        else:
            raise NotImplementedError(f"stacked engine: unsupported layer {type(m).__name__} at '{prefix}'")

    if not (hasattr(model, "features") and hasattr(model, "head")):
        raise NotImplementedError(f"stacked engine: {type(model).__name__} is not a features/head model")
    walk("features.", model.features)
    walk("head.", model.head)
    for prefix, m in out:
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            raise NotImplementedError(f"stacked engine: Conv2d at '{prefix}' needs numeric zero padding")
        if isinstance(m, nn.Flatten) and (m.start_dim != 1 or m.end_dim != -1):
            raise NotImplementedError(f"stacked engine: Flatten at '{prefix}' must flatten dims 1..-1")
    return out


def supports(model: nn.Module) -> bool:
    """Whether :func:`stacked_logits` can compute ``model``."""
    try:
        layers(model)
    except NotImplementedError:
        return False
    return True


def _pool_before_relu(ls: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``ReLU`` then ``MaxPool2d`` reordered to ``MaxPool2d`` then ``ReLU``: the same function (ReLU is
    monotone, so max(relu(a)) = relu(max(a))) and the same gradient (the pool routes it to the same
    largest input where that is positive; where it is not, ReLU's derivative makes it zero either way),
    with the ReLU and its backward on the pooled, 4x smaller activation."""
    out = list(ls)
    for i in range(len(out) - 1):
        if type(out[i][1]) is nn.ReLU and type(out[i + 1][1]) is nn.MaxPool2d:
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _is_pool2(m: nn.Module) -> bool:
    """A 2x2, stride-2, unpadded, undilated, floor-mode max-pool (what the fused epilogue computes)."""
    def two(v: object) -> bool:
        return tuple(v) == (2, 2) if isinstance(v, (tuple, list)) else v == 2

    return (type(m) is nn.MaxPool2d and two(m.kernel_size) and two(m.stride)
            and m.padding in (0, (0, 0)) and m.dilation in (1, (1, 1)) and not m.ceil_mode
            and not m.return_indices)


def _flatten_run(rest: list[tuple[str, nn.Module]]) -> tuple[bool, nn.Dropout | None, int]:
    """Whether ``rest`` starts with ``[ReLU] [Dropout] Flatten``, at least one of the first two present:
    (ReLU?, the Dropout or None, layers in the run), else (False, None, 0). Layout ``"triton"`` applies such
    a run to NHWC activations as one kernel each way (robustfl.engine.triton_flatten), the fmnist network's
    ``ReLU - Dropout - Flatten``."""
    kinds = [m for _, m in rest[:3]]
    i, relu, drop = 0, False, None
    if i < len(kinds) and type(kinds[i]) is nn.ReLU:
        relu, i = True, i + 1
    if i < len(kinds) and type(kinds[i]) is nn.Dropout:
        drop, i = kinds[i], i + 1
    if i == 0 or i >= len(kinds) or not isinstance(kinds[i], nn.Flatten):
        return False, None, 0
    return relu, drop, i + 1


def _fusable(rest: list[tuple[str, nn.Module]]) -> str:
    """The epilogue (robustfl.engine.triton_conv.EPILOGUES) that the layers right after a convolution allow,
    in the order :func:`_pool_before_relu` leaves them: a 2x2 max-pool then a ReLU, or a ReLU (none
    where a ReLU starts a :func:`_flatten_run`, which applies it)."""
    if _flatten_run(rest)[2]:
        return "none"
    kinds = [m for _, m in rest[:2]]
    if len(kinds) == 2 and _is_pool2(kinds[0]) and type(kinds[1]) is nn.ReLU:
        return "pool_relu"
    if kinds and type(kinds[0]) is nn.ReLU:
        return "relu"
    return "none"


def _to_merged(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(n, B, C, H, W) -> (B, n*C, H, W), channels-last memory for ``"channels_last"``."""
    n, b, c, h, w = x.shape
    m = x.transpose(0, 1).reshape(b, n * c, h, w)
    return m.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else m


class _Dense(torch.autograd.Function):
    """``baddbmm(b, x, W^T)`` with a backward that writes each weight gradient in its parameter's
    layout: ``dW = dY^T X`` as one batched product (autograd's ``bmm`` backward computes ``X^T dY`` and
    hands back its transpose, which the fused Adam kernel then has to copy). ``splitk``: the forward
    product by :func:`robustfl.engine.triton_dense.bmm_nt` (long inner dimensions on the GPU); the backward's
    products stay with cuBLAS (faster for them: bench/results/dense_products_h100.json)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,  # noqa: ANN001
                splitk: bool) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None
        if splitk:
            from robustfl.engine import triton_dense

            return triton_dense.bmm_nt(x, w, bias)
        wt = w.transpose(1, 2)
        return torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, wt)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # noqa: ANN001, ANN205
        x, w = ctx.saved_tensors
        dx = torch.bmm(dy, w) if ctx.needs_input_grad[0] else None
        dw = torch.bmm(dy.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        db = dy.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def _use_splitk(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the forward product goes to the split-K kernel (robustfl.engine.triton_dense.wanted; Triton
    importable)."""
    if not x.is_cuda:
        return False
    try:
        from robustfl.engine import triton_dense
    except ImportError:  # pragma: no cover - a CUDA build without Triton
        return False
    return triton_dense.wanted(x, w)


def dense(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, splitk: bool = False) -> torch.Tensor:
    """Client g's dense layer ``x[g] W[g]^T + b[g]`` for every g: ``x (n, B, in)``, ``w (n, out, in)``,
    ``bias (n, out)`` -> ``(n, B, out)``. Under autocast the operands are cast to the autocast dtype
    first and the gradients come back in the parameters' dtypes, as autocast's ``baddbmm`` does.
    ``splitk``: a layer with many inputs on the GPU runs its forward product as robustfl.engine.triton_dense's
    split-K kernel where that was measured faster (layout ``"triton"``; :func:`robustfl.engine.triton_dense.wanted`)."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            x, w = x.to(dt), w.to(dt)
            return _Dense.apply(x, w, None if bias is None else bias.to(dt), splitk and _use_splitk(x, w))
    return _Dense.apply(x, w, bias, splitk and _use_splitk(x, w))


def stacked_logits(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, *,
                   layout: str = "grouped") -> torch.Tensor:
    """Logits ``(n, B, classes)`` of the n models whose stacked parameters ``params[name] (n, ...)``
    are applied to their own inputs ``x (n, B, C, H, W)`` (or ``(n, B, F)`` for a dense-only model).
    Training-mode layers (dropout) follow ``model.training``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n, b = x.shape[:2]
    h = x
    merged = False  # True while h is (B, n*C, H, W) (grouped layouts), else (n, B, ...)
    nhwc = False  # True while h is (n, B, H, W, C) (layout "triton")
    seq = _pool_before_relu(layers(model))
    pos = 0  # the next layer of seq to apply (a fused epilogue consumes the layers after its convolution)
    relu_input = False  # the next triton convolution's input is a ReLU output whose backward it applies
    grad_pad = 0  # the zero border the next flatten kernel's backward writes around its gradient
    while pos < len(seq):
        prefix, m = seq[pos]
        pos += 1
        run = _flatten_run(seq[pos - 1:]) if nhwc else (False, None, 0)
        if run[2]:  # [ReLU] [Dropout] Flatten on NHWC activations: one kernel each way
            from robustfl.engine import triton_flatten

            relu, drop, count = run
            h = triton_flatten.relu_dropout_flatten(h, relu=relu, p=0.0 if drop is None else drop.p,
                                                    training=drop is not None and drop.training, grad_pad=grad_pad)
            nhwc, pos, grad_pad = False, pos - 1 + count, 0
        elif isinstance(m, nn.Conv2d):
            w = params[prefix + "weight"]
            bias = params.get(prefix + "bias")
            if layout == "triton":
                from robustfl.engine import triton_conv

                if not triton_conv.supported(m):
                    raise NotImplementedError(f"stacked engine: layout 'triton' needs a stride-1, undilated, "
                                              f"ungrouped Conv2d with equal padding at '{prefix}'")
                if not nhwc:
                    h, nhwc = h.permute(0, 1, 3, 4, 2).contiguous(), True
                epilogue = _fusable(seq[pos:])
                used = {"none": 0, "relu": 1, "pool_relu": 2}[epilogue]  # the layers the kernels apply
                nxt = seq[pos + used][1] if pos + used < len(seq) else None
                # conv -> ReLU -> conv: the ReLU's backward runs in the second's input-gradient kernel
                hand_on = epilogue == "relu" and isinstance(nxt, nn.Conv2d) and triton_conv.supported(nxt)
                # a flatten kernel next, and an input gradient wanted: it borders its gradient with zeros,
                # which this convolution's input-gradient kernel gathers without bounds tests
                border = m.kernel_size[0] - 1 - m.padding[0]
                grad_pad = border if (epilogue == "none" and _flatten_run(seq[pos:])[2] and h.requires_grad
                                      and m.kernel_size[0] == m.kernel_size[1] and border > 0) else 0
                h = triton_conv.conv_nhwc(h, w, bias, m.padding[0], epilogue, relu_input=relu_input,
                                          grad_masked=hand_on, **({"grad_padded": True} if grad_pad else {}))
                relu_input = hand_on
                pos += used
            else:
                if not merged:
                    h, merged = _to_merged(h, layout), True
                h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), None if bias is None else bias.reshape(-1),
                             m.stride, m.padding, m.dilation, m.groups * n)
        elif isinstance(m, nn.MaxPool2d):
            if nhwc:  # pooled as a channels-last (n*B, C, H, W) tensor, which stays channels-last
                y = F.max_pool2d(h.flatten(0, 1).permute(0, 3, 1, 2), m.kernel_size, m.stride, m.padding,
                                 m.dilation, m.ceil_mode)
                h = y.permute(0, 2, 3, 1).unflatten(0, (n, b)).contiguous()
            elif merged:
                h = F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
            else:
                y = F.max_pool2d(h.flatten(0, 1), m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
                h = y.unflatten(0, (n, b))
        elif isinstance(m, nn.Flatten):
            if nhwc:  # (n, B, H, W, C) -> (n, B, C*H*W), the C, H, W order of the model's dense weights
                h, nhwc = h.permute(0, 1, 4, 2, 3).flatten(2), False
            elif merged:  # (B, n*C, H, W) -> (n, B, C*H*W), each client's features in C, H, W order
                h, merged = h.reshape(b, n, -1).transpose(0, 1), False
            else:
                h = h.flatten(2)
        elif isinstance(m, nn.Linear):
            if merged or nhwc:
                raise NotImplementedError("stacked engine: Linear on a 4-d activation (add a Flatten)")
            h = dense(h, params[prefix + "weight"], params.get(prefix + "bias"), splitk=layout == "triton")
        elif isinstance(m, nn.Dropout):
            h = F.dropout(h, m.p, m.training)
        elif isinstance(m, nn.ReLU):
            h = F.relu(h)
        # nn.Identity: nothing
    if merged or nhwc:
        raise NotImplementedError("stacked engine: the model must end in dense layers")
    return h


def stacked_loss(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 mask: torch.Tensor, *, layout: str = "grouped") -> torch.Tensor:
    """Sum over the n clients of each one's mean cross-entropy over its real samples (``mask (n, B)``,
    :func:`robustfl.engine.common.masked_ce`); its gradient w.r.t. ``params`` stacks the clients' gradients."""
    return masked_ce(stacked_logits(model, params, x, layout=layout), y, mask).sum()


def stacked_grads(model: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor, mask: torch.Tensor, *, layout: str = "grouped") -> tuple[torch.Tensor, ...]:
    """Every client's gradient of its own loss, stacked like ``params`` (what ``vmap(grad(masked_ce))``
    returns). ``params`` are taken as constants (detached leaves sharing their storage)."""
    leaves = [p.detach().requires_grad_() for p in params]
    loss = stacked_loss(model, dict(zip(names, leaves)), x, y, mask, layout=layout)
    return torch.autograd.grad(loss, leaves)
