"""Benchmark: the per-client dense layers' forward product, cuBLAS's batched GEMM (``torch.bmm``, what
the stacked engine ran before) against robustfl.engine.triton_dense's split-K kernel, under the tile shapes
and program counts of ``--sweep``, in one process on one GPU.

For each paper dense layer with a long inner dimension (fmnist 25,600 -> 128 at batch 64; Kather
2,048 -> 128 at batch 32) and each number of clients, in fp32 (TF32 off, the default precision),
tf32 and bf16. Times are medians of ``triton.testing.do_bench``; TFLOP/s counts 2 * G * M * K * N.

    python bench/bench_dense.py --clients 10 90 --out bench/results/dense_h100.json
    python bench/bench_dense.py --products --clients 10 90 --out bench/results/dense_products_h100.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from robustfl.engine import triton_dense
from robustfl.io import atomic_write_json
from robustfl.engine.triton_conv import Tiles

try:  # run as `python bench/bench_dense.py` from the repository root
    from bench_engine import result_header
except ImportError:  # pragma: no cover - imported as bench.bench_dense
    from bench.bench_engine import result_header

# (model, batch, in, out)
LAYERS = [("fmnist_cnn", 64, 25_600, 128), ("kather_cnn", 32, 2048, 128)]
# (tiles, programs); the first is robustfl.engine.triton_dense's default
SWEEP = [(triton_dense.TILES, triton_dense.PROGRAMS), (Tiles(64, 128, 32, 8, 3), 264), (Tiles(64, 128, 16, 4, 4), 264),
         (Tiles(64, 128, 64, 4, 3), 264), (Tiles(64, 128, 32, 4, 3), 528), (Tiles(64, 128, 32, 4, 3), 1056),
         (Tiles(64, 64, 32, 4, 3), 264), (Tiles(32, 128, 32, 4, 3), 528), (Tiles(64, 128, 32, 8, 4), 528)]


def _tiles(t: Tiles) -> str:
    return f"bm{t.bm}_bn{t.bn}_bk{t.bk}_w{t.num_warps}_s{t.num_stages}"


#: the products of a dense layer's step: forward x W^T, input gradient dY W, weight gradient dY^T X
PRODUCTS = ("fwd", "dx", "dw")
#: Triton paths of --products: (name, tl.dot precision for fp32, tiles or None for the default)
PRODUCT_PATHS = [("triton_ieee", "ieee", None), ("triton_tf32x3", "tf32x3", None),
                 ("triton_tf32x3_bm128_w8", "tf32x3", Tiles(128, 128, 32, 8, 3)),
                 ("triton_tf32x3_bk64", "tf32x3", Tiles(64, 128, 64, 4, 3)),
                 ("triton_tf32", "tf32", None)]


#: --backward-sweep: tiles for the long layers' backward products, whose inner dimension (batch or
#: outputs, 32-128) is one or two K blocks: whole-K blocks and few pipeline stages
BACKWARD_SWEEP = [Tiles(bm, bn, bk, w, st) for bm, bn, bk, w, st in [
    (64, 128, 32, 4, 3), (64, 128, 64, 4, 1), (64, 128, 128, 4, 1), (64, 128, 128, 8, 1), (64, 256, 64, 8, 1),
    (128, 128, 64, 8, 1), (128, 128, 64, 8, 2), (128, 64, 64, 4, 1), (128, 256, 64, 8, 1), (64, 64, 64, 4, 1),
    (32, 128, 64, 4, 1), (128, 128, 32, 8, 2)]]


def products(clients: list[int], dev: torch.device, paths: list | None = None,
             only: tuple[str, ...] = PRODUCTS, layers: list | None = None) -> list[dict]:
    """Every product of each long dense layer's step in fp32, cuBLAS (TF32 off) against the Triton kernel
    in full fp32 ("ieee"), three-pass TF32 ("tf32x3") and one-pass TF32 (for scale): ms, TFLOP/s and the
    largest error against the float64 product relative to its largest entry."""
    from triton.testing import do_bench

    rows = []
    for model, b, k, n in LAYERS + [("cifar10_cnn", 32, 256, 128)] if layers is None else layers:
        for g in clients:
            torch.manual_seed(0)
            x = torch.randn(g, b, k, device=dev)
            w = torch.randn(g, n, k, device=dev) / k**0.5
            dy = torch.randn(g, b, n, device=dev)
            operands = {"fwd": (x, w.transpose(1, 2)), "dx": (dy, w), "dw": (dy.transpose(1, 2), x)}
            for prod in only:
                a_, b_ = operands[prod]
                exact = torch.bmm(a_.double(), b_.double())
                scale = exact.abs().max().item()
                runs = [("cublas_bmm", lambda a_=a_, b_=b_: torch.bmm(a_, b_))]
                for name, prec, t in PRODUCT_PATHS if paths is None else paths:
                    runs.append((name, lambda a_=a_, b_=b_, prec=prec, t=t: triton_dense.bmm(a_, b_, precision=prec,
                                                                                           tiles=t)))
                for name, fn in runs:
                    row = dict(model=model, clients=g, batch=b, k=k, n=n, product=prod, path=name, precision="fp32")
                    try:
                        row["max_rel_err_vs_fp64"] = ((fn().double() - exact).abs().max() / scale).item()
                        row["ms"] = do_bench(fn)
                        row["tflops"] = 2 * g * b * k * n / (row["ms"] * 1e-3) / 1e12
                    except Exception as exc:  # noqa: BLE001 - a shape the compiler refuses is a result
                        row["error"] = str(exc).splitlines()[0][:200]
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def forward_sweep(clients: list[int], precisions: list[str], sweep: bool, dev: torch.device) -> list[dict]:
    """Each long dense layer's forward product, cuBLAS's ``baddbmm`` against the split-K kernel under
    the default tiles (or every tile shape of :data:`SWEEP`), in each precision: ms, TFLOP/s, and the
    largest difference from cuBLAS relative to its largest entry."""
    from triton.testing import do_bench

    rows = []
    for model, b, k, n in LAYERS:
        for g in clients:
            for prec in precisions:
                torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
                dt = torch.bfloat16 if prec == "bf16" else torch.float32
                torch.manual_seed(0)
                x = torch.randn(g, b, k, device=dev, dtype=dt)
                w = torch.randn(g, n, k, device=dev, dtype=dt) / k**0.5
                bias = torch.randn(g, n, device=dev, dtype=dt)
                flops = 2 * g * b * k * n
                base = dict(model=model, clients=g, batch=b, k=k, n=n, precision=prec)
                want = torch.baddbmm(bias.unsqueeze(1), x, w.transpose(1, 2))
                runs = [("cublas_baddbmm", None,
                         lambda x=x, w=w, bias=bias: torch.baddbmm(bias.unsqueeze(1), x, w.transpose(1, 2)))]
                for t, p in SWEEP if sweep else SWEEP[:1]:
                    runs.append((f"splitk_{_tiles(t)}_p{p}", (t, p),
                                 lambda t=t, p=p, x=x, w=w, bias=bias: triton_dense.bmm_nt(x, w, bias, tiles=t,
                                                                                         programs=p)))
                for name, tp, fn in runs:
                    row = {**base, "path": name}
                    try:
                        got = fn()
                        row["max_rel_err"] = ((got.float() - want.float()).abs().max()
                                              / want.float().abs().max()).item()
                        row["ms"] = do_bench(fn)
                        row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                        if tp is not None:
                            row["splits"] = triton_dense.splits(k, g * -(-b // tp[0].bm) * -(-n // tp[0].bn),
                                                                tp[1], tp[0].bk)[0]
                    except Exception as exc:  # noqa: BLE001 - a shape the compiler refuses is a result
                        row["error"] = str(exc).splitlines()[0][:200]
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 90])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"], choices=["fp32", "tf32", "bf16"])
    ap.add_argument("--sweep", action="store_true", help="every tile shape of SWEEP, else the default only")
    ap.add_argument("--products", action="store_true",
                    help="every product of the layer's step (forward, dX, dW), cuBLAS against the kernel's precisions")
    ap.add_argument("--backward-sweep", action="store_true",
                    help="the backward products (dX, dW) under every tile shape of BACKWARD_SWEEP, ieee and tf32x3")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_dense needs a CUDA device")
    dev = torch.device("cuda")
    res = result_header(dev)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        if a.backward_sweep:
            torch.backends.cuda.matmul.allow_tf32 = False
            paths = [(f"triton_{p}_{_tiles(t)}", p, t) for t in BACKWARD_SWEEP for p in ("ieee", "tf32x3")]
            res.update(benchmark="dense_backward_sweep", results=products(a.clients, dev, paths, ("dx", "dw"), LAYERS[:1]))
        elif a.products:
            torch.backends.cuda.matmul.allow_tf32 = False
            res.update(benchmark="dense_products", results=products(a.clients, dev))
        else:
            res.update(benchmark="dense_forward", results=forward_sweep(a.clients, a.precisions, a.sweep, dev))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
