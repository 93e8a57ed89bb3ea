"""robustfl.engine.triton_conv: the per-client implicit-GEMM convolution against torch.nn.functional.conv2d,
one client at a time. On a machine without a GPU the kernels run in Triton's interpreter (see
conftest.py), with the GPU's tile shapes so that partial tiles, the K-loop's masking and the
weight gradient's split reduction all run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustfl.engine import stacked
from robustfl.engine import triton_conv
from robustfl.models import build_model
from robustfl.params import ParamSpec, model_to_flat

CUDA = torch.cuda.is_available()
#: the checks on CPU tensors run the kernels in Triton's interpreter (conftest.py turns it on without a
#: GPU); on a GPU machine the compiled kernels cannot take CPU tensors, and the CUDA tests below run
on_cpu = pytest.mark.skipif(not triton_conv.INTERPRET, reason="CPU tensors need Triton's interpreter "
                            "(TRITON_INTERPRET=1, set by conftest.py where there is no GPU)")
#: the tile shapes the GPU runs (robustfl.engine.triton_conv.igemm_tiles, WGRAD_TILES)
IGEMM_GPU = [triton_conv.Tiles(bm=bm, bn=64, bk=32) for bm in (64, 128, 256, 512)]
WGRAD_GPU = triton_conv.Tiles(bm=64, bn=64, bk=32)


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, pad: int,
               epilogue: str = "none") -> torch.Tensor:
    """(G, B, H, W, C) NHWC per-client convolution, one F.conv2d per client, then (``epilogue``) the
    model's own ReLU, or ReLU then 2x2 max-pool (the order of robustfl.models' networks)."""
    out = []
    for g in range(x.shape[0]):
        y = F.conv2d(x[g].permute(0, 3, 1, 2), w[g], None if b is None else b[g], padding=pad)
        if epilogue != "none":
            y = F.relu(y)
        if epilogue == "pool_relu":
            y = F.max_pool2d(y, 2)
        out.append(y)
    return torch.stack(out).permute(0, 1, 3, 4, 2)


def _check(shape: tuple[int, ...], bias: bool, dtype: torch.dtype = torch.float64, device: str = "cpu",
           tol: float = 1e-11, epilogue: str = "none", ties: bool = False) -> None:
    g, b, h, w, ci, co, k, pad = shape
    gen = torch.Generator().manual_seed(sum(shape))
    # ties: small integers, so every output is an exact integer whatever the summation order, and
    # pooling windows often hold equal maxima (positive, zero and negative)
    rand = ((lambda *sz: torch.randint(-2, 3, sz, generator=gen).double()) if ties else
            (lambda *sz: torch.randn(*sz, generator=gen, dtype=torch.float64)))
    x = rand(g, b, h, w, ci)
    if ties:  # constant regions as well
        x[:, :, : h // 2] = 1.0
    x = x.to(device, dtype)
    wt = rand(g, co, ci, k, k).to(device, dtype)
    bs = rand(g, co).to(device, dtype) if bias else None
    ins = [t.clone().requires_grad_() for t in (x, wt) + ((bs,) if bias else ())]
    refs = [t.detach().clone().requires_grad_() for t in ins]
    y = triton_conv.conv_nhwc(ins[0], ins[1], ins[2] if bias else None, pad, epilogue)
    want = _reference(refs[0], refs[1], refs[2] if bias else None, pad, epilogue)
    oh, ow = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    if epilogue == "pool_relu":
        oh, ow = oh // 2, ow // 2
    assert y.shape == want.shape == (g, b, oh, ow, co)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    (y * gy).sum().backward()
    (want * gy).sum().backward()
    scale = want.abs().max().item()
    torch.testing.assert_close(y, want, rtol=tol, atol=tol * scale)
    for a, r in zip(ins, refs):
        torch.testing.assert_close(a.grad, r.grad, rtol=tol, atol=tol * r.grad.abs().max().item())


# (G clients, B, H, W, Cin, Cout, kernel, padding): one input channel (fmnist's first layer), Cin and
# Cout not multiples of the tiles, padding 0/1/2, rows M = B*OH*OW above one tile and not a multiple
# of it, and a weight-gradient reduction split into several chunks (M > 8 * 64: 3*15*15 = 675); the
# last two have Cin a multiple of the K block (32), where the kernels gather by row (ROWK), with
# padding and with fmnist's 5x5 kernel
SHAPES = [(2, 3, 8, 8, 1, 16, 5, 0), (3, 2, 7, 6, 5, 6, 3, 0), (2, 3, 17, 17, 5, 6, 3, 0),
          (2, 2, 9, 9, 4, 8, 3, 1), (1, 1, 5, 5, 3, 3, 5, 2), (2, 3, 15, 15, 70, 20, 1, 0),
          (2, 3, 13, 11, 32, 20, 3, 1), (2, 2, 10, 9, 64, 8, 5, 0)]


@on_cpu
@pytest.mark.parametrize("tiles", IGEMM_GPU, ids=lambda t: f"bm{t.bm}")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_conv_and_its_gradients_equal_conv2d_per_client(shape: tuple[int, ...], bias: bool, tiles: triton_conv.Tiles,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_conv, "IGEMM_TILES", tiles)
    monkeypatch.setattr(triton_conv, "WGRAD_TILES", WGRAD_GPU)
    monkeypatch.setattr(triton_conv, "WGRAD_PROGRAMS", 1024)
    _check(shape, bias)


@on_cpu
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[7]])
def test_weight_operand_is_k_major_and_gives_conv2d(shape: tuple[int, ...]) -> None:
    """gemm_weight: the (G, K, N) operand stored K-major, forward K = (kh, kw, ci), input gradient
    K = (kh, kw, co); the kernels read it at its strides: the convolution and its gradients equal conv2d's."""
    w = torch.randn(2, 6, 5, 3, 3, dtype=torch.float64)
    fwd = triton_conv.gemm_weight(w, torch.float64, backward=False)
    bwd = triton_conv.gemm_weight(w, torch.float64, backward=True)
    assert fwd.shape == (2, 45, 6) and bwd.shape == (2, 54, 5) and fwd.stride(1) == bwd.stride(1) == 1
    assert torch.equal(fwd[1, :, 2].view(3, 3, 5), w[1, 2].permute(1, 2, 0))  # K = (kh, kw, ci), N = co
    assert torch.equal(bwd[1, :, 2].view(3, 3, 6), w[1, :, 2].permute(1, 2, 0))  # K = (kh, kw, co), N = ci
    _check(shape, bias=True)


