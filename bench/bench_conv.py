"""Benchmark: how the vectorised engine's convolutions and GPU settings change local-training speed
side by side in one process. For each model at its paper batch size and each number of
clients trained at once (one cell = 10 clients; packed cells = more), times the same training steps
under several variants:

    vmap             vmap over per-client weights -> grouped convolution (cuDNN), PyTorch defaults
    vmap+bench       the same with torch.backends.cudnn.benchmark = True (autotuned algorithms)
    vmap+bench+bf16  grouped convolution under bf16 autocast
    grouped, channels_last, triton
                     the forward pass written out on stacked parameters (robustfl.engine.stacked) with the
                     grouped convolution in NCHW, the same in channels-last memory, or
                     robustfl.engine.triton_conv's implicit-GEMM kernels on NHWC activations; gradients by
                     one plain backward pass
    ...+graph        that step captured once as a CUDA graph and replayed (the timed call includes the
                     capture: 2 eager warm-up steps and the capture itself)
    sequential       the per-client reference loop (one model + torch.optim.Adam per client; only for
                     the one-cell size), for the vectorised/sequential ratio

Random uint8 inputs of the dataset's shape. Times a shortened round (``--steps`` mini-batch steps per
client) after a warm-up, and reports seconds per step, samples/s, achieved TFLOP/s (FLOPs counted with
torch.utils.flop_counter) and peak memory; ``s_per_round`` extrapolates to the paper's full round.

    python bench/bench_conv.py --models cifar10 --clients 10 90 300 --out bench/results/stacked_layouts_cifar10_h100.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from robustfl.io import atomic_write_json
from robustfl.models import build_model
from robustfl.params import model_to_flat
from robustfl.engine.train import train_sequential, train_vectorised

try:  # run as `python bench/bench_conv.py` from the repository root
    from bench_engine import SETTINGS, _sync, engine_options, result_header, train_flops
except ImportError:  # pragma: no cover - imported as bench.bench_conv
    from bench.bench_engine import SETTINGS, _sync, engine_options, result_header, train_flops

VARIANTS = {
    "vmap": dict(conv="vmap", bench=False, tf32=False, precision="fp32"),
    "vmap+bench": dict(conv="vmap", bench=True, tf32=False, precision="fp32"),
    "vmap+bench+bf16": dict(conv="vmap", bench=True, tf32=False, precision="bf16"),
    "grouped": dict(conv="grouped", bench=False, tf32=False, precision="fp32"),
    "grouped+graph": dict(conv="grouped", bench=False, tf32=False, precision="fp32", graph=True),
    "channels_last": dict(conv="channels_last", bench=False, tf32=False, precision="fp32"),
    "channels_last+bench": dict(conv="channels_last", bench=True, tf32=False, precision="fp32"),
    "channels_last+graph": dict(conv="channels_last", bench=False, tf32=False, precision="fp32", graph=True),
    "channels_last+bench+graph": dict(conv="channels_last", bench=True, tf32=False, precision="fp32", graph=True),
    "grouped+graph+bf16": dict(conv="grouped", bench=True, tf32=False, precision="bf16", graph=True),
    "channels_last+bench+graph+bf16": dict(conv="channels_last", bench=True, tf32=False, precision="bf16", graph=True),
    "triton": dict(conv="triton", bench=False, tf32=False, precision="fp32"),
    "triton+graph": dict(conv="triton", bench=False, tf32=False, precision="fp32", graph=True),
    "triton+graph+bf16": dict(conv="triton", bench=False, tf32=False, precision="bf16", graph=True),
    "triton+graph+tf32": dict(conv="triton", bench=False, tf32=False, precision="tf32", graph=True),
}


@contextlib.contextmanager
def cuda_flags(bench: bool, tf32: bool) -> Iterator[None]:
    """cuDNN autotuning and TF32 dense products, restored after."""
    old = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = bench, tf32
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = old


def bench_model(name: str, dev: torch.device, sizes: list[int], steps: int, variants: list[str],
                sequential: bool, sequential_bench: bool = False) -> list[dict]:
    mname, c, h, w, ch, per_paper, bs = SETTINGS[name]
    epochs_paper = 5
    steps_paper = epochs_paper * -(-per_paper // bs)
    torch.manual_seed(0)
    model = build_model(mname, c, ch).to(dev)
    theta = model_to_flat(model)
    per = bs * steps  # one epoch of `steps` full batches per client
    xb = torch.rand(bs, ch, h, w, device=dev)
    flops_step = train_flops(model, xb, torch.randint(0, c, (bs,), device=dev))
    rows = []
    for n in sizes:
        x = torch.randint(0, 256, (n * per, h, w, ch), dtype=torch.uint8, device=dev)
        y = torch.randint(0, c, (n * per,), device=dev)
        shards = [torch.arange(i * per, (i + 1) * per, device=dev) for i in range(n)]
        seqs = (["sequential"] + (["sequential+bench"] if sequential_bench else [])) if sequential else []
        names = list(variants) + (seqs if n == min(sizes) else [])
        for v in names:
            row = {"model": mname, "n_clients": n, "batch": bs, "variant": v, "steps_timed": steps}
            try:
                if v.startswith("sequential"):
                    fn = lambda: train_sequential(model, theta, x, y, shards, epochs=1, batch_size=bs, lr=1e-3,  # noqa: E731
                                                  generator=torch.Generator().manual_seed(0))
                    flags = cuda_flags(True, False) if v == "sequential+bench" else contextlib.nullcontext()
                else:
                    o = VARIANTS[v]
                    flags = cuda_flags(o["bench"], o["tf32"]) if dev.type == "cuda" else contextlib.nullcontext()
                    opts = engine_options(conv=o["conv"], cuda_graph=o.get("graph", False) and dev.type == "cuda")
                    fn = lambda o=o, opts=opts: train_vectorised(  # noqa: E731
                        model, theta, x, y, shards, epochs=1, batch_size=bs, lr=1e-3,
                        generator=torch.Generator().manual_seed(0), precision=o["precision"], options=opts)
                with flags:
                    fn()  # warm-up: kernels, autotuning
                    _sync(dev)
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    t = time.perf_counter()
                    fn()
                    _sync(dev)
                    dt_ = time.perf_counter() - t
                row.update(s_per_step=dt_ / steps, samples_per_s=n * per / dt_,
                           tflops=flops_step * steps * n / dt_ / 1e12,
                           s_per_round=dt_ / steps * steps_paper)
                if dev.type == "cuda":
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            except torch.OutOfMemoryError as exc:  # a size that does not fit is a result, not a crash
                row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
        del x, y
    base = {r["n_clients"]: r["s_per_step"] for r in rows if r["variant"] == "vmap" and "s_per_step" in r}
    seq = {r["n_clients"]: r["s_per_step"] for r in rows if r["variant"] == "sequential" and "s_per_step" in r}
    for r in rows:
        if "s_per_step" in r and r["n_clients"] in base:
            r["speedup_over_vmap"] = base[r["n_clients"]] / r["s_per_step"]
        if "s_per_step" in r and r["n_clients"] in seq and not r["variant"].startswith("sequential"):
            r["speedup_over_sequential"] = seq[r["n_clients"]] / r["s_per_step"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["cifar10"])
    ap.add_argument("--clients", nargs="+", type=int, default=[10, 90])
    ap.add_argument("--steps", type=int, default=40, help="timed mini-batch steps per client")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--sequential-bench", action="store_true",
                    help="also time the sequential reference with cudnn.benchmark on (its best flags)")
    ap.add_argument("--no-sequential", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = result_header(dev, steps_timed=a.steps)
    for m in a.models:
        res["results"] += bench_model(m, dev, a.clients, a.steps, a.variants, not a.no_sequential,
                                      a.sequential_bench)
    if a.out:
        atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
