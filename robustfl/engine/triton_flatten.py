"""ReLU, dropout and ``Flatten`` of n clients' NHWC activations as one Triton kernel each way.

The stacked engine's ``"triton"`` layout keeps activations in NHWC, ``(G, B, H, W, C)``; a model's
``Flatten`` wants each sample's features in C, H, W order (the order of the dense layer's weight
columns). The fmnist network (Table 6) ends its convolutions with ``ReLU - Dropout(.25) - Flatten``.
Done as PyTorch operations that is a dropout pass and a transposing copy forward, and backward a
dropout pass, a transposing copy and the ReLU's mask (two more passes): on fmnist's 10-client step
about 0.9 GB of memory traffic over a 65 MB activation (an H100 step profile by bench/profile_step.py).
Here one kernel computes, for sample s = (g, b), pixel p = (h, w) and channel c,

    forward:   y[s, c * H * W + p] = relu(z[s, p, c]) * keep[s, p, c] / (1 - P)
    backward:  dz[s, p, c] = dy[s, c * H * W + p] * keep[s, p, c] / (1 - P) * [z[s, p, c] > 0]

(without ``relu``: no max and no mask; without dropout, ``P = 0``, ``keep = 1``). ``keep`` is drawn
by PyTorch (``bernoulli_(1 - P)`` on the NHWC tensor, the engine's generator, so runs stay
reproducible) and kept as one byte per element for the backward, as ``F.dropout`` keeps its mask.
The masks are not the ones ``F.dropout`` would draw on the same generator (another kernel, another
order), as the stacked engine's masks already differ from the sequential reference's: dropout is
random, its distribution is the same.

With ``grad_pad`` q the backward writes dz into a (H + 2q, W + 2q) grid, its border zero, and hands back
the inside, from which the convolution before it gathers its input gradient without bounds tests
(robustfl.engine.triton_conv.padded_base).

On a machine without a GPU the kernel runs in Triton's interpreter when ``TRITON_INTERPRET=1`` is set
before import (tests/test_triton_flatten.py checks it against the PyTorch composition).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from robustfl.engine.triton_conv import INTERPRET, on_device


@triton.jit
def _flatten_kernel(src_ptr, z_ptr, keep_ptr, dst_ptr, HW, W, scale, C: tl.constexpr, BACKWARD: tl.constexpr,
                    RELU: tl.constexpr, DROP: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
                    PAD: tl.constexpr = 0):
    """One (BP pixels x BC channels) tile of one sample. Forward: src = z (NHWC), dst = y (CHW);
    backward: src = dy (CHW), dst = dz (NHWC), with PAD > 0 into a (H + 2 PAD, W + 2 PAD) grid whose
    border it fills with zeros (the pixels run over that grid). Grid: (cdiv(pixels, BP), cdiv(C, BC),
    samples)."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    s = tl.program_id(2).to(tl.int64)
    if PAD > 0:  # p runs over the padded grid; q is its pixel of the unpadded one, where it has one
        wp = W + 2 * PAD
        hp = HW // W + 2 * PAD
        r = p // wp - PAD
        col = p % wp - PAD
        inner = (p < hp * wp) & (r >= 0) & (r < HW // W) & (col >= 0) & (col < W)
        q = r * W + col
        ok = inner[:, None] & (c < C)[None, :]
        out_ok = (p < hp * wp)[:, None] & (c < C)[None, :]
        out = s * (hp * wp) * C + p[:, None] * C + c[None, :]
    else:
        q = p
        ok = (p < HW)[:, None] & (c < C)[None, :]
        out_ok = ok
    nhwc = s * HW * C + q[:, None] * C + c[None, :]
    chw = s * HW * C + c[None, :] * HW + q[:, None]
    if PAD == 0:
        out = nhwc if BACKWARD else chw
    v = tl.load(src_ptr + (chw if BACKWARD else nhwc), mask=ok, other=0.0)
    if RELU:
        if BACKWARD:
            z = tl.load(z_ptr + nhwc, mask=ok, other=0.0)
            v = tl.where(z > 0, v, 0.0)
        else:
            v = tl.maximum(v, 0.0)
    if DROP:
        keep = tl.load(keep_ptr + nhwc, mask=ok, other=0)
        v = tl.where(keep != 0, v * scale, 0.0)
    tl.store(dst_ptr + out, v.to(dst_ptr.dtype.element_ty), mask=out_ok)


#: pixels and channels per program (the interpreter's cost is per program: one sample per program there)
BLOCK_P, BLOCK_C = (1024, 256) if INTERPRET else (64, 64)


def _launch(src: torch.Tensor, dst: torch.Tensor, keep: torch.Tensor | None, h: int, w: int, c: int, scale: float,
            *, relu: bool, z: torch.Tensor | None = None, backward: bool, pad: int = 0) -> None:
    """:func:`_flatten_kernel` over every sample; ``z`` (the pre-activation) only for the ReLU's backward;
    ``pad``: the backward's ``dst`` is (samples, h + 2 pad, w + 2 pad, c), its border zeroed."""
    samples = src.numel() // (h * w * c)
    pixels = (h + 2 * pad) * (w + 2 * pad)
    bp = min(BLOCK_P, triton.next_power_of_2(pixels)) if INTERPRET else BLOCK_P
    bc = min(BLOCK_C, max(16, triton.next_power_of_2(c))) if INTERPRET else BLOCK_C
    grid = (triton.cdiv(pixels, bp), triton.cdiv(c, bc), samples)
    with on_device(src):
        _flatten_kernel[grid](src, src if z is None else z, src if keep is None else keep, dst, h * w, w, scale,
                              C=c, BACKWARD=backward, RELU=relu, DROP=keep is not None, BP=bp, BC=bc, PAD=pad)


class _ReluDropoutFlatten(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, keep: torch.Tensor | None, scale: float, relu: bool,  # noqa: ANN001
                grad_pad: int = 0) -> torch.Tensor:
        n, b, h, w, c = z.shape
        y = torch.empty(n, b, c * h * w, dtype=z.dtype, device=z.device)
        _launch(z, y, keep, h, w, c, scale, relu=relu, backward=False)
        ctx.save_for_backward(z if relu else None, keep)
        ctx.scale, ctx.shape, ctx.grad_pad = scale, z.shape, grad_pad
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # noqa: ANN001, ANN205
        z, keep = ctx.saved_tensors
        n, b, h, w, c = ctx.shape
        q = ctx.grad_pad
        dz = torch.empty(n, b, h + 2 * q, w + 2 * q, c, dtype=dy.dtype, device=dy.device)
        _launch(dy.contiguous(), dz, keep, h, w, c, ctx.scale, relu=z is not None, z=z, backward=True, pad=q)
        if q:  # the gradient: the inside of the zero-bordered buffer (robustfl.engine.triton_conv.padded_base)
            dz = dz[:, :, q:q + h, q:q + w]
        return dz, None, None, None, None


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """One byte per element, 1 with probability ``1 - p`` (drawn by PyTorch's generator on ``device``)."""
    return torch.empty(shape, dtype=torch.uint8, device=device).bernoulli_(1.0 - p)


def relu_dropout_flatten(z: torch.Tensor, *, relu: bool, p: float = 0.0, training: bool = False,
                         grad_pad: int = 0) -> torch.Tensor:
    """``Flatten(Dropout(p)(ReLU(z)))`` of NHWC activations ``z (G, B, H, W, C)`` with each sample's
    features in C, H, W order: ``(G, B, C*H*W)``, what ``F.dropout(F.relu(z), p, training).permute(0, 1,
    4, 2, 3).flatten(2)`` computes (another dropout mask; module docstring). ``relu`` False: no ReLU;
    dropout only where ``training`` and ``p > 0``. ``grad_pad`` q > 0: the gradient it hands back for
    ``z`` is the inside of a zero-bordered (G, B, H + 2q, W + 2q, C) buffer, written by the same kernel
    (a view with that buffer's strides), which the convolution that produced ``z`` gathers its input
    gradient from without bounds tests (robustfl.engine.triton_conv.conv_nhwc's ``grad_padded``)."""
    if grad_pad < 0:
        raise ValueError(f"relu_dropout_flatten: grad_pad must be >= 0, got {grad_pad}")
    if z.dim() != 5:
        raise ValueError(f"relu_dropout_flatten: z must be (G, B, H, W, C), got {tuple(z.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"relu_dropout_flatten: dropout probability must be in [0, 1], got {p}")
    z = z.contiguous()
    if training and p == 1.0:  # F.dropout's answer: every element dropped
        return z.flatten(2) * 0.0
    keep = dropout_mask(z.shape, p, z.device) if training and p > 0 else None
    return _ReluDropoutFlatten.apply(z, keep, 1.0 / (1.0 - p) if keep is not None else 1.0, relu, int(grad_pad))
