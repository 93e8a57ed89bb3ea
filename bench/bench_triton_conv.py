"""Benchmark: the per-client convolution layers of the paper's networks, cuDNN against
robustfl.engine.triton_conv's implicit-GEMM kernels, and the Triton kernels' tile shapes.

For every convolution layer of the fmnist, CIFAR-10 and Kather networks at the paper's batch size and
``--clients`` clients at once, in one process on one GPU:

* forward + backward of the layer as cuDNN's grouped convolution (NCHW and channels-last memory, what
  the stacked engine's ``grouped`` and ``channels_last`` layouts run) and as ``conv_nhwc`` (layout
  ``triton``), with PyTorch's default TF32 setting for convolutions;
* each Triton kernel alone (forward, input gradient, weight gradient) under every tile shape of
  ``--sweep`` (``IGEMM`` and ``WGRAD`` below), so that robustfl.engine.triton_conv's defaults can be picked from
  measurements. The input gradient of a network's first layer is never computed (its input is data).

Times are medians of ``triton.testing.do_bench``; TFLOP/s counts 2 * M * K * N per client and kernel.

    python bench/bench_triton_conv.py --clients 10 --out bench/results/triton_conv_h100.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from robustfl.engine import triton_conv
from robustfl.io import atomic_write_json
from robustfl.engine.triton_conv import Tiles

try:  # run as `python bench/bench_triton_conv.py` from the repository root
    from bench_engine import result_header
except ImportError:  # pragma: no cover - imported as bench.bench_triton_conv
    from bench.bench_engine import result_header

# (model, layer, batch, H, W, Cin, Cout, kernel, padding): Tables 6-8 at the paper's batch sizes
LAYERS = [
    ("fmnist_cnn", 0, 64, 28, 28, 1, 64, 5, 0), ("fmnist_cnn", 1, 64, 24, 24, 64, 64, 5, 0),
    ("cifar10_cnn", 0, 32, 32, 32, 3, 64, 3, 0), ("cifar10_cnn", 1, 32, 15, 15, 64, 64, 3, 0),
    ("cifar10_cnn", 2, 32, 6, 6, 64, 64, 3, 0),
    ("kather_cnn", 0, 32, 128, 128, 3, 64, 3, 1), ("kather_cnn", 1, 32, 64, 64, 64, 64, 3, 1),
    ("kather_cnn", 2, 32, 32, 32, 64, 64, 3, 1), ("kather_cnn", 3, 32, 16, 16, 64, 64, 3, 1),
    ("kather_cnn", 4, 32, 8, 8, 64, 128, 3, 1),
]
# tile shapes timed by --sweep; the first sweep (results/triton_conv_all_layers_h100.jsonl) also had bk 64/16,
# 64-row tiles with 4 stages, a 128x128 tile, and weight-gradient tiles with bk 64/128 (all slower); the bk-64
# shapes were all slower, or too large for shared memory at 256 rows (results/triton_conv_tiles_h100.json)
IGEMM = [Tiles(64, 64, 32, 4, 3), Tiles(128, 64, 32, 4, 3), Tiles(128, 64, 32, 8, 3), Tiles(256, 64, 32, 8, 3),
         Tiles(256, 64, 32, 8, 4), Tiles(256, 64, 64, 8, 3), Tiles(256, 64, 16, 8, 4), Tiles(512, 64, 32, 8, 3),
         Tiles(128, 64, 64, 4, 3), Tiles(256, 64, 64, 8, 4), Tiles(128, 64, 64, 8, 4)]
WGRAD = [(Tiles(64, 64, 32, 4, 3), 1024), (Tiles(128, 64, 32, 4, 3), 1024), (Tiles(64, 64, 32, 8, 4), 1024),
         (Tiles(32, 64, 32, 4, 3), 1024), (Tiles(64, 64, 16, 4, 4), 1024), (Tiles(64, 64, 32, 4, 3), 4096),
         (Tiles(128, 64, 32, 8, 3), 512), (Tiles(64, 64, 64, 4, 3), 1024), (Tiles(128, 64, 64, 8, 3), 1024),
         (Tiles(128, 64, 32, 8, 4), 1024)]
# --sweep wgrad: the weight-gradient kernel with KSUB sub-blocks per program (1: one block a program),
# its tiles and program counts: (tiles, programs, KSUB)
WGRAD_KSUB = [(Tiles(64, 64, 32, 4, 3), 1024, 1), (Tiles(64, 64, 32, 4, 3), 1024, 5), (Tiles(64, 64, 32, 4, 3), 512, 5),
              (Tiles(64, 64, 32, 4, 3), 256, 5), (Tiles(64, 64, 32, 8, 3), 512, 5), (Tiles(128, 64, 32, 8, 2), 512, 5),
              (Tiles(32, 64, 32, 4, 3), 512, 5), (Tiles(64, 64, 32, 4, 4), 512, 5), (Tiles(64, 64, 32, 4, 3), 512, 2),
              (Tiles(64, 64, 32, 4, 3), 512, 3), (Tiles(128, 64, 32, 4, 2), 512, 5), (Tiles(64, 64, 32, 8, 3), 1024, 5)]
# --sweep large: the output tiles around the first sweeps' best (512 and 256 rows; more stages where
# shared memory allows; two stages, which leave more of the multiprocessor's memory to its
# L1 cache), no weight-gradient tiles
IGEMM_LARGE = [Tiles(256, 64, 32, 8, 3), Tiles(256, 64, 32, 8, 4), Tiles(512, 64, 32, 8, 3), Tiles(512, 64, 16, 8, 4),
               Tiles(512, 64, 16, 8, 5), Tiles(512, 64, 32, 16, 3), Tiles(1024, 64, 16, 16, 3), Tiles(256, 64, 16, 8, 6),
               Tiles(512, 64, 32, 8, 2), Tiles(256, 64, 32, 8, 2), Tiles(128, 64, 32, 4, 3)]


def _tiles(t: Tiles) -> str:
    return f"bm{t.bm}_bn{t.bn}_bk{t.bk}_w{t.num_warps}_s{t.num_stages}"


def bench_layer(spec: tuple, g: int, sweep: list[str] | None) -> list[dict]:
    from triton.testing import do_bench

    model, layer, b, h, w, ci, co, k, pad = spec
    dev = torch.device("cuda")
    oh, ow = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    first = layer == 0
    base = dict(model=model, layer=layer, clients=g, batch=b, h=h, w=w, cin=ci, cout=co, kernel=k, padding=pad)
    flops = {"fwd": 2 * g * b * oh * ow * k * k * ci * co}
    flops["dgrad"] = 0 if first else flops["fwd"]
    flops["wgrad"] = flops["fwd"]
    rows = []

    def add(**r: object) -> None:
        row = {**base, **r}
        if "ms" in row and row.get("flops"):
            row["tflops"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
        print(json.dumps(row), flush=True)
        rows.append(row)

    torch.manual_seed(0)
    x = torch.randn(g, b, h, w, ci, device=dev)
    wt = (torch.randn(g, co, ci, k, k, device=dev) / (ci * k * k) ** 0.5).requires_grad_()
    bias = torch.zeros(g, co, device=dev, requires_grad=True)
    x.requires_grad_(not first)
    dy = torch.randn(g, b, oh, ow, co, device=dev)
    total = flops["fwd"] + flops["dgrad"] + flops["wgrad"]

    # whole layer, forward + backward, as each stacked layout computes it
    xm = x.detach().permute(0, 1, 4, 2, 3).transpose(0, 1).reshape(b, g * ci, h, w).requires_grad_(not first)
    xcl = xm.detach().contiguous(memory_format=torch.channels_last).requires_grad_(not first)
    dym = dy.permute(0, 1, 4, 2, 3).transpose(0, 1).reshape(b, g * co, oh, ow)
    for name, xin, d in [("grouped", xm, dym), ("channels_last", xcl, dym.contiguous(memory_format=torch.channels_last))]:
        def step(xin: torch.Tensor = xin, d: torch.Tensor = d) -> None:
            y = F.conv2d(xin, wt.reshape(g * co, ci, k, k), bias.reshape(-1), padding=pad, groups=g)
            y.backward(d)
        add(path=f"cudnn_{name}", kernel_pass="fwd+bwd", ms=do_bench(step), flops=total)

    def tri() -> None:
        triton_conv.conv_nhwc(x, wt, bias, pad).backward(dy)
    m_out, m_in = b * oh * ow, b * h * w
    wt_tiles = triton_conv.wgrad_tiles(pad, k * k * ci)
    chosen = (_tiles(triton_conv.igemm_tiles(m_out, co, g)) + "/" + _tiles(triton_conv.igemm_tiles(m_in, ci, g))
              + "/" + _tiles(wt_tiles))
    add(path="triton", kernel_pass="fwd+bwd", tiles=chosen, ms=do_bench(tri), flops=total)
    # the weight-gradient kernel with and without the bias gradient summed in it, and that sum by torch
    xd = x.detach()
    for name, fn in [("wgrad", lambda: triton_conv._wgrad(xd, dy, k, k, pad, wt_tiles)),
                     ("wgrad+bias", lambda: triton_conv._wgrad(xd, dy, k, k, pad, wt_tiles, bias=True)),
                     ("bias_by_torch", lambda: dy.sum((1, 2, 3)))]:
        add(path="triton", kernel_pass=name, tiles=_tiles(wt_tiles), ms=do_bench(fn),
            flops=flops["wgrad"] if name != "bias_by_torch" else 0)
    # the forward and input-gradient kernels alone, at their chosen tiles
    wk = triton_conv.gemm_weight(wt.detach(), xd.dtype, backward=False)
    wd = triton_conv.gemm_weight(wt.detach(), xd.dtype, backward=True)
    add(path="triton", kernel_pass="fwd", tiles=_tiles(triton_conv.igemm_tiles(m_out, co, g)),
        ms=do_bench(lambda: triton_conv._igemm(xd, wk, bias.detach(), oh, ow, co, k, k, 1, -pad)), flops=flops["fwd"])
    if not first:  # (the bounds-tested input gradient, over an unbordered gradient)
        add(path="triton", kernel_pass="dgrad", tiles=_tiles(triton_conv.igemm_tiles(m_in, ci, g)),
            ms=do_bench(lambda: triton_conv._igemm(dy, wd, None, h, w, ci, k, k, -1, pad)), flops=flops["dgrad"])
    for which in sweep or []:
        _sweep(add, xd, wt, bias, dy, spec, oh, ow, flops, which)
    return rows


def _sweep(add, xd, wt, bias, dy, spec: tuple, oh: int, ow: int, flops: dict, which: str) -> None:
    """Each Triton kernel alone under every tile shape of IGEMM / WGRAD (``which`` "all"), or of
    IGEMM_LARGE (``which`` "large"), with the weight operand as the engine lays it out
    (triton_conv.gemm_weight); ``xd`` the layer's input (no grad)."""
    from triton.testing import do_bench

    _, layer, _, h, w, ci, co, k, pad = spec
    first = layer == 0
    wk = triton_conv.gemm_weight(wt.detach(), xd.dtype, backward=False)
    wd = triton_conv.gemm_weight(wt.detach(), xd.dtype, backward=True)
    # the input gradient as the engine computes it where the gradient arrives zero-bordered: the
    # separable gather over the bordered buffer, the window turned
    q = k - 1 - pad
    dyq = wq = None
    if q > 0 and not first:
        dyq = F.pad(dy, (0, 0, q, q, q, q))
        wq = triton_conv.gemm_weight(wt.detach(), xd.dtype, backward=True, flip=True)
    for t in {"all": IGEMM, "large": IGEMM_LARGE}.get(which, []):
        try:
            ms = do_bench(lambda t=t: triton_conv._igemm(xd, wk, bias.detach(), oh, ow, co, k, k, 1, -pad, t))
            add(path="triton", kernel_pass="fwd", tiles=_tiles(t), ms=ms, flops=flops["fwd"])
            if not first:
                ms = do_bench(lambda t=t: triton_conv._igemm(dy, wd, None, h, w, ci, k, k, -1, pad, t))
                add(path="triton", kernel_pass="dgrad", tiles=_tiles(t), ms=ms, flops=flops["dgrad"])
            if dyq is not None:
                ms = do_bench(lambda t=t: triton_conv._igemm(dyq, wq, None, h, w, ci, k, k, 1, 0, t))
                add(path="triton", kernel_pass="dgrad_bordered", tiles=_tiles(t), ms=ms, flops=flops["dgrad"])
        except Exception as exc:  # noqa: BLE001 - a tile shape the compiler refuses is a result
            add(path="triton", kernel_pass="fwd/dgrad", tiles=_tiles(t),
                error=str(exc).splitlines()[0][:200])
    wgrad = {"all": [(t, p, 1) for t, p in WGRAD], "wgrad": WGRAD_KSUB}.get(which, [])
    for t, programs, ksub in wgrad:
        name = f"{_tiles(t)}_p{programs}_ksub{ksub}"
        try:
            ms = do_bench(lambda t=t, p=programs, q=ksub: triton_conv._wgrad(xd, dy, k, k, pad, t, programs=p, ksub=q))
            split = triton_conv._wgrad_split(dy.shape[1] * oh * ow, k * k * xd.shape[-1], co, xd.shape[0], pad, t,
                                             programs, ksub)
            add(path="triton", kernel_pass="wgrad", tiles=name, ms=ms, flops=flops["wgrad"],
                ksub=triton_conv._wgrad_ksub(k * k * xd.shape[-1], t, most=ksub), chunks=split[0])
        except Exception as exc:  # noqa: BLE001
            add(path="triton", kernel_pass="wgrad", tiles=name, error=str(exc).splitlines()[0][:200])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10])
    ap.add_argument("--models", nargs="+", default=["fmnist_cnn", "cifar10_cnn", "kather_cnn"])
    ap.add_argument("--sweep", nargs="*", choices=["all", "large", "wgrad"], default=None,
                    help="also time each Triton kernel under every tile shape (all, the default), the large output "
                    "tiles (large), or the weight-gradient kernel's sub-blocks per program and tiles (wgrad); several "
                    "may be named")
    ap.add_argument("--layers", nargs="+", type=int, default=None, help="only these layer indices")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.sweep == []:  # --sweep alone
        a.sweep = ["all"]
    if not torch.cuda.is_available():
        raise SystemExit("bench_triton_conv needs a CUDA device")
    res = result_header(torch.device("cuda"))
    res.update(benchmark="triton_conv", allow_tf32=torch.backends.cudnn.allow_tf32)
    for g in a.clients:
        for spec in LAYERS:
            if spec[0] in a.models and (a.layers is None or spec[1] in a.layers):
                res["results"] += bench_layer(spec, g, a.sweep)
    atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
