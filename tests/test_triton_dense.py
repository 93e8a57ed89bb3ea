"""robustfl.engine.triton_dense: the split-K per-client dense product against torch.baddbmm. On a machine
without a GPU the kernel runs in Triton's interpreter (see conftest.py), in float64, with several
split counts so that partial K blocks, partial chunks and partial output tiles all run."""
from __future__ import annotations

import pytest
import torch

from robustfl.engine import stacked
from robustfl.engine import triton_dense

CUDA = torch.cuda.is_available()
on_cpu = pytest.mark.skipif(not triton_dense.INTERPRET, reason="CPU tensors need Triton's interpreter "
                            "(TRITON_INTERPRET=1, set by conftest.py where there is no GPU)")


def _operands(g: int, m: int, n: int, k: int, dtype: torch.dtype = torch.float64,
              device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(g * 1000 + m + n + k)
    x = torch.randn(g, m, k, generator=gen, dtype=torch.float64)
    w = torch.randn(g, n, k, generator=gen, dtype=torch.float64)
    b = torch.randn(g, n, generator=gen, dtype=torch.float64)
    return x.to(device, dtype), w.to(device, dtype), b.to(device, dtype)


def test_split_arithmetic_covers_k_once() -> None:
    """splits(): chunks are whole K blocks, S chunks cover K, none is empty, about `programs` programs."""
    for k in (1, 31, 32, 300, 2048, 25_600):
        for tiles in (1, 10, 90, 500):
            for programs in (1, 7, 264):
                s, chunk = triton_dense.splits(k, tiles, programs, 32)
                assert chunk % 32 == 0 and s >= 1
                assert (s - 1) * chunk < k <= s * chunk  # the last chunk holds at least one input
                assert s == 1 or tiles * (s - 1) < programs  # no more splits than the programs wanted
    assert triton_dense.splits(25_600, 10, 264, 32) == (27, 960)  # fmnist's layer, 10 clients


@on_cpu
@pytest.mark.parametrize("programs", [1, 5, 64])
@pytest.mark.parametrize("shape", [(2, 64, 128, 300), (3, 5, 10, 97), (1, 70, 130, 64), (2, 3, 7, 1)])
def test_splitk_equals_baddbmm(shape: tuple[int, int, int, int], programs: int,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """x[g] w[g]^T + b[g] for every client, float64: M, N beyond one output tile, K not a multiple of
    the block, one to many chunks."""
    monkeypatch.setattr(triton_dense, "PROGRAMS", programs)
    x, w, b = _operands(*shape)
    want = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
    torch.testing.assert_close(triton_dense.bmm_nt(x, w, b), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(triton_dense.bmm_nt(x, w), torch.bmm(x, w.transpose(1, 2)), rtol=1e-12, atol=1e-12)


@on_cpu
def test_splitk_takes_strided_operands() -> None:
    """Operands that are views (a client slice of a flat parameter matrix, a transposed activation):
    the same product as on contiguous copies."""
    x, _, _ = _operands(3, 8, 16, 96)
    flat = torch.randn(3, 16 * 96 + 5, dtype=torch.float64)
    w_view = flat[:, 5:].view(3, 16, 96)  # stride(0) = 16 * 96 + 5
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)  # K not the unit-stride dimension
    torch.testing.assert_close(triton_dense.bmm_nt(x_t, w_view), torch.bmm(x, w_view.transpose(1, 2)),
                               rtol=1e-12, atol=1e-12)


@on_cpu
@pytest.mark.parametrize("programs", [1, 64])
def test_bmm_takes_operands_at_any_strides(programs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """bmm(a, b), float64, against torch.bmm: row-major operands, a transposed view (unit stride along M),
    one or several K chunks; mismatched shapes are named."""
    monkeypatch.setattr(triton_dense, "PROGRAMS", programs)
    x, w, _ = _operands(3, 70, 130, 300)  # x (G, M, K), w (G, N, K)
    dy = torch.randn(3, 70, 130, dtype=torch.float64)
    torch.testing.assert_close(triton_dense.bmm(dy, w), torch.bmm(dy, w), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(triton_dense.bmm(dy.transpose(1, 2), x), torch.bmm(dy.transpose(1, 2), x),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="do not match"):
        triton_dense.bmm(dy, x)


@on_cpu
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_layer_with_splitk_equals_autograd(with_bias: bool) -> None:
    """stacked's dense layer with its forward product here (what it runs on the GPU where
    robustfl.engine.triton_dense.wanted says so): values and the gradients of x, W and b as autograd's baddbmm."""
    x, w, b = _operands(2, 9, 20, 150)
    b = b if with_bias else None
    ins = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    refs = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = stacked._Dense.apply(ins[0], ins[1], ins[2], True)
    want = torch.bmm(refs[0], refs[1].transpose(1, 2)) + (refs[2].unsqueeze(1) if with_bias else 0)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    (want * gy).sum().backward()
    for a, r in zip(ins, refs):
        if a is not None:
            torch.testing.assert_close(a.grad, r.grad, rtol=1e-12, atol=1e-12)


def test_split_k_only_where_it_was_measured_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """pays(): fmnist's 25,600-input layer in full fp32 (tf32x3); not with TF32 or bf16, not Kather's
    2,048 or CIFAR-10's 256 inputs; CPU tensors never."""
    monkeypatch.setattr(triton_dense, "MIN_K", 8192)
    f32 = torch.float32
    assert triton_dense.pays(25_600, f32, tf32=False)
    assert not triton_dense.pays(25_600, f32, tf32=True)
    assert not triton_dense.pays(25_600, torch.bfloat16, tf32=False)
    assert not triton_dense.pays(2048, f32, tf32=False)  # Kather's layer
    assert not triton_dense.pays(256, f32, tf32=False)  # CIFAR-10's
    assert triton_dense.pays(8192, f32, tf32=False)
    x, w, _ = _operands(10, 64, 128, 8192, torch.float32)
    assert not triton_dense.wanted(x, w)


def test_bad_operands_are_named() -> None:
    x, w, _ = _operands(2, 4, 6, 8)
    with pytest.raises(ValueError, match="do not match"):
        triton_dense.bmm_nt(x, w[:, :, :7])
    with pytest.raises(ValueError, match="dtypes differ"):
        triton_dense.bmm_nt(x, w.float())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_dense_layer_with_splitk_is_as_exact_as_cublas(monkeypatch: pytest.MonkeyPatch) -> None:
    """stacked.dense on the GPU at fmnist's first dense layer (10 clients, batch 64, 25,600 -> 128), full
    fp32 (TF32 off), with its forward product here (three TF32 products): the output
    against its float64 value no further off than cuBLAS's FP32 product (twice its error; one-pass TF32
    would be ~1e-3 of the outputs), and the gradients (cuBLAS's products) likewise; the kernel in bf16
    within bf16's rounding."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x, w, b = _operands(10, 64, 128, 25_600, torch.float32, "cuda")
    w = w / 25_600 ** 0.5
    ins = [t.clone().requires_grad_() for t in (x, w, b)]
    refs = [t.clone().requires_grad_() for t in (x, w, b)]
    exacts = [t.double().requires_grad_() for t in (x, w, b)]
    y = stacked._Dense.apply(*ins, True)
    want = stacked._Dense.apply(*refs, False)  # cuBLAS
    exact = torch.baddbmm(exacts[2].unsqueeze(1), exacts[0], exacts[1].transpose(1, 2))
    gy = torch.randn_like(y)
    for t, g in ((y, gy), (want, gy), (exact, gy.double())):
        (t * g).sum().backward()

    def off(a: torch.Tensor, e: torch.Tensor) -> float:
        return (a.double() - e).abs().max().item()

    for name, got, ref, ex in [("y", y, want, exact)] + [(n, a.grad, r.grad, e.grad) for n, a, r, e in
                                                         zip(("dx", "dw", "db"), ins, refs, exacts)]:
        err, err_cublas = off(got, ex.detach()), off(ref, ex.detach())
        assert err <= max(2 * err_cublas, 1e-6 * ex.abs().max().item()), (name, err, err_cublas)
    y16 = triton_dense.bmm_nt(x.bfloat16(), w.bfloat16(), b.bfloat16())  # the kernel in bf16 (fp32 sums)
    assert y16.dtype == torch.bfloat16
    assert ((y16.double() - exact.detach()).norm() / exact.detach().norm()).item() < 1e-2