#: shapes for the fused epilogues: even and odd convolution outputs (an odd one leaves its last row and
#: column out of every pooling window), one input channel, padding, several row tiles
EPI_SHAPES = [(2, 3, 8, 8, 1, 16, 5, 0), (3, 2, 7, 6, 5, 6, 3, 0), (2, 3, 17, 17, 5, 6, 3, 0),
              (2, 2, 9, 9, 4, 8, 3, 1), (2, 3, 16, 16, 6, 20, 3, 1), (2, 3, 15, 14, 32, 20, 3, 1)]


@on_cpu
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("tiles", IGEMM_GPU[::3], ids=lambda t: f"bm{t.bm}")
@pytest.mark.parametrize("epilogue", ["relu", "pool_relu"])
@pytest.mark.parametrize("shape", EPI_SHAPES)
def test_fused_epilogues_and_their_gradients_equal_relu_and_max_pool(
        shape: tuple[int, ...], epilogue: str, tiles: triton_conv.Tiles, ties: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """conv_nhwc(..., epilogue) against F.conv2d followed by F.relu (and F.max_pool2d(., 2)), client by
    client: values, and the gradients of input, weight and bias (float64, the GPU's tiles, a split
    weight-gradient reduction), also on inputs full of ties, where the pool's gradient must go to the
    first maximum of each window as PyTorch's does."""
    monkeypatch.setattr(triton_conv, "IGEMM_TILES", tiles)
    monkeypatch.setattr(triton_conv, "WGRAD_TILES", WGRAD_GPU)
    monkeypatch.setattr(triton_conv, "WGRAD_PROGRAMS", 1024)
    _check(shape, True, epilogue=epilogue, ties=ties)


@on_cpu
def test_pool_codes_name_each_windows_first_maximum_or_dead() -> None:
    """The pool epilogue's uint8 codes: the position q = 2 * row + column of each 2x2 window's first
    maximum (PyTorch's tie rule), DEAD where the maximum is not positive; the stored output is
    max(maximum, 0). Small integers, so windows hold exact ties."""
    gen = torch.Generator().manual_seed(7)
    g, b, h, w, ci, co, k = 2, 2, 9, 8, 3, 5, 3
    x = torch.randint(-2, 3, (g, b, h, w, ci), generator=gen).double()
    wt = torch.randint(-2, 3, (g, co, ci, k, k), generator=gen).double()
    wk = wt.permute(0, 3, 4, 2, 1).reshape(g, k * k * ci, co).contiguous()
    oh, ow = h - k + 1, w - k + 1  # 7 x 6: the last row is in no window
    y, code = triton_conv._igemm(x, wk, None, oh, ow, co, k, k, 1, 0, triton_conv.Tiles(64, 16, 32), epi=2)
    conv = _reference(x, wt, None, 0)[:, :, : 2 * (oh // 2), : 2 * (ow // 2)]
    win = conv.unflatten(2, (oh // 2, 2)).unflatten(4, (ow // 2, 2))  # (g, b, ph, 2, pw, 2, co)
    win = win.permute(0, 1, 2, 4, 6, 3, 5).flatten(-2)  # (g, b, ph, pw, co, 4), q = 2 * row + column
    mx = win.max(-1).values
    first = (win == mx.unsqueeze(-1)).double().argmax(-1)  # the first position holding the maximum
    want = torch.where(mx > 0, first, torch.full_like(first, triton_conv.DEAD))
    assert ((win == mx.unsqueeze(-1)).sum(-1) > 1).any()  # ties occur
    torch.testing.assert_close(code.long(), want)
    torch.testing.assert_close(y, mx.clamp_min(0))


def test_tile_choice_fills_the_multiprocessors(monkeypatch: pytest.MonkeyPatch) -> None:
    """igemm_tiles: 512-row tiles while they make >= SMS programs, then 256, 128, then 64."""
    monkeypatch.setattr(triton_conv, "IGEMM_TILES", None)
    monkeypatch.setattr(triton_conv, "SMS", 132)
    assert triton_conv.igemm_tiles(64 * 20 * 20, 64, 10) == triton_conv.Tiles(512, 64, 32, 8, 3)  # fmnist conv 2
    assert triton_conv.igemm_tiles(32 * 8 * 8, 128, 10) == triton_conv.Tiles(256, 64, 32, 8, 3)  # 8 x 2 x 10 = 160
    assert triton_conv.igemm_tiles(32 * 8 * 8, 64, 10) == triton_conv.Tiles(128, 64, 32, 4, 3)  # 8 x 10 < 132
    assert triton_conv.igemm_tiles(32 * 4 * 4, 64, 10) == triton_conv.Tiles(64, 64, 32, 4, 3)  # CIFAR-10 conv 3
    assert triton_conv.igemm_tiles(32 * 4 * 4, 64, 90) == triton_conv.Tiles(256, 64, 32, 8, 3)  # packed: 2 x 90
    assert triton_conv.igemm_tiles(32 * 8 * 8, 64, 90) == triton_conv.Tiles(512, 64, 32, 8, 3)  # packed: 4 x 90
    fixed = triton_conv.Tiles(32, 32, 16)
    monkeypatch.setattr(triton_conv, "IGEMM_TILES", fixed)
    assert triton_conv.igemm_tiles(10**6, 64, 10) is fixed


@on_cpu
def test_weight_gradient_split_covers_every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split reduction's chunk arithmetic: several chunk counts, the last one partial, give the
    same gradient (float64), including one chunk per 64-row block."""
    for programs in (1, 3, 7, 10_000):
        monkeypatch.setattr(triton_conv, "WGRAD_TILES", WGRAD_GPU)
        monkeypatch.setattr(triton_conv, "WGRAD_PROGRAMS", programs)
        _check((2, 3, 17, 17, 5, 6, 3, 0), True)


#: unpadded shapes whose rows, K = 3*3*32 and output channels the tiles divide (IGEMM_GPU[0], WGRAD_GPU):
#: the separable gather with no masks (EVEN), the second with its weight-gradient reduction in 3 chunks
EVEN_SHAPES = [(2, 4, 6, 6, 32, 16, 3, 0), (2, 24, 10, 10, 32, 16, 3, 0)]


def test_separable_gather_flags_for_the_paper_layers_and_the_test_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernels take the separable gather: an unpadded forward pass and weight gradient,
    never an input gradient (its window leaves the input) or a padded layer; EVEN where the tiles divide
    the shapes. fmnist's 5x5x64 layer at 10 clients: forward unmasked, its weight gradient in 4 chunks of
    100 row blocks (3 uneven ones without the separable gather)."""
    monkeypatch.setattr(triton_conv, "WGRAD_PROGRAMS", 512)  # the GPU's (the interpreter runs 1)
    t512 = triton_conv.Tiles(512, 64, 32, 8, 3)
    m, k = 64 * 20 * 20, 5 * 5 * 64
    assert triton_conv._igemm_gather(m, k, 64, t512, 1, 0) == (True, True)
    assert triton_conv._igemm_gather(m + 4, k, 64, t512, 1, 0) == (True, False)  # a partial row tile
    assert triton_conv._igemm_gather(64 * 24 * 24, 25, 64, t512, 1, 0) == (True, False)  # first layer: K = 25
    assert triton_conv._igemm_gather(64 * 24 * 24, k, 64, t512, -1, 4) == (False, False)  # input gradient
    # ... unless taken over its gradient bordered with 4 zeros: 28 x 28 in, 24 x 24 out, unmasked
    assert triton_conv._igemm_gather(64 * 24 * 24, k, 64, t512, 1, 0) == (True, True)
    assert triton_conv._igemm_gather(32 * 32 * 32, 9 * 32, 64, t512, 1, -1) == (False, False)  # padding 1
    # 50 K blocks of 32, 5 a program (KSUB): 10 x 10 clients programs a chunk; 6 chunks make ~512, and 8
    # is the nearest count that divides the 400 row blocks
    assert triton_conv._wgrad_ksub(k, WGRAD_GPU, m, 64, 10) == 5
    assert triton_conv._wgrad_split(m, k, 64, 10, 0, WGRAD_GPU) == (8, 3200, True, True)
    assert triton_conv._wgrad_ksub(9 * 64, WGRAD_GPU) == 3 and triton_conv._wgrad_ksub(25, WGRAD_GPU) == 1
    assert triton_conv._wgrad_ksub(7 * 32, WGRAD_GPU) == 1  # 7 blocks: no count from 2 to 5 divides them
    # CIFAR-10's 6x6 -> 4x4 layer (one chunk of 512 rows): 18 blocks / 3 x 10 clients = 60 programs < 132
    assert triton_conv._wgrad_ksub(9 * 64, WGRAD_GPU, 32 * 4 * 4, 64, 10) == 1
    assert triton_conv._wgrad_ksub(9 * 64, WGRAD_GPU, 32 * 13 * 13, 64, 10) == 3
    # padded layers with more than one K block reduce 32 rows at a time; first layers as before
    monkeypatch.setattr(triton_conv, "WGRAD_TILES", WGRAD_GPU)  # the GPU's (the interpreter's are larger)
    monkeypatch.setattr(triton_conv, "WGRAD_TILES_PADDED", triton_conv.Tiles(32, 64, 32))
    assert triton_conv.wgrad_tiles(1, 9 * 64) == triton_conv.Tiles(32, 64, 32)
    assert triton_conv.wgrad_tiles(1, 27) == triton_conv.wgrad_tiles(0, 9 * 64) == WGRAD_GPU
    assert triton_conv._wgrad_split(32 * 32 * 32, 9 * 32, 64, 10, 1, WGRAD_GPU)[2:] == (False, False)
    for g, b, h, w, ci, co, kk, pad in EVEN_SHAPES:
        mm = b * (h - kk + 1) * (w - kk + 1)
        assert triton_conv._igemm_gather(mm, kk * kk * ci, co, IGEMM_GPU[0], 1, 0) == (True, True)
        assert triton_conv._wgrad_split(mm, kk * kk * ci, co, g, 0, WGRAD_GPU)[2:] == (True, True)
    assert triton_conv._wgrad_split(24 * 64, 9 * 32, 16, 2, 0, WGRAD_GPU)[:2] == (3, 512)
    # the split with one K block a program and 1024 programs: 50 x 10 programs a chunk
    assert triton_conv._wgrad_split(m, k, 64, 10, 0, WGRAD_GPU, programs=1024, ksub=1) == (4, 6400, True, True)


@on_cpu
@pytest.mark.parametrize("shape,most", [(SHAPES[7], 2), (SHAPES[7], 5), (SHAPES[5], 3), (SHAPES[6], 5),
                                        (EVEN_SHAPES[0], 3), (EVEN_SHAPES[1], 5)])
def test_weight_gradient_sub_blocks_equal_conv2d(shape: tuple[int, ...], most: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The weight-gradient kernel computing several K blocks a program (KSUB up to ``most``; the
    multiprocessor count that would keep small layers at one set to 1) gives conv2d's gradients, unpadded
    (separable, masked and EVEN) and padded (bounds-tested), with a last K block partly empty (Cin 70)."""
    monkeypatch.setattr(triton_conv, "SMS", 1)
    monkeypatch.setattr(triton_conv, "WGRAD_KSUB", most)
    monkeypatch.setattr(triton_conv, "IGEMM_TILES", IGEMM_GPU[0])
    monkeypatch.setattr(triton_conv, "WGRAD_TILES", WGRAD_GPU)
    monkeypatch.setattr(triton_conv, "WGRAD_TILES_PADDED", triton_conv.Tiles(32, 64, 32))
    monkeypatch.setattr(triton_conv, "WGRAD_PROGRAMS", 512)
    used = []
    real = triton_conv._wgrad_ksub
    monkeypatch.setattr(triton_conv, "_wgrad_ksub", lambda *a: used.append(real(*a)) or used[-1])
    _check(shape, True)
    g, b, h, w, ci, co, k, pad = shape
    blocks = -(-k * k * ci // 32)
    assert used[-1] == max(j for j in range(1, most + 1) if blocks % j == 0) > 1


@on_cpu
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[7]] + EVEN_SHAPES)
def test_separable_gather_equals_conv2d(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """The separable gather of unpadded layers (partial tiles masked, and the unmasked EVEN path) gives
    conv2d's convolution and gradients (float64, the GPU's tiles, a split weight-gradient reduction); the
    input gradient takes the bounds-tested gather."""
    monkeypatch.setattr(triton_conv, "IGEMM_TILES", IGEMM_GPU[0])
    monkeypatch.setattr(triton_conv, "WGRAD_TILES", WGRAD_GPU)
    monkeypatch.setattr(triton_conv, "WGRAD_PROGRAMS", 1024)
    _check(shape, True)


def _check_bordered(shape: tuple[int, ...], relu_input: bool, monkeypatch: pytest.MonkeyPatch,
                    dtype: torch.dtype = torch.float64, device: str = "cpu", tol: float = 1e-11) -> None:
    """conv_nhwc(grad_padded=True) with its output's gradient handed back as the inside of a zero-bordered
    buffer, and again as a contiguous tensor: conv2d's gradients both times, the input gradient of the
    first by the separable gather over the buffer (SGN 1, no offset), of the second bounds-tested."""
    calls = []
    real = triton_conv._igemm
    monkeypatch.setattr(triton_conv, "_igemm", lambda a, *r, **k: calls.append((tuple(a.shape), r[7], r[8])) or
                        real(a, *r, **k))
    g, b, h, w, ci, co, k, pad = shape
    gen = torch.Generator().manual_seed(sum(shape) + 7)
    x = torch.randn(g, b, h, w, ci, generator=gen, dtype=torch.float64)
    if relu_input:  # x is a ReLU's output (zeros included), whose backward the input-gradient kernel applies
        x = x.clamp_min(0.0)
    wt = torch.randn(g, co, ci, k, k, generator=gen, dtype=torch.float64)
    bs = torch.randn(g, co, generator=gen, dtype=torch.float64)
    oh, ow, q = h + 2 * pad - k + 1, w + 2 * pad - k + 1, k - 1 - pad
    buf = torch.zeros(g, b, oh + 2 * q, ow + 2 * q, co, dtype=torch.float64)
    buf[:, :, q:q + oh, q:q + ow] = torch.randn(g, b, oh, ow, co, generator=gen, dtype=torch.float64)
    buf = buf.to(device, dtype)
    gy = buf[:, :, q:q + oh, q:q + ow]
    assert triton_conv.padded_base(gy, q).data_ptr() == buf.data_ptr()
    for bordered in (True, False):
        calls.clear()
        ins = [t.to(device, dtype).requires_grad_() for t in (x, wt, bs)]
        refs = [t.to(device, dtype).requires_grad_() for t in (x, wt, bs)]
        y = triton_conv.conv_nhwc(ins[0], ins[1], ins[2], pad, grad_padded=True, relu_input=relu_input)
        # relu_input: the same convolution, and the gradient at x passes x's ReLU (x = relu(x) here)
        want = _reference(refs[0].relu() if relu_input else refs[0], refs[1], refs[2], pad)
        y.backward(gy if bordered else gy.contiguous())
        want.backward(gy)
        for a, r in zip(ins, refs):
            torch.testing.assert_close(a.grad, r.grad, rtol=tol, atol=tol * r.grad.abs().max().item())
        assert calls[-1] == (((g, b, oh + 2 * q, ow + 2 * q, co), 1, 0) if bordered else ((g, b, oh, ow, co), -1, pad))


@on_cpu
@pytest.mark.parametrize("relu_input", [False, True])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[4], SHAPES[7]] + EVEN_SHAPES)
def test_input_gradient_from_a_zero_bordered_gradient_equals_conv2d(shape: tuple[int, ...], relu_input: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``grad_padded``, a gradient handed back as the inside of a buffer bordered by KH - 1 -
    padding zeros gives conv2d's input, weight and bias gradients (float64, the GPU's tiles), the input
    gradient computed by the separable gather (SGN = 1, no offset: the window turned by 180 degrees over
    the buffer) and the weight gradient reading the gradient at the buffer's strides; a contiguous
    gradient (what autograd hands on where it sums several) takes the bounds-tested path."""
    monkeypatch.setattr(triton_conv, "IGEMM_TILES", IGEMM_GPU[0])
    monkeypatch.setattr(triton_conv, "WGRAD_TILES", WGRAD_GPU)
    monkeypatch.setattr(triton_conv, "WGRAD_PROGRAMS", 1024)
    _check_bordered(shape, relu_input, monkeypatch)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(10, 64, 24, 24, 64, 64, 5, 0), (4, 32, 32, 32, 64, 64, 3, 1)])
def test_cuda_input_gradient_from_a_zero_bordered_gradient_in_full_fp32(shape: tuple[int, ...],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same on the GPU, fmnist's second layer (its input-gradient kernel unmasked) and a padded layer, TF32
    off: equal to cuDNN's gradients up to summation order, bordered or not."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _check_bordered(shape, True, monkeypatch, torch.float32, "cuda", tol=1e-4)


@on_cpu
def test_input_gradient_tiles_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """DGRAD_TILES: the bounds-tested input-gradient kernel runs under its own tiles (the forward's stay,
    and the zero-bordered one takes the forward's choice), and the gradients are still conv2d's."""
    monkeypatch.setattr(triton_conv, "IGEMM_TILES", IGEMM_GPU[3])
    monkeypatch.setattr(triton_conv, "DGRAD_TILES", IGEMM_GPU[1])
    monkeypatch.setattr(triton_conv, "WGRAD_TILES", WGRAD_GPU)
    tiles = []
    real = triton_conv._igemm
    monkeypatch.setattr(triton_conv, "_igemm", lambda *a, **k: tiles.append(a[10] if len(a) > 10 else None)
                        or real(*a, **k))
    _check(SHAPES[7], True)
    assert tiles == [None, IGEMM_GPU[1]]  # the forward's from igemm_tiles (IGEMM_TILES), the input gradient's own
    tiles.clear()
    _check_bordered(SHAPES[7], False, monkeypatch)  # bordered, then the same gradient contiguous
    assert tiles == [None, None, None, IGEMM_GPU[1]]


def test_padded_base_recognises_only_the_inside_of_a_bordered_buffer() -> None:
    buf = torch.zeros(2, 3, 9, 8, 4)
    inside = buf[:, :, 2:7, 2:6]
    assert triton_conv.padded_base(inside, 2).data_ptr() == buf.data_ptr()
    assert triton_conv.padded_base(inside, 1) is None  # another border
    assert triton_conv.padded_base(buf[:, :, 1:8, 1:7], 2) is None  # not centred
    assert triton_conv.padded_base(inside.contiguous(), 2) is None
    assert triton_conv.padded_base(inside, 0) is None
    with pytest.raises(ValueError, match="grad_padded"):
        triton_conv.conv_nhwc(torch.zeros(1, 1, 6, 6, 2), torch.zeros(1, 3, 2, 3, 3), epilogue="relu",
                              grad_padded=True)


def test_bad_shapes_and_unsupported_layers_are_named() -> None:
    with pytest.raises(ValueError, match="do not match"):
        triton_conv.conv_nhwc(torch.zeros(2, 1, 8, 8, 3), torch.zeros(2, 4, 2, 3, 3))  # Cin 3 vs 2
    with pytest.raises(ValueError, match="do not match"):
        triton_conv.conv_nhwc(torch.zeros(1, 8, 8, 3), torch.zeros(1, 4, 3, 3, 3))  # no client dimension
    assert triton_conv.supported(nn.Conv2d(3, 4, 3, padding=1))
    assert not triton_conv.supported(nn.Conv2d(3, 4, 3, stride=2))
    assert not triton_conv.supported(nn.Conv2d(3, 4, 3, dilation=2))
    assert not triton_conv.supported(nn.Conv2d(4, 4, 3, groups=2))
    assert not triton_conv.supported(nn.Conv2d(3, 4, 3, padding=(1, 0)))

    class Strided(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.Flatten())
            self.head = nn.Linear(2 * 3 * 3, 10)

    model = Strided()
    params = {k: v.unsqueeze(0) for k, v in model.named_parameters()}
    with pytest.raises(NotImplementedError, match="layout 'triton' needs a stride-1"):
        stacked.stacked_logits(model, params, torch.zeros(1, 2, 1, 8, 8), layout="triton")
    assert stacked.stacked_logits(model, params, torch.zeros(1, 2, 1, 8, 8), layout="grouped").shape == (1, 2, 10)


def test_triton_layout_refuses_the_cpu_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from robustfl.engine import EngineOptions
    from robustfl.engine.train import train_vectorised

    monkeypatch.setattr(triton_conv, "INTERPRET", False)  # as when imported without TRITON_INTERPRET
    model = build_model("digits_cnn", 10, 1)
    x = torch.zeros(8, 8, 8, 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="conv 'triton' needs a CUDA device"):
        train_vectorised(model, model_to_flat(model), x, torch.zeros(8, dtype=torch.long), [torch.arange(8)],
                         epochs=1, batch_size=4, lr=1e-3, generator=torch.Generator(),
                         options=EngineOptions(conv="triton"))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("shape", SHAPES + [(10, 64, 24, 24, 64, 64, 5, 0), (4, 32, 32, 32, 64, 64, 3, 1)])
def test_cuda_kernels_equal_conv2d_in_full_fp32(shape: tuple[int, ...]) -> None:
    """On the GPU with TF32 off the kernels use full-precision FMAs: equal to cuDNN up to summation order."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        _check(shape, True, torch.float32, "cuda", tol=1e-4)
    finally:
        torch.backends.cudnn.allow_tf32 = old


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_kernels_run_on_the_tensors_gpu_not_the_current_one() -> None:
    """Tensors on cuda:1 while the current device is cuda:0: the kernels launch on the tensors' card."""
    torch.cuda.set_device(0)
    _check((2, 3, 9, 9, 4, 8, 3, 1), True, torch.float32, "cuda:1", tol=1e-2)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("epilogue", ["relu", "pool_relu"])
@pytest.mark.parametrize("shape", EPI_SHAPES + [(10, 32, 32, 32, 3, 64, 3, 0), (4, 32, 64, 64, 32, 64, 3, 1)])
def test_cuda_fused_epilogues_equal_relu_and_max_pool_in_full_fp32(shape: tuple[int, ...], epilogue: str) -> None:
    """The compiled kernels' epilogues on the GPU (TF32 off), on small-integer inputs whose pooling
    windows hold exact ties: values and gradients as F.conv2d, F.relu, F.max_pool2d."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        _check(shape, True, torch.float32, "cuda", tol=1e-5, epilogue=epilogue, ties=True)
    finally:
        torch.backends.cudnn.allow_tf32 = old


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_tf32_and_bf16_stay_close_to_fp32() -> None:
    """TF32 (the default, as cuDNN) and bf16 autocast: the paper's fmnist layer within each format's
    rounding of the float64 result (relative error of the output's norm)."""
    torch.manual_seed(0)
    x = torch.randn(10, 64, 24, 24, 64, device="cuda")
    w = torch.randn(10, 64, 64, 5, 5, device="cuda") / 40
    want = _reference(x.double(), w.double(), None, 0)
    got = triton_conv.conv_nhwc(x, w)
    assert ((got.double() - want).norm() / want.norm()).item() < 2e-3
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got16 = triton_conv.conv_nhwc(x, w)
    assert got16.dtype == torch.bfloat16
    assert ((got16.double() - want).norm() / want.norm()).item() < 1e-2


def _relu_pair(device: str, dtype: torch.dtype, hand_on: bool, ties: bool) -> list[torch.Tensor]:
    """conv -> ReLU (epilogue) -> conv on fmnist-like shapes (5x5, 1 -> 6 -> 5 channels, 2 clients),
    the ReLU's backward in the first convolution (``hand_on`` False) or handed on to the second's
    input-gradient kernel; returns the output and the gradients of input, weights and biases."""
    gen = torch.Generator().manual_seed(3)
    rand = ((lambda *sz: torch.randint(-2, 3, sz, generator=gen).double()) if ties else
            (lambda *sz: torch.randn(*sz, generator=gen, dtype=torch.float64)))
    ts = [rand(2, 3, 12, 12, 1), rand(2, 6, 1, 5, 5), rand(2, 6), rand(2, 5, 6, 5, 5), rand(2, 5)]
    if ties:  # many exact zeros at the ReLU: the mask's strictness matters
        ts[2].zero_()
    x, w1, b1, w2, b2 = [t.to(device, dtype).requires_grad_() for t in ts]
    h = triton_conv.conv_nhwc(x, w1, b1, 0, "relu", grad_masked=hand_on)
    y = triton_conv.conv_nhwc(h, w2, b2, 1, "none", relu_input=hand_on)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    (y * gy).sum().backward()
    return [y.detach()] + [t.grad for t in (x, w1, b1, w2, b2)]


@on_cpu
@pytest.mark.parametrize("ties", [False, True])
def test_relu_backward_handed_to_the_next_convolution_gives_the_same_gradients(ties: bool) -> None:
    """conv -> ReLU -> conv with the ReLU's backward in the second convolution's input-gradient
    kernel (what the stacked engine does for conv -> ReLU -> conv) against the ReLU's own backward pass: the same output and
    gradients (float64, interpreter), also where the first convolution's output is exactly 0."""
    for a, b in zip(_relu_pair("cpu", torch.float64, True, ties), _relu_pair("cpu", torch.float64, False, ties)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="grad_masked"):
        triton_conv.conv_nhwc(torch.zeros(1, 1, 6, 6, 1, dtype=torch.float64),
                              torch.zeros(1, 2, 1, 3, 3, dtype=torch.float64), grad_masked=True)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_relu_backward_handed_to_the_next_convolution() -> None:
    """The same on the GPU's compiled kernels in full fp32, on small integers (exact)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        got, want = (_relu_pair("cuda", torch.float32, h, True) for h in (True, False))
    finally:
        torch.backends.cudnn.allow_tf32 = old
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


@on_cpu
def test_stacked_hands_the_relu_backward_on_only_between_two_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    """stacked_logits flags exactly fmnist's conv -> ReLU -> conv pair (not a convolution followed by a
    pool or a flatten), borders the second convolution's gradient with zeros where the ReLU - Dropout -
    Flatten kernel follows it, and the step's gradients are the grouped layout's (float64)."""
    calls = []
    real = triton_conv.conv_nhwc
    monkeypatch.setattr(triton_conv, "conv_nhwc", lambda *a, **k: calls.append(k) or real(*a, **k))
    found = []
    real_base = triton_conv.padded_base
    monkeypatch.setattr(triton_conv, "padded_base", lambda *a: found.append(real_base(*a) is not None) or real_base(*a))
    torch.manual_seed(0)
    model = build_model("fmnist_cnn", 10, 1, dropout=False).double()
    spec = ParamSpec(model)
    flats = model_to_flat(model).double().unsqueeze(0) + 0.01 * torch.randn(2, spec.dim, dtype=torch.float64)
    x = torch.rand(2, 3, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (2, 3))
    mask = torch.ones(2, 3, dtype=torch.float64)
    params = [flats[:, a:b].reshape(2, *s) for s, (a, b) in zip(spec.shapes, spec.slices)]
    got = stacked.stacked_grads(model, spec.names, params, x, y, mask, layout="triton")
    assert [(k["relu_input"], k["grad_masked"], k.get("grad_padded", False)) for k in calls] == [
        (False, True, False), (True, False, True)]
    assert found == [True]  # the backward found the bordered buffer
    want = stacked.stacked_grads(model, spec.names, params, x, y, mask, layout="grouped")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    calls.clear()  # CIFAR-10's convolutions are followed by pools: nothing to hand on
    cifar = build_model("cifar10_cnn", 10, 3).double()
    params = ParamSpec(cifar).unflatten(model_to_flat(cifar).unsqueeze(0))
    stacked.stacked_logits(cifar, params, torch.rand(1, 1, 3, 32, 32, dtype=torch.float64), layout="triton")
    assert len(calls) == 3 and all(not k["relu_input"] and not k["grad_masked"] for k in calls)


@on_cpu
def test_stacked_triton_layout_on_a_packed_step_equals_grouped() -> None:
    """The stacked engine's ``triton`` layout (NHWC activations, pooled channels-last, flattened back
    to C, H, W order) gives the grouped layout's logits for the paper's CIFAR-10 network (float64)."""
    torch.manual_seed(0)
    model = build_model("cifar10_cnn", 10, 3).double().eval()
    spec = ParamSpec(model)
    flats = model_to_flat(model).double().unsqueeze(0) + 0.01 * torch.randn(2, spec.dim, dtype=torch.float64)
    params = spec.unflatten(flats)  # views into one flat tensor: non-contiguous biases
    x = torch.rand(2, 3, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(stacked.stacked_logits(model, params, x, layout="triton"),
                               stacked.stacked_logits(model, params, x, layout="grouped"), rtol=1e-10, atol=1e-12)
