"""robustfl.engine.triton_flatten: ReLU + dropout + Flatten of NHWC activations against the PyTorch composition
(``F.relu``, the same dropout mask, ``permute`` + ``flatten``), values and gradients. On a machine
without a GPU the kernel runs in Triton's interpreter (see conftest.py), in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustfl.engine import triton_conv
from robustfl.engine import triton_flatten

CUDA = torch.cuda.is_available()
on_cpu = pytest.mark.skipif(not triton_flatten.INTERPRET, reason="CPU tensors need Triton's interpreter "
                            "(TRITON_INTERPRET=1, set by conftest.py where there is no GPU)")


def _reference(z: torch.Tensor, keep: torch.Tensor | None, p: float, relu: bool) -> torch.Tensor:
    v = F.relu(z) if relu else z
    if keep is not None:
        v = v * keep.to(v.dtype) * (1.0 / (1.0 - p))  # F.dropout's arithmetic: times the scale 1 / (1 - p)
    return v.permute(0, 1, 4, 2, 3).flatten(2)


@on_cpu
@pytest.mark.parametrize("relu,p", [(True, 0.25), (True, 0.0), (False, 0.5), (False, 0.0)])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 6), (1, 2, 20, 20, 64), (3, 1, 1, 1, 3)])
def test_equals_relu_dropout_permute_flatten(shape: tuple[int, ...], relu: bool, p: float,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """float64, with the kernel's own mask: the same output, in C, H, W order per sample, and the same
    gradient at z (dropout's scale, the ReLU's mask where z <= 0, exact zeros included)."""
    g = torch.Generator().manual_seed(sum(shape))
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    z[..., 0] = 0.0  # ReLU's kink: no gradient at 0 (PyTorch's convention)
    masks: list[torch.Tensor] = []
    draw = triton_flatten.dropout_mask

    def remember(*args: object) -> torch.Tensor:
        masks.append(draw(*args))
        return masks[-1]

    monkeypatch.setattr(triton_flatten, "dropout_mask", remember)
    zk, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = triton_flatten.relu_dropout_flatten(zk, relu=relu, p=p, training=True)
    keep = masks[0] if masks else None
    assert (keep is not None) == (p > 0)
    want = _reference(zr, keep, p, relu)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    gy = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (got * gy).sum().backward()
    (want * gy).sum().backward()
    torch.testing.assert_close(zk.grad, zr.grad, rtol=0, atol=0)


@on_cpu
@pytest.mark.parametrize("q", [1, 4])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 6), (1, 2, 20, 20, 64), (3, 1, 1, 1, 3)])
def test_gradient_handed_back_inside_a_zero_bordered_buffer(shape: tuple[int, ...], q: int) -> None:
    """``grad_pad`` q: the gradient at z is the same as without it, and it is the inside of a
    (G, B, H + 2q, W + 2q, C) buffer whose border the kernel wrote with zeros (over a buffer first filled
    with NaN, so an unwritten border would show)."""
    g = torch.Generator().manual_seed(sum(shape) + q)
    z = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(shape[0], shape[1], shape[2] * shape[3] * shape[4], generator=g, dtype=torch.float64)
    want = torch.autograd.grad(triton_flatten.relu_dropout_flatten(z, relu=True), z, gy)[0]
    real_empty = torch.empty
    with pytest.MonkeyPatch.context() as mp:  # every buffer the backward allocates starts as NaN
        mp.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
        got = torch.autograd.grad(triton_flatten.relu_dropout_flatten(z, relu=True, grad_pad=q), z, gy)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    base = triton_conv.padded_base(got, q)
    assert base is not None and base.shape == (*shape[:2], shape[2] + 2 * q, shape[3] + 2 * q, shape[4])
    border = torch.ones(base.shape, dtype=torch.bool)
    border[:, :, q:-q, q:-q] = False
    assert bool((base[border] == 0).all())
    with pytest.raises(ValueError, match="grad_pad"):
        triton_flatten.relu_dropout_flatten(z, relu=True, grad_pad=-1)


@on_cpu
def test_eval_mode_and_dropped_everything() -> None:
    """No dropout outside training (the flatten and ReLU only); p = 1 drops every element, as F.dropout."""
    z = torch.randn(2, 3, 4, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(triton_flatten.relu_dropout_flatten(z, relu=True, p=0.5, training=False),
                               _reference(z, None, 0.0, True), rtol=0, atol=0)
    zero = triton_flatten.relu_dropout_flatten(z, relu=True, p=1.0, training=True)
    assert zero.shape == (2, 3, 80) and not zero.any()


@on_cpu
def test_dropout_keeps_one_minus_p_and_scales() -> None:
    """Over 200,000 elements: the kept fraction is 1 - p within 5 standard errors, kept values are
    scaled by 1 / (1 - p), and successive calls draw different masks."""
    torch.manual_seed(0)
    z = torch.rand(1, 10, 10, 10, 2000, dtype=torch.float64) + 0.5  # positive: the ReLU passes all
    p = 0.25
    y = triton_flatten.relu_dropout_flatten(z, relu=True, p=p, training=True)
    kept = y != 0
    frac = kept.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * ((p * (1 - p)) / kept.numel()) ** 0.5, frac
    zf = z.permute(0, 1, 4, 2, 3).flatten(2)
    torch.testing.assert_close(y[kept], zf[kept] * (1 / (1 - p)), rtol=0, atol=0)
    y2 = triton_flatten.relu_dropout_flatten(z, relu=True, p=p, training=True)
    assert not torch.equal(y != 0, y2 != 0)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"\(G, B, H, W, C\)"):
        triton_flatten.relu_dropout_flatten(torch.zeros(2, 3, 4, 5), relu=True)
    with pytest.raises(ValueError, match="dropout probability"):
        triton_flatten.relu_dropout_flatten(torch.zeros(1, 1, 2, 2, 2), relu=True, p=1.5, training=True)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_fp32_equals_the_composition() -> None:
    """On the GPU, fp32 and bf16, fmnist's shape (10 clients x 64 samples x 20 x 20 x 64): the same values
    and gradients as the PyTorch composition with the same mask (a copy, a scale and a mask: exact)."""
    torch.manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        z = torch.randn(10, 64, 20, 20, 64, device="cuda", dtype=dt)
        keep = triton_flatten.dropout_mask(z.shape, 0.25, z.device)
        zk, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
        got = triton_flatten._ReluDropoutFlatten.apply(zk, keep, 1 / 0.75, True)
        want = _reference(zr, keep, 0.25, True)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        gy = torch.randn_like(got)
        (got * gy).sum().backward()
        (want * gy).sum().backward()
        torch.testing.assert_close(zk.grad, zr.grad, rtol=0, atol=0)
