"""Per-client 2-d convolution (one weight tensor per client) as implicit-GEMM Triton kernels, NHWC.

cuDNN computes n clients' convolutions as one grouped convolution (``groups = n``), which on an H100
ran the fmnist network's 64->64 5x5 layer at ~28 TFLOP/s (bench/results/stacked_layouts_fmnist_h100.json), far
below the matrix units' rate. Here each client's convolution is the matrix product

    y[g, (b, oh, ow), co] = sum_{(kh, kw, ci)} x[g, b, oh + kh - P, ow + kw - P, ci] * w[g, co, ci, kh, kw]

(M = B*OH*OW rows, K = KH*KW*Cin, N = Cout), with the im2col matrix never written out: each program
gathers its tile of it from the NHWC input (zero outside the image, which is the padding P). The
backward pass is two more such products:

* input gradient: dx[g, (b, ih, iw), ci] = sum_{(kh, kw, co)} dy[g, b, ih - kh + P, iw - kw + P, co] * w[g, co, ci, kh, kw]
  (the same kernel with the offsets' sign flipped; or, where the gradient arrives as the inside of a
  zero-bordered buffer, the same kernel over that buffer with the window turned: :func:`padded_base`);
* weight gradient: dw[g, (kh, kw, ci), co] = sum_{(b, oh, ow)} x[g, b, oh + kh - P, ow + kw - P, ci] * dy[g, b, oh, ow, co],
  a reduction over M split into S chunks whose fp32 partial sums are added by ``torch.sum``
  (no atomics, so the result does not depend on the order programs run in); each program computes up
  to 5 blocks of the output from one read of each dy tile (:data:`WGRAD_KSUB`).

The ReLU, or the 2x2 max-pool and ReLU, after a convolution can run in the forward kernel's epilogue
(``conv_nhwc(..., epilogue=...)``; robustfl.engine.stacked does so for the paper's networks): the pool writes
its output and a one-byte code per output naming its window's maximum, never the full-size
convolution output. The backward forms the gradient at the convolution's output once (from the codes
in one pass, :func:`_unpool_kernel`, instead of PyTorch's zero-fill and scatter; the ReLU's mask from
its output) and hands it to the two gradient kernels (the weight-gradient kernel also sums the bias
gradient where K is one block, a first layer; :func:`_wgrad`). (Applying the mask or the pool's
routing inside the gradient kernels instead, on every one of their re-reads of the gradient, was
measured 1.2x (fmnist) and 1.4x (Kather) slower per step on an H200:
bench/results/conv_epilogues_in_gradient_kernels_h200.json.)

Stride 1 and dilation 1 only (every convolution of :mod:`robustfl.models`); :func:`supported` says
whether a layer qualifies. fp32 inputs use TF32 matrix units when ``torch.backends.cudnn.allow_tf32``
is on (PyTorch's default for convolutions, so the same precision cuDNN uses), else full fp32; bf16
inputs accumulate in fp32. On a machine without a GPU the kernels run in Triton's interpreter when
``TRITON_INTERPRET=1`` is set before this module is imported (how tests/test_triton_conv.py checks
them against ``torch.nn.functional.conv2d``).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn


def supported(m: nn.Conv2d) -> bool:
    """Whether :func:`conv_nhwc` computes this layer: stride 1, dilation 1, one group, numeric zero padding."""
    return (tuple(m.stride) == (1, 1) and tuple(m.dilation) == (1, 1) and m.groups == 1
            and m.padding_mode == "zeros" and not isinstance(m.padding, str) and m.padding[0] == m.padding[1])


#: what the forward kernel applies to the convolution's output before storing it (its epilogue):
#: nothing, a ReLU, or a 2x2 stride-2 max-pool followed by a ReLU (the same function and gradient as
#: ReLU then pool: robustfl.engine.stacked._pool_before_relu)
EPILOGUES = ("none", "relu", "pool_relu")
#: the pool's code of a window whose maximum is not positive: the ReLU passes it no gradient (the
#: kernels write and compare this value as the literal 4; tests/test_triton_conv.py checks the codes)
DEAD = 4


@triton.jit
def _rows(offs_m, HOUT, WOUT, PH, PW, POOL: tl.constexpr):
    """Output pixel (b, oh, ow) of GEMM row m: raster order, or (POOL) 2x2 windows in raster order of the
    pooled grid (PH, PW), m = ((b*PH + ph)*PW + pw)*4 + q and (oh, ow) = (2ph + q // 2, 2pw + q % 2)."""
    if POOL:
        q = offs_m % 4
        t = offs_m // 4
        pw = t % PW
        t = t // PW
        ph = t % PH
        bb = t // PH
        oh = 2 * ph + q // 2
        ow = 2 * pw + q % 2
    else:
        hw = HOUT * WOUT
        bb = offs_m // hw
        rem = offs_m % hw
        oh = rem // WOUT
        ow = rem % WOUT
    return bb, oh, ow


@triton.jit
def _load(ptrs, mask, EVEN: tl.constexpr):
    """``ptrs``' values, 0 where ``mask`` is off; EVEN (every lane in bounds): unmasked."""
    if EVEN:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=mask, other=0.0)
    return v


