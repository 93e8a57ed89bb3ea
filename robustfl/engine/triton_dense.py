"""Per-client dense layers' forward product with a long inner dimension, as a split-K Triton kernel.

The stacked engine computes n clients' dense layer ``y[g] = x[g] W[g]^T`` as one batched product
(:func:`robustfl.engine.stacked.dense`). For the fmnist network's first dense layer (Table 6: 25,600 inputs,
128 outputs, batch 64) each client's product is one 64 x 128 output tile over K = 25,600: cuBLAS's
batched FP32 kernel ran it as 8 small tiles per client, each looping over all of K, i.e. 80 programs
for 10 clients on a GPU with 132 multiprocessors, ~0.75 ms a step (5.6 TFLOP/s;
an H100 step profile by bench/profile_step.py). Here K is split into S chunks, one program per
(client, chunk, output tile), whose fp32 partial products are added by ``torch.sum`` in a fixed
order (no atomics: the result does not depend on the order programs run in):

    y[g, m, n] = sum_s sum_{k in chunk s} x[g, m, k] W[g, n, k]

(:func:`bmm` takes operands at any strides; the layer's backward products stay with cuBLAS, which
was faster for them: bench/results/dense_products_h100.json).

Precision. bf16 inputs accumulate in fp32. fp32 inputs use one-pass TF32 when
``torch.backends.cuda.matmul.allow_tf32`` is on (what cuBLAS would do; the engine's ``precision:
tf32``). With it off (the engine's ``precision: fp32``, PyTorch's default) they use ``"tf32x3"``,
the three-product split of each operand into a TF32 part and a TF32
remainder, ``a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi`` (the 3xTF32 of NVIDIA's CUTLASS), whose error
against the float64 product was smaller than cuBLAS's FP32 kernel's on every product measured
(fmnist's layer: 2.2e-7 against 7.0e-6 of the largest output, the split sums being shorter; one-pass
TF32: 8.3e-4), at 2.1x the speed of the kernel's FP32 FMAs (``"ieee"``).
On a machine without a GPU the kernel runs in Triton's interpreter when ``TRITON_INTERPRET=1``
is set before import (tests/test_triton_dense.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from robustfl.engine.triton_conv import INTERPRET, SMS, Tiles, acc_dtypes, on_device

#: the stacked engine's dense layers use the split-K kernel on the GPU from this many inputs on:
#: fmnist's 25,600-input layer (H100, 10 clients: cuBLAS 0.77 ms, FP32 FMAs 0.23, tf32x3 0.11; 90
#: clients 1.42 / 2.22 / 0.84); Kather's 2,048 were as fast by cuBLAS (10 clients 0.068 / 0.072 /
#: 0.079 ms, 90: 0.090 / 0.196 / 0.088) and CIFAR-10's 256 faster (bench/results/dense_products_h100.json)
MIN_K = 8192
#: output tile, K block and launch settings of one program (one 64 x 128 tile covers a paper client's
#: whole output)
TILES = Tiles(bm=64, bn=128, bk=32, num_warps=4, num_stages=3)
#: split K until about this many programs run (four per multiprocessor, the sweep's best at 10 clients;
#: one chunk in the interpreter, whose cost is per program)
PROGRAMS = 1 if INTERPRET else 4 * SMS


def pays(k: int, dtype: torch.dtype, tf32: bool) -> bool:
    """Whether split-K was measured faster than cuBLAS for a stack of (M x K) @ (K x N) products: full
    fp32 (TF32 off for matrix products, the default: there cuBLAS's FP32 kernel was the slow one; with
    TF32 or bf16 cuBLAS was as fast or faster) and K >= :data:`MIN_K` (at any client count: tf32x3 was
    faster at 90 clients too)."""
    return dtype == torch.float32 and not tf32 and k >= MIN_K


def wanted(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the stacked engine's dense layer ``x (G, M, K) @ w (G, N, K)^T`` runs its forward product
    here: a GPU layer where :func:`pays`."""
    return x.is_cuda and pays(w.shape[2], x.dtype, torch.backends.cuda.matmul.allow_tf32)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, out_ptr, M, N, K, CHUNK, sa_g, sa_m, sa_k, sb_g, sb_k, sb_n, G,
                 PREC: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[s, g, m, n] = sum over k of chunk s (k in [s*CHUNK, (s+1)*CHUNK) and < K) of a[g, m, k] b[g, k, n],
    operands at any strides (Triton specialises a stride of 1, so a unit-stride dimension loads
    coalesced), ``out`` contiguous (S, G, M, N). Grid: (cdiv(M, BM) * cdiv(N, BN), S, G)."""
    pid_mn = tl.program_id(0)
    s = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    tiles_n = tl.cdiv(N, BN)
    offs_m = (pid_mn // tiles_n) * BM + tl.arange(0, BM)
    offs_n = (pid_mn % tiles_n) * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_rows = a_ptr + g * sa_g + offs_m.to(tl.int64) * sa_m
    b_cols = b_ptr + g * sb_g + offs_n.to(tl.int64) * sb_n
    acc = tl.zeros((BM, BN), dtype=ACC)
    start = s * CHUNK
    for k0 in range(start, start + CHUNK, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        a = tl.load(a_rows[:, None] + offs_k[None, :] * sa_k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols[None, :] + offs_k[:, None] * sb_k, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    out = out_ptr + ((s * G + g) * M + offs_m[:, None]) * N + offs_n[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


def splits(k: int, tiles: int, programs: int, bk: int) -> tuple[int, int]:
    """(S, chunk): K split into S chunks of ``chunk`` inputs (a multiple of ``bk``, the last one partial)
    so that ``tiles * S`` programs reach about ``programs``, each chunk at least 4 blocks long."""
    s = max(1, min(triton.cdiv(programs, tiles), triton.cdiv(k, 4 * bk)))
    chunk = triton.cdiv(triton.cdiv(k, s), bk) * bk
    return triton.cdiv(k, chunk), chunk


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for operands of ``dtype``: for fp32, TF32 where
    ``torch.backends.cuda.matmul.allow_tf32`` is on (what cuBLAS would do; the engine's ``precision:
    tf32``), else ``"tf32x3"`` (module docstring); IEEE (exact products, fp32 accumulation) for other dtypes."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def bmm(a: torch.Tensor, b: torch.Tensor, *, tiles: Tiles | None = None, programs: int | None = None,
        precision: str | None = None) -> torch.Tensor:
    """``a[g] @ b[g]`` for ``a (G, M, K)``, ``b (G, K, N)`` at any strides: ``(G, M, N)`` fp32 (fp64 for
    fp64 operands), what ``torch.bmm`` computes, with the K reduction split over programs until about
    ``programs`` run (module docstring; ``tiles``, ``programs``: :data:`TILES`, :data:`PROGRAMS` by
    default; ``precision``: :func:`dot_precision`). Not differentiable itself."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"bmm: a (G, M, K) and b (G, K, N) do not match: {tuple(a.shape)}, {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"bmm: a and b dtypes differ: {a.dtype}, {b.dtype}")
    g, m, k = a.shape
    n = b.shape[2]
    t = TILES if tiles is None else tiles
    grid_mn = triton.cdiv(m, t.bm) * triton.cdiv(n, t.bn)
    s, chunk = splits(k, grid_mn * g, PROGRAMS if programs is None else programs, t.bk)
    acc_t, acc_tl = acc_dtypes(a.dtype)
    part = torch.empty(s, g, m, n, dtype=acc_t, device=a.device)
    with on_device(a):
        _gemm_kernel[(grid_mn, s, g)](a, b, part, m, n, k, chunk, a.stride(0), a.stride(1), a.stride(2),
                                      b.stride(0), b.stride(1), b.stride(2), g,
                                      PREC=dot_precision(a.dtype) if precision is None else precision, ACC=acc_tl,
                                      BM=t.bm, BN=t.bn, BK=t.bk, num_warps=t.num_warps, num_stages=t.num_stages)
    return part[0] if s == 1 else part.sum(0)


def bmm_nt(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, tiles: Tiles | None = None,
           programs: int | None = None, precision: str | None = None) -> torch.Tensor:
    """``x[g] @ w[g]^T (+ bias[g])`` for ``x (G, M, K)``, ``w (G, N, K)``, ``bias (G, N)``: ``(G, M, N)``
    in x's dtype, what ``torch.baddbmm(bias.unsqueeze(1), x, w.transpose(1, 2))`` computes, by
    :func:`bmm` (K split over programs; it refuses operands of different dtypes)."""
    if x.dim() != 3 or w.dim() != 3 or x.shape[0] != w.shape[0] or x.shape[2] != w.shape[2]:
        raise ValueError(f"bmm_nt: x (G, M, K) and w (G, N, K) do not match: {tuple(x.shape)}, {tuple(w.shape)}")
    y = bmm(x, w.transpose(1, 2), tiles=tiles, programs=programs, precision=precision)
    if bias is not None:
        y = y + bias.unsqueeze(1).to(y.dtype)
    return y.to(x.dtype)