@triton.jit
def _igemm_kernel(a_ptr, w_ptr, b_ptr, y_ptr, code_ptr, M, HIN, WIN, HOUT, WOUT, PH, PW, a_sg, y_sg, w_sg, w_sk, w_sn,
                  CIN: tl.constexpr, COUT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                  SGN: tl.constexpr, OFF: tl.constexpr, EPI: tl.constexpr, HAS_BIAS: tl.constexpr,
                  PREC: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  SEP: tl.constexpr = False, EVEN: tl.constexpr = False):
    """y[g, m, n] = epilogue(sum_k A[g, m, k] w[g, k, n] (+ b[g, n])), w at strides (w_sg, w_sk, w_sn) (K-major,
    w_sk = 1, as :func:`gemm_weight` lays it out, or N-major, w_sn = 1); A gathered from a (G, B, HIN, WIN,
    CIN): row m = (b, oh, ow) of the output grid (:func:`_rows`; 2x2 windows for EPI 2), column
    k = (kh, kw, ci), A = a[g, b, oh + SGN*kh + OFF, ow + SGN*kw + OFF, ci] (0 outside). EPI 0: y as is;
    1: max(y, 0); 2: each window's maximum, then max(., 0), stored pooled with the window position of
    the maximum in ``code`` (first of ties, as PyTorch's max-pool; :data:`DEAD` where the maximum is not
    positive); 3: y where ``code_ptr``'s tensor (here a float mask source laid out as y) is positive, else 0
(an input gradient through the ReLU that produced the convolution's input). SEP (a window that never
leaves the input: SGN = 1, OFF = 0): the gather's address split into a row part (b, oh, ow), computed
once, and a column part (kh, kw, ci) per K block, with no bounds test per element; EVEN (with SEP: M, K
and COUT whole multiples of the tiles): no masks at all. Grid: (cdiv(M, BM), cdiv(COUT, BN), G)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    K: tl.constexpr = KH * KW * CIN
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < COUT
    bb, oh, ow = _rows(offs_m, HOUT, WOUT, PH, PW, EPI == 2)
    if SEP:  # the row part of every address, once: input pixel (b, oh, ow)'s first channel
        a_rows = a_ptr + g * a_sg + bb * (HIN * WIN * CIN) + (oh * WIN + ow) * CIN
    else:
        a_rows = a_ptr + g * a_sg + bb * (HIN * WIN * CIN)
    w_base = w_ptr + g * w_sg
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        ci = offs_k % CIN
        t = offs_k // CIN
        kw = t % KW
        kh = t // KW
        w_ptrs = w_base + offs_k[:, None] * w_sk + offs_n[None, :] * w_sn
        if SEP:
            a = _load(a_rows[:, None] + ((kh * WIN + kw) * CIN + ci)[None, :], m_ok[:, None] & k_ok[None, :], EVEN)
        else:
            ih = oh[:, None] + SGN * kh[None, :] + OFF
            iw = ow[:, None] + SGN * kw[None, :] + OFF
            ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < HIN) & (iw >= 0) & (iw < WIN)
            a = tl.load(a_rows[:, None] + (ih * WIN + iw) * CIN + ci[None, :], mask=ok, other=0.0)
        wv = _load(w_ptrs, k_ok[:, None] & n_ok[None, :], EVEN)
        acc = tl.dot(a, wv, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + g * COUT + offs_n, mask=n_ok, other=0.0).to(ACC)[None, :]
    if EPI == 2:
        mx, q = tl.max(tl.reshape(acc, (BM // 4, 4, BN)), axis=1, return_indices=True,
                       return_indices_tie_break_left=True)
        offs_p = pid_m * (BM // 4) + tl.arange(0, BM // 4)
        p_mask = (offs_p < M // 4)[:, None] & n_ok[None, :]
        p_off = g * y_sg + offs_p[:, None] * COUT + offs_n[None, :]
        tl.store(y_ptr + p_off, tl.maximum(mx, 0.0).to(y_ptr.dtype.element_ty), mask=p_mask)
        tl.store(code_ptr + p_off, tl.where(mx > 0, q, 4).to(tl.uint8), mask=p_mask)
    else:
        y_off = g * y_sg + offs_m[:, None] * COUT + offs_n[None, :]
        y_mask = m_ok[:, None] & n_ok[None, :]
        if EPI == 1:
            acc = tl.maximum(acc, 0.0)
        if EPI == 3:
            acc = tl.where(tl.load(code_ptr + y_off, mask=y_mask, other=0.0) > 0, acc, 0.0)
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _unpool_kernel(dyp_ptr, code_ptr, dz_ptr, TOTAL, OH, OW, PH, PW, C: tl.constexpr, BLOCK: tl.constexpr):
    """The gradient at a convolution's output (G*B, OH, OW, C) from the gradient ``dyp`` at its pool +
    ReLU epilogue's output (G*B, PH, PW, C): each pooled gradient at its window's position named by
    ``code``, zero elsewhere (the other window positions, a dead window, the rows and columns of an odd
    OH, OW that no window covers). One pass writing every element once (PyTorch's max-pool backward
    zero-fills, then scatters)."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = e < TOTAL
    c = e % C
    t = e // C
    ow = t % OW
    t = t // OW
    oh = t % OH
    gb = t // OH
    win = ok & (oh < 2 * PH) & (ow < 2 * PW)
    p = ((gb * PH + oh // 2) * PW + ow // 2) * C + c
    code = tl.load(code_ptr + p, mask=win, other=4)
    v = tl.load(dyp_ptr + p, mask=win & (code == (oh % 2) * 2 + ow % 2), other=0.0)
    tl.store(dz_ptr + e, v, mask=ok)


@triton.jit
def _wgrad_cols(kk0, K: tl.constexpr, CIN: tl.constexpr, KW: tl.constexpr, BK: tl.constexpr):
    """The BK weight-gradient rows k = (kh, kw, ci) from ``kk0`` on: (k, in range, ci, kw, kh)."""
    offs_k = kk0 + tl.arange(0, BK)
    ci = offs_k % CIN
    t = offs_k // CIN
    return offs_k, offs_k < K, ci, t % KW, t // KW


@triton.jit
def _wgrad_dot(acc, d, x_base, cols, kk0, rows, bb, oh, ow, m_ok, HIN, WIN, K: tl.constexpr, CIN: tl.constexpr,
               KW: tl.constexpr, OFF: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, SEP: tl.constexpr,
               EVEN: tl.constexpr):
    """acc + A^T d for the BK weight-gradient rows from ``kk0`` and one block of GEMM rows: A's tile gathered
    at ``cols`` (the column part, SEP) + ``rows`` (the row part), or bounds-tested from (bb, oh, ow)."""
    offs_k, k_ok, ci, kw, kh = _wgrad_cols(kk0, K, CIN, KW, BK)
    if SEP:
        a_t = _load(cols[:, None] + rows[None, :], k_ok[:, None] & m_ok[None, :], EVEN)
    else:
        ih = oh[None, :] + kh[:, None] + OFF
        iw = ow[None, :] + kw[:, None] + OFF
        ok = k_ok[:, None] & m_ok[None, :] & (ih >= 0) & (ih < HIN) & (iw >= 0) & (iw < WIN)
        a_t = tl.load(x_base + bb[None, :] * (HIN * WIN * CIN) + (ih * WIN + iw) * CIN + ci[:, None],
                      mask=ok, other=0.0)
    return tl.dot(a_t, d, acc, input_precision=PREC)


@triton.jit
def _wgrad_col_part(x_base, kk0, WIN, K: tl.constexpr, CIN: tl.constexpr, KW: tl.constexpr, BK: tl.constexpr):
    """The column part (kh, kw, ci) of the separable gather's addresses of the BK rows from ``kk0``."""
    offs_k, k_ok, ci, kw, kh = _wgrad_cols(kk0, K, CIN, KW, BK)
    return x_base + ((kh * WIN + kw) * CIN + ci)


@triton.jit
def _wgrad_store(out_ptr, acc, kk0, s, g, G, offs_n, n_ok, K: tl.constexpr, CIN: tl.constexpr, KH: tl.constexpr,
                 KW: tl.constexpr, COUT: tl.constexpr, BK: tl.constexpr):
    """Store the partial weight gradient of the BK rows from ``kk0`` in the weight's own layout (G, COUT,
    CIN, KH, KW)."""
    offs_k, k_ok, ci, kw, kh = _wgrad_cols(kk0, K, CIN, KW, BK)
    out = out_ptr + ((s * G + g) * COUT + offs_n[None, :]) * K + (ci * (KH * KW) + kh * KW + kw)[:, None]
    tl.store(out, acc, mask=k_ok[:, None] & n_ok[None, :])


@triton.jit
def _wgrad_kernel(x_ptr, dy_ptr, out_ptr, outb_ptr, M, HIN, WIN, HOUT, WOUT, x_sg, dy_sg, dy_sb, dy_sh, dy_sw, G, S, CHUNK,
                  CIN: tl.constexpr, COUT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                  OFF: tl.constexpr, BIAS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                  BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, SEP: tl.constexpr = False,
                  EVEN: tl.constexpr = False, KSUB: tl.constexpr = 1):
    """Partial weight gradient out[s, g, n, k] = sum over rows m of chunk s of A[g, m, k] dy[g, m, n]
    (A as in :func:`_igemm_kernel` with SGN = 1), stored in the weight's own layout (G, COUT, CIN, KH,
    KW), and, with BIAS, the partial bias gradient outb[s, g, n] = sum over the same rows of dy[g, m, n]
    (stored by the programs of the first K block; :func:`_wgrad` asks for it only where K is one block).
    dy[g, (b, oh, ow), n] is at dy_ptr + g dy_sg + b dy_sb + oh dy_sh + ow dy_sw + n (contiguous, or the
    inside of a zero-bordered buffer: :func:`padded_base`).
    SEP (OFF = 0, no padding): the gather's address as a column part (kh, kw, ci), computed once, plus a
    row part (b, oh, ow) per block of rows, with no bounds test per element; EVEN (with SEP: the S chunks
    cover M exactly, K and COUT whole multiples of the tiles): no masks. KSUB (1 to 5): each program
    computes KSUB consecutive BK-row blocks of the output, each in its own accumulator, from one load of
    each dy tile (which every program re-reads: KSUB times fewer reads of dy). Grid:
    (cdiv(K, BK * KSUB), cdiv(COUT, BN), G*S)."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_gs = tl.program_id(2)
    g = (pid_gs // S).to(tl.int64)
    s = pid_gs % S
    K: tl.constexpr = KH * KW * CIN
    k0 = pid_k * (BK * KSUB)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < COUT
    hw = HOUT * WOUT
    x_base = x_ptr + g * x_sg
    dy_base = dy_ptr + g * dy_sg
    bacc = tl.zeros((BN,), dtype=ACC)
    start = s * CHUNK
    # SEP: the column part of every address, once per sub-block
    acc0 = tl.zeros((BK, BN), dtype=ACC)
    c0 = _wgrad_col_part(x_base, k0, WIN, K, CIN, KW, BK)
    if KSUB > 1:
        acc1 = tl.zeros((BK, BN), dtype=ACC)
        c1 = _wgrad_col_part(x_base, k0 + BK, WIN, K, CIN, KW, BK)
    if KSUB > 2:
        acc2 = tl.zeros((BK, BN), dtype=ACC)
        c2 = _wgrad_col_part(x_base, k0 + 2 * BK, WIN, K, CIN, KW, BK)
    if KSUB > 3:
        acc3 = tl.zeros((BK, BN), dtype=ACC)
        c3 = _wgrad_col_part(x_base, k0 + 3 * BK, WIN, K, CIN, KW, BK)
    if KSUB > 4:
        acc4 = tl.zeros((BK, BN), dtype=ACC)
        c4 = _wgrad_col_part(x_base, k0 + 4 * BK, WIN, K, CIN, KW, BK)
    for m0 in range(start, start + CHUNK, BR):
        offs_m = m0 + tl.arange(0, BR)
        m_ok = offs_m < M
        bb = offs_m // hw
        rem = offs_m % hw
        oh = rem // WOUT
        ow = rem % WOUT
        rows = bb * (HIN * WIN * CIN) + (oh * WIN + ow) * CIN  # SEP: the row part
        d_ptrs = dy_base + (bb * dy_sb + oh * dy_sh + ow * dy_sw)[:, None] + offs_n[None, :]
        d = _load(d_ptrs, m_ok[:, None] & n_ok[None, :], EVEN)
        acc0 = _wgrad_dot(acc0, d, x_base, c0, k0, rows, bb, oh, ow, m_ok, HIN, WIN, K, CIN, KW, OFF, BK, PREC,
                          SEP, EVEN)
        if KSUB > 1:
            acc1 = _wgrad_dot(acc1, d, x_base, c1, k0 + BK, rows, bb, oh, ow, m_ok, HIN, WIN, K, CIN, KW, OFF, BK,
                              PREC, SEP, EVEN)
        if KSUB > 2:
            acc2 = _wgrad_dot(acc2, d, x_base, c2, k0 + 2 * BK, rows, bb, oh, ow, m_ok, HIN, WIN, K, CIN, KW, OFF,
                              BK, PREC, SEP, EVEN)
        if KSUB > 3:
            acc3 = _wgrad_dot(acc3, d, x_base, c3, k0 + 3 * BK, rows, bb, oh, ow, m_ok, HIN, WIN, K, CIN, KW, OFF,
                              BK, PREC, SEP, EVEN)
        if KSUB > 4:
            acc4 = _wgrad_dot(acc4, d, x_base, c4, k0 + 4 * BK, rows, bb, oh, ow, m_ok, HIN, WIN, K, CIN, KW, OFF,
                              BK, PREC, SEP, EVEN)
        if BIAS:
            bacc += tl.sum(d.to(ACC), axis=0)
    _wgrad_store(out_ptr, acc0, k0, s, g, G, offs_n, n_ok, K, CIN, KH, KW, COUT, BK)
    if KSUB > 1:
        _wgrad_store(out_ptr, acc1, k0 + BK, s, g, G, offs_n, n_ok, K, CIN, KH, KW, COUT, BK)
    if KSUB > 2:
        _wgrad_store(out_ptr, acc2, k0 + 2 * BK, s, g, G, offs_n, n_ok, K, CIN, KH, KW, COUT, BK)
    if KSUB > 3:
        _wgrad_store(out_ptr, acc3, k0 + 3 * BK, s, g, G, offs_n, n_ok, K, CIN, KH, KW, COUT, BK)
    if KSUB > 4:
        _wgrad_store(out_ptr, acc4, k0 + 4 * BK, s, g, G, offs_n, n_ok, K, CIN, KH, KW, COUT, BK)
    if BIAS:
        tl.store(outb_ptr + (s * G + g) * COUT + offs_n, bacc, mask=n_ok & (pid_k == 0))


@dataclass(frozen=True)
class Tiles:
    """Block shapes and launch settings of one kernel call."""

    bm: int  # rows of the output tile (igemm) or reduction rows per iteration (wgrad)
    bn: int
    bk: int
    num_warps: int = 4
    num_stages: int = 3


#: whether the kernels run in Triton's interpreter (decided when this module is imported)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: multiprocessors to fill (an H100 has 132): the output-tile choice wants at least this many programs
SMS = 132
#: fixed tiles for the forward / input-gradient kernel; None: chosen by shape (:func:`igemm_tiles`)
IGEMM_TILES: Tiles | None = None
#: tiles for the bounds-tested input gradient (a padded layer's, or one whose gradient is not
#: zero-bordered); None: as the forward's (igemm_tiles). 128 rows: fmnist's 5x5x64 layer 0.519 -> 0.358 ms
#: against igemm_tiles' 512, while the zero-bordered (separable) one stays fastest at 512 (0.388 vs 0.415;
#: bench/results/conv_dgrad_tiles_h100/); CIFAR-10's and Kather's rounds 2-3 % faster
DGRAD_TILES: Tiles | None = Tiles(bm=128, bn=64, bk=32, num_warps=4, num_stages=3)
#: weight-gradient tiles (bm = rows reduced per iteration); bk = 32 was fastest for every layer of the
#: paper's networks but CIFAR-10's last (bench/results/triton_conv_all_layers_h100.jsonl)
WGRAD_TILES = Tiles(bm=64, bn=64, bk=32)
#: ... of a padded layer (the bounds-tested gather): 32 rows per iteration, with WGRAD_KSUB's sub-blocks:
#: Kather's 64x64 layer 2.08 -> 1.25 ms, its 32x32 one 0.56 -> 0.35 ms (64 rows: 2.00 / 0.55 ms;
#: bench/results/conv_wgrad_ksub_h100/sweep.json)
WGRAD_TILES_PADDED = Tiles(bm=32, bn=64, bk=32)
#: the weight-gradient reduction is split until about this many programs run (a few per multiprocessor;
#: with WGRAD_KSUB's sub-blocks each program does up to 5x the work of one with a single block, for which
#: 1024 was best)
WGRAD_PROGRAMS = 512
#: the most BK-row blocks of the weight gradient one program computes from one read of each dy tile
#: (the kernel's KSUB, 1 to 5; :func:`_wgrad_ksub`): every program re-reads all of dy for its rows, so
#: dy is read cdiv(K, BK * KSUB) times
WGRAD_KSUB = 5
if INTERPRET:  # the interpreter's cost is per program and per operation: few, large tiles
    IGEMM_TILES = Tiles(bm=1024, bn=64, bk=128)
    DGRAD_TILES = None
    WGRAD_TILES = WGRAD_TILES_PADDED = Tiles(bm=1024, bn=64, bk=128)
    WGRAD_PROGRAMS = 1


#: the output tiles igemm_tiles considers, largest first: (rows, warps, stages). 512 rows:
#: fmnist's 64 -> 64 5x5 layer's forward 0.46 -> 0.35-0.38 ms, input gradient 0.62 -> 0.52-0.53 ms, Kather's
#: second layer 0.92 -> 0.75-0.78 ms, against 256 (bench/results/triton_conv_tiles_h100.json, H100)
IGEMM_CANDIDATES: tuple[tuple[int, int, int], ...] = ((512, 8, 3), (256, 8, 3), (128, 4, 3))


def igemm_tiles(m: int, n: int, g: int) -> Tiles:
    """Output tiles for ``m`` rows and ``n`` columns per client and ``g`` clients: the largest of
    :data:`IGEMM_CANDIDATES` that still makes :data:`SMS` programs (the largest tiles were the fastest
    on every large layer measured on an H100: bench/results/triton_conv_all_layers_h100.jsonl,
    triton_conv_tiles_h100.json), else 64 rows (small layers: more programs)."""
    if IGEMM_TILES is not None:
        return IGEMM_TILES
    cols = triton.cdiv(n, _bn(n, 64)) * g
    for bm, warps, stages in IGEMM_CANDIDATES:
        if triton.cdiv(m, bm) * cols >= SMS:
            return Tiles(bm=bm, bn=64, bk=32, num_warps=warps, num_stages=stages)
    return Tiles(bm=64, bn=64, bk=32, num_warps=4, num_stages=3)


def _bn(cout: int, bn: int) -> int:
    return max(16, min(bn, triton.next_power_of_2(cout)))


def _prec(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def acc_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """Accumulator: float64 for float64 inputs (exact tests), else float32."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


_EPI = {name: i for i, name in enumerate(EPILOGUES)}


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s GPU: Triton launches on the current CUDA device, which need not be the one
    holding the tensors (a run on ``cuda:1`` of a multi-GPU host)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _igemm(a: torch.Tensor, wk: torch.Tensor, bias: torch.Tensor | None, hout: int, wout: int, cout: int,
           kh: int, kw: int, sgn: int, off: int, tiles: Tiles | None = None, *,
           epi: int = 0, relu_of: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output ``(G, B, hout, wout, cout)`` of :func:`_igemm_kernel`, or for ``epi`` 2 the pooled
    ``(G, B, hout // 2, wout // 2, cout)`` and its uint8 codes (else codes None); ``wk (G, K, cout)`` at
    any strides (:func:`gemm_weight`); ``tiles`` by default :func:`igemm_tiles` of the kernel's rows.
    ``relu_of`` (a contiguous tensor shaped as the output): the output is zeroed where it is not
    positive (epilogue 3)."""
    if relu_of is not None:
        epi = 3
    g, b, hin, win, cin = a.shape
    ph, pw = hout // 2, wout // 2
    if epi == 2:
        y = torch.empty(g, b, ph, pw, cout, dtype=a.dtype, device=a.device)
        code = torch.empty(y.shape, dtype=torch.uint8, device=a.device)
        m = b * ph * pw * 4
    else:
        y = torch.empty(g, b, hout, wout, cout, dtype=a.dtype, device=a.device)
        code = None
        m = b * hout * wout
    tiles = igemm_tiles(m, cout, g) if tiles is None else tiles
    bn = _bn(cout, tiles.bn)
    grid = (triton.cdiv(m, tiles.bm), triton.cdiv(cout, bn), g)
    sep, even = _igemm_gather(m, kh * kw * cin, cout, tiles, sgn, off)
    with on_device(a):
        aux = relu_of if relu_of is not None else (y if code is None else code)
        if relu_of is not None and (relu_of.shape != y.shape or not relu_of.is_contiguous()):
            raise ValueError(f"_igemm: relu_of {tuple(relu_of.shape)} must be contiguous and shaped as the output {tuple(y.shape)}")
        _igemm_kernel[grid](a, wk, bias if bias is not None else wk, y, aux, m, hin, win,
                            hout, wout, ph, pw, a.stride(0), y.stride(0), *wk.stride(), CIN=cin, COUT=cout, KH=kh, KW=kw,
                            SGN=sgn, OFF=off, EPI=epi, HAS_BIAS=bias is not None, PREC=_prec(a.dtype),
                            ACC=acc_dtypes(a.dtype)[1], BM=tiles.bm, BN=bn, BK=tiles.bk, SEP=sep, EVEN=even,
                            num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return y, code


#: elements per program of the unpooling kernel
UNPOOL_BLOCK = 1024


def _unpool(dyp: torch.Tensor, code: torch.Tensor, hout: int, wout: int) -> torch.Tensor:
    """(G, B, hout, wout, C) gradient at the convolution's output from the pooled one (:func:`_unpool_kernel`)."""
    g, b, ph, pw, c = dyp.shape
    dz = torch.empty(g, b, hout, wout, c, dtype=dyp.dtype, device=dyp.device)
    total = dz.numel()
    # the interpreter's cost is per program: few, large blocks there
    block = min(max(UNPOOL_BLOCK, triton.next_power_of_2(total)), 1 << 20) if INTERPRET else UNPOOL_BLOCK
    with on_device(dyp):
        _unpool_kernel[(triton.cdiv(total, block),)](dyp, code, dz, total, hout, wout, ph, pw, C=c, BLOCK=block)
    return dz


def _kn_divide(k: int, cout: int, tiles: Tiles) -> bool:
    """Whether K blocks of ``tiles.bk`` and the output-channel tile cover ``k`` and ``cout`` exactly
    (with whole row blocks: the kernels' EVEN)."""
    return k % tiles.bk == 0 and cout % _bn(cout, tiles.bn) == 0


def _igemm_gather(m: int, k: int, cout: int, tiles: Tiles, sgn: int, off: int) -> tuple[bool, bool]:
    """:func:`_igemm_kernel`'s SEP and EVEN for ``m`` rows, ``k`` = KH*KW*CIN and ``cout`` columns."""
    sep = sgn == 1 and off == 0  # the window never leaves the input: separable gather
    return sep, sep and m % tiles.bm == 0 and _kn_divide(k, cout, tiles)


def wgrad_tiles(pad: int, k: int) -> Tiles:
    """The weight-gradient kernel's tiles for a layer with zero padding ``pad`` and K = ``k``:
    :data:`WGRAD_TILES_PADDED` where it takes the bounds-tested gather over more than one K block (where
    it was measured), else :data:`WGRAD_TILES`."""
    padded = pad != 0 and k > WGRAD_TILES.bk
    return WGRAD_TILES_PADDED if padded else WGRAD_TILES


def _wgrad_ksub(k: int, tiles: Tiles, m: int | None = None, cout: int = 0, g: int = 1,
                most: int | None = None) -> int:
    """:func:`_wgrad_kernel`'s KSUB for K = ``k``: the largest count up to ``most`` (:data:`WGRAD_KSUB`) that divides
    the BK-row blocks (fmnist's 5x5x64 layer: 50 blocks, 5 a program; a 3x3x64 layer: 18 blocks, 3) and,
    given the layer's ``m`` rows, ``cout`` and ``g`` clients, still leaves :data:`SMS` programs at the
    most chunks the split allows (CIFAR-10's 4x4-output layer, 10 clients: one chunk, 18 blocks; KSUB 3
    left 60 programs, 0.31 ms against 0.11 ms with KSUB 1: bench/results/conv_wgrad_ksub_h100/sweep.json)."""
    blocks = triton.cdiv(k, tiles.bk)
    chunks = 1 if m is None else triton.cdiv(m, 8 * tiles.bm) * triton.cdiv(cout, _bn(cout, tiles.bn)) * g
    most = WGRAD_KSUB if most is None else most
    return max(j for j in range(1, max(1, min(most, 5)) + 1)
               if blocks % j == 0 and (j == 1 or m is None or blocks // j * chunks >= SMS))


def _wgrad_split(m: int, k: int, cout: int, g: int, pad: int, tiles: Tiles, programs: int | None = None,
                 ksub: int | None = None) -> tuple[int, int, bool, bool]:
    """How :func:`_wgrad_kernel` splits its reduction over ``m`` rows: ``(chunks S, rows per chunk, SEP,
    EVEN)``. S is what makes about ``programs`` (:data:`WGRAD_PROGRAMS`) programs (at least 8 row blocks a chunk); with
    the separable gather and whole row blocks, the nearest S up to twice as many that divides the blocks
    (fmnist's 5x5x64 layer: 400 blocks of 64 rows in 8 chunks, not 6; with KSUB 1 and 1024
    programs, 4, not 3), so that no chunk needs masks. The programs of a chunk: K blocks / KSUB
    (:func:`_wgrad_ksub`, at most ``ksub``) x output-channel tiles."""
    programs = WGRAD_PROGRAMS if programs is None else programs
    tiles_kn = (triton.cdiv(k, tiles.bk) // _wgrad_ksub(k, tiles, m, cout, g, ksub)
                * triton.cdiv(cout, _bn(cout, tiles.bn)))
    s = max(1, min(triton.cdiv(m, 8 * tiles.bm), triton.cdiv(programs, tiles_kn * g)))
    sep = pad == 0
    if sep and m % tiles.bm == 0:
        blocks = m // tiles.bm
        s = next((c for c in range(s, 2 * s + 1) if blocks % c == 0), s)
    chunk = triton.cdiv(triton.cdiv(m, s), tiles.bm) * tiles.bm
    s = triton.cdiv(m, chunk)
    return s, chunk, sep, sep and m % chunk == 0 and _kn_divide(k, cout, tiles)


def _wgrad(x: torch.Tensor, dy: torch.Tensor, kh: int, kw: int, pad: int, tiles: Tiles, *,
           bias: bool = False, programs: int | None = None,
           ksub: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight gradient ``(G, COUT, CIN, KH, KW)`` (the weight's own layout) and, with ``bias``, the bias
    gradient ``(G, COUT)``, both fp32 (fp64 for fp64 inputs); ``dy`` contiguous along its channels (any
    other strides: the inside of :func:`padded_base`'s buffer). The bias gradient is summed inside the
    kernel only where K is one block (a first layer); elsewhere by ``torch.sum``: summing it in the
    kernel, even in the first K block's programs only, slowed the whole kernel (fmnist's 5x5x64 layer
    0.78 -> 1.03 ms, Kather's second 1.48 -> 1.96 ms; the separate sum 0.06 / 0.17 ms:
    bench/results/triton_conv_tiles_large_h100.json, H100). ``programs``, ``ksub``: :func:`_wgrad_split`'s
    (benchmarks' sweeps; by default :data:`WGRAD_PROGRAMS`, :data:`WGRAD_KSUB`)."""
    g, b, hin, win, cin = x.shape
    _, _, hout, wout, cout = dy.shape
    if dy.stride(4) != 1:
        dy = dy.contiguous()
    m = b * hout * wout
    k = kh * kw * cin
    bn = _bn(cout, tiles.bn)
    s, chunk, sep, even = _wgrad_split(m, k, cout, g, pad, tiles, programs, ksub)
    acc_t = acc_dtypes(x.dtype)[0]
    fused = bias and triton.cdiv(k, tiles.bk) == 1
    part = torch.empty(s, g, cout, cin, kh, kw, dtype=acc_t, device=x.device)
    part_b = torch.empty(s, g, cout, dtype=acc_t, device=x.device) if fused else part
    ksub = _wgrad_ksub(k, tiles, m, cout, g, ksub)
    grid = (triton.cdiv(k, tiles.bk) // ksub, triton.cdiv(cout, bn), g * s)
    with on_device(x):
        _wgrad_kernel[grid](x, dy, part, part_b, m, hin, win, hout, wout, x.stride(0), *dy.stride()[:4], g, s, chunk,
                            CIN=cin, COUT=cout, KH=kh, KW=kw, OFF=-pad, BIAS=fused, PREC=_prec(x.dtype),
                            ACC=acc_dtypes(x.dtype)[1], BK=tiles.bk, BN=bn, BR=tiles.bm, SEP=sep, EVEN=even,
                            KSUB=ksub, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    dw = part[0] if s == 1 else part.sum(0)
    if not bias:
        return dw, None
    if not fused:
        return dw, dy.sum((1, 2, 3), dtype=acc_t)
    return dw, part_b[0] if s == 1 else part_b.sum(0)


def gemm_weight(w: torch.Tensor, dtype: torch.dtype, *, backward: bool, flip: bool = False) -> torch.Tensor:
    """The weight ``w (G, Cout, Cin, KH, KW)`` as the (G, K, N) operand of :func:`_igemm_kernel`: forward,
    K = (kh, kw, ci) and N = co; input gradient (``backward``), K = (kh, kw, co) and N = ci; a contiguous
    copy in ``dtype`` stored K-major (each output channel's K = (kh, kw, ci) inputs contiguous, the
    layout Hopper's TF32 matrix instructions read), returned as a (G, K, N) view. ``flip``: the
    kernel's window turned by 180 degrees (kh -> KH-1-kh, kw -> KW-1-kw; the input gradient as a
    correlation over a zero-bordered gradient, :func:`padded_base`)."""
    if flip:
        w = w.flip(3, 4)
    g, cout, cin, kh, kw = w.shape
    n, k = (cin, kh * kw * cout) if backward else (cout, kh * kw * cin)
    t = w.permute(0, 2, 3, 4, 1) if backward else w.permute(0, 1, 3, 4, 2)  # (G, N, KH, KW, C) contiguous
    return t.reshape(g, n, k).to(dtype).contiguous().transpose(1, 2)


def padded_base(dy: torch.Tensor, q: int) -> torch.Tensor | None:
    """The contiguous ``(G, B, H + 2q, W + 2q, C)`` buffer of which ``dy (G, B, H, W, C)`` is the inside
    (its strides and offset say so, as :func:`robustfl.engine.triton_flatten.relu_dropout_flatten` hands back
    with ``grad_pad`` q), else None. That the border holds zeros is the producer's promise
    (:func:`conv_nhwc`'s ``grad_padded``). With the border q = KH - 1 - padding, a stride-1 convolution's
    input gradient, dx[ih, iw] = sum dy[ih - kh + padding, iw - kw + padding] w[kh, kw], is the correlation
    dx[ih, iw] = sum dyq[ih + kh', iw + kw'] w[KH-1-kh', KW-1-kw'] whose window never leaves the buffer
    dyq: the separable gather, without bounds tests."""
    if q <= 0 or dy.dim() != 5:
        return None
    g, b, h, w, c = dy.shape
    hp, wp = h + 2 * q, w + 2 * q
    strides = (b * hp * wp * c, hp * wp * c, wp * c, c, 1)
    corner = (q * wp + q) * c
    if dy.stride() != strides or dy.storage_offset() < corner:
        return None
    return dy.as_strided((g, b, hp, wp, c), strides, dy.storage_offset() - corner)


class _ConvNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,  # noqa: ANN001
                pad: int, epi: int, relu_input: bool = False, grad_masked: bool = False,
                grad_padded: bool = False) -> torch.Tensor:
        g, _, h, wd, cin = x.shape
        cout, _, kh, kw = w.shape[1:]
        oh, ow = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
        wk = gemm_weight(w, x.dtype, backward=False)
        y, code = _igemm(x, wk, None if bias is None else bias.to(x.dtype).contiguous(), oh, ow, cout, kh, kw, 1,
                         -pad, epi=epi)
        # what the backward needs to form the gradient at the convolution's output: the ReLU's output
        # (its mask) or the pool's codes
        # (a ReLU output whose gradient arrives already masked, ``grad_masked``, needs none)
        ctx.save_for_backward(x, w, {0: None, 1: None if grad_masked else y, 2: code}[epi])
        ctx.pad, ctx.has_bias, ctx.epi, ctx.out_hw = pad, bias is not None, epi, (oh, ow)
        ctx.relu_input, ctx.grad_masked, ctx.grad_padded = relu_input, grad_masked, grad_padded
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # noqa: ANN001, ANN205
        x, w, aux = ctx.saved_tensors
        pad, epi, (oh, ow) = ctx.pad, ctx.epi, ctx.out_hw
        kh, kw = w.shape[3:]
        # the gradient as the inside of a zero-bordered buffer (grad_padded, epilogue none): the input
        # gradient gathers it separably; anything else (e.g. gradients summed by autograd): contiguous
        dyq = padded_base(dy, kh - 1 - pad) if ctx.grad_padded and kh == kw else None
        if dyq is None:
            dy = dy.contiguous()
        if epi == 1 and not ctx.grad_masked:  # through the ReLU: 0 where the output is not positive, in one
            # pass (ReLU's own backward; torch.where(aux > 0, ...) was two: the comparison, then the selection)
            dy = torch.ops.aten.threshold_backward(dy, aux, 0)
        elif epi == 2:  # through the ReLU and the pool at once
            dy = _unpool(dy, aux, oh, ow)
        g, _, h, wd, cin = x.shape
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # relu_input: x is a ReLU's output, and the gradient at it goes on through that ReLU: zero it
            # where x is not positive in the kernel's epilogue (the producer's backward then skips it)
            relu_of = x if ctx.relu_input else None
            if dyq is not None:
                wd_k = gemm_weight(w, dy.dtype, backward=True, flip=True)
                dx, _ = _igemm(dyq, wd_k, None, h, wd, cin, kh, kw, 1, 0, relu_of=relu_of)
            else:
                wd_k = gemm_weight(w, dy.dtype, backward=True)
                dx, _ = _igemm(dy, wd_k, None, h, wd, cin, kh, kw, -1, pad, DGRAD_TILES, relu_of=relu_of)
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1] or want_b:
            dw, db = _wgrad(x, dy, kh, kw, pad, wgrad_tiles(pad, kh * kw * x.shape[-1]), bias=want_b)
            dw = dw.to(w.dtype) if ctx.needs_input_grad[1] else None
            db = db.to(w.dtype) if want_b else None
        return dx, dw, db, None, None, None, None, None


def conv_nhwc(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, padding: int = 0,
              epilogue: str = "none", *, relu_input: bool = False, grad_masked: bool = False,
              grad_padded: bool = False) -> torch.Tensor:
    """Client g's convolution of its inputs ``x[g] (B, H, W, Cin)`` (NHWC, contiguous) with its weight
    ``w[g] (Cout, Cin, KH, KW)`` and bias ``bias[g] (Cout,)``, stride 1, zero padding ``padding``, for
    every g: ``(G, B, OH, OW, Cout)``, differentiable in x, w and bias. ``epilogue`` (:data:`EPILOGUES`)
    fuses what follows into the kernels: ``"relu"`` returns ``relu(conv)``; ``"pool_relu"`` returns
    ``relu(max_pool2d(conv, 2))``, ``(G, B, OH // 2, OW // 2, Cout)``, without writing the full-size
    convolution output; its backward routes each pooled gradient to its window's first maximum in one
    pass. Under autocast the inputs are cast to the autocast dtype first.

    A pair of convolutions ``conv -> ReLU -> conv`` can hand the ReLU's backward from the first to the
    second: the first with ``epilogue="relu", grad_masked=True`` (its backward trusts that the gradient
    at its output is already zero where the output is not positive) and the second with
    ``relu_input=True`` (its input-gradient kernel zeroes the gradient where its input is not positive,
    in the kernel's epilogue, saving a pass over that gradient). Only valid when the first
    convolution's output feeds the second alone, as in :func:`robustfl.engine.stacked.stacked_logits`.

    ``grad_padded`` (epilogue ``"none"``): the consumer of the output promises to hand back its gradient
    as the inside of a buffer bordered by KH - 1 - padding zeros (:func:`padded_base`;
    :func:`robustfl.engine.triton_flatten.relu_dropout_flatten`'s ``grad_pad``), and the input gradient is then
    gathered from that buffer without bounds tests. A gradient that does not have that buffer's strides
    (e.g. one autograd summed from several consumers) takes the usual path."""
    if grad_masked and epilogue != "relu":
        raise ValueError("conv_nhwc: grad_masked applies to a ReLU epilogue")
    if grad_padded and epilogue != "none":
        raise ValueError("conv_nhwc: grad_padded applies to a convolution without an epilogue")
    if x.dim() != 5 or w.dim() != 5 or x.shape[0] != w.shape[0] or x.shape[-1] != w.shape[2]:
        raise ValueError(f"conv_nhwc: x (G, B, H, W, Cin) and w (G, Cout, Cin, KH, KW) do not match: "
                         f"{tuple(x.shape)}, {tuple(w.shape)}")
    if epilogue not in _EPI:
        raise ValueError(f"conv_nhwc: epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dt), w.to(dt)
        bias = None if bias is None else bias.to(dt)
        with torch.autocast(x.device.type, enabled=False):
            return _ConvNHWC.apply(x.contiguous(), w, bias, int(padding), _EPI[epilogue], relu_input, grad_masked,
                                   grad_padded)
    return _ConvNHWC.apply(x.contiguous(), w, bias, int(padding), _EPI[epilogue], relu_input, grad_masked,
                           grad_padded)
