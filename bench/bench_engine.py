"""Benchmark: one round of local training at the paper's settings, vectorised engine vs the sequential
per-client reference, in the same process, on random inputs of the right shape (a whole run on
real data: bench_run.py --data). ``--conv auto`` (the default) times the engine a run uses.

    python bench/bench_engine.py --models fmnist cifar10 kather --pack 9 --out bench/results/round_h100.json

``--dirichlet ALPHA`` instead times unequal shards (a label-skewed Dirichlet split of the same number of
samples, ``robustfl.data.partition.dirichlet``): the vectorised engine skipping clients whose batches ran
out (``skip_idle``, the default) vs computing them on masked batches, side by side.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from robustfl.data.partition import dirichlet
from robustfl.engine import EngineOptions, clear_graph_cache
from robustfl.engine.train import batch_plan, concat_plans, train_sequential, train_vectorised
from robustfl.io import atomic_write_json, device_name, git_commit, versions
from robustfl.models import build_model
from robustfl.params import model_to_flat

# (model, classes, H, W, C, samples per client, batch) -- Section 6.1 / Appendix C
SETTINGS = {
    "fmnist": ("fmnist_cnn", 10, 28, 28, 1, 6000, 64),
    "cifar10": ("cifar10_cnn", 10, 32, 32, 3, 5000, 32),
    "kather": ("kather_cnn", 8, 128, 128, 3, 400, 32),
    "digits": ("digits_cnn", 10, 8, 8, 1, 130, 32),
}

#: named engine options (robustfl.engine.EngineOptions fields over the defaults) that the benchmarks'
#: variants compare: the defaults, and no CUDA graphs kept from one call to the next
OPTION_SETS: dict[str, dict] = {"default": {}, "nocache": {"graph_cache": 0}}


def engine_options(name: str = "default", **fields: object) -> EngineOptions:
    """The vectorised engine's options of :data:`OPTION_SETS` ``name``, with ``fields`` on top."""
    return EngineOptions(kind="vectorised", **{**OPTION_SETS[name], **fields})


def result_header(dev: torch.device, **extra: object) -> dict:
    """What every bench result file records first: date, device, versions, commit (and ``extra``), and an
    empty ``results`` list."""
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device_name(dev),
            "versions": versions(), "git_commit": git_commit(), **extra, "results": []}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def train_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one forward+backward on a batch (torch.utils.flop_counter)."""
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def _setup(name: str, dev: torch.device, n_clients: int, frac: float):
    """The model of ``name`` at seed 0, its flat parameters, and random uint8 inputs for ``n_clients``
    shards of the paper's size times ``frac``; returns ``(model, theta, x, per, bs, classes)``."""
    mname, c, h, w, ch, per, bs = SETTINGS[name]
    per = max(bs, int(per * frac))
    torch.manual_seed(0)
    model = build_model(mname, c, ch).to(dev)
    x = torch.randint(0, 256, (n_clients * per, h, w, ch), dtype=torch.uint8, device=dev)
    return model, model_to_flat(model), x, per, bs, c


def bench_one(name: str, dev: torch.device, n_clients: int, epochs: int, precision: str, seq: bool,
              pack: int, frac: float, engine: EngineOptions | None = None) -> dict:
    mname, _, h, w, ch, _, _ = SETTINGS[name]
    model, theta, x, per, bs, c = _setup(name, dev, n_clients, frac)
    y = torch.randint(0, c, (len(x),), device=dev)
    shards = [torch.arange(i * per, (i + 1) * per, device=dev) for i in range(n_clients)]
    xb = x[:bs].permute(0, 3, 1, 2).float() / 255
    flops_step = train_flops(model, xb, y[:bs])
    steps_per_client = epochs * -(-per // bs)
    total_flops = flops_step * steps_per_client * n_clients
    out: dict = {"model": mname, "dataset_shape": [h, w, ch], "n_clients": n_clients, "samples_per_client": per,
                 "batch": bs, "epochs": epochs, "precision": precision, "train_flops_per_round": total_flops,
                 "params": theta.numel()}
    engine = (engine or engine_options()).resolve(model, dev, precision)  # what a run would use
    kw = dict(epochs=epochs, batch_size=bs, lr=1e-3, precision=precision, options=engine)
    out.update(conv=engine.conv, cuda_graph=engine.cuda_graph, graph_cache=engine.graph_cache)
    # warm-up (kernels, autotuning)
    train_vectorised(model, theta, x, y, [s[:bs * 2] for s in shards], generator=torch.Generator().manual_seed(0),
                     **{**kw, "epochs": 1})
    _sync(dev)
    clear_graph_cache()  # a round as a run's first: its CUDA graph captured inside the timing, as before
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    train_vectorised(model, theta, x, y, shards, generator=torch.Generator().manual_seed(0), **kw)
    _sync(dev)
    tv = time.perf_counter() - t
    out["vectorised_s_per_round"] = tv
    out["vectorised_samples_per_s"] = n_clients * per * epochs / tv
    out["vectorised_tflops"] = total_flops / tv / 1e12
    if dev.type == "cuda":
        out["vectorised_peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    if engine.cuda_graph:
        # a later round of the same run: its CUDA graph kept from the round before (EngineOptions.graph_cache)
        t = time.perf_counter()
        train_vectorised(model, theta, x, y, shards, generator=torch.Generator().manual_seed(1), **kw)
        _sync(dev)
        out["vectorised_s_per_later_round"] = time.perf_counter() - t
    if seq:
        t = time.perf_counter()
        train_sequential(model, theta, x, y, shards, generator=torch.Generator().manual_seed(0),
                         **{k: v for k, v in kw.items() if k != "options"})
        _sync(dev)
        ts = time.perf_counter() - t
        out["sequential_s_per_round"] = ts
        out["sequential_samples_per_s"] = n_clients * per * epochs / ts
        out["sequential_tflops"] = total_flops / ts / 1e12
        out["speedup_vectorised_over_sequential"] = ts / tv
        if "vectorised_s_per_later_round" in out:
            out["speedup_later_round_over_sequential"] = ts / out["vectorised_s_per_later_round"]
    if pack > 1:
        # several cells (e.g. seeds x defenses) packed into one call: pack * n_clients clients per step
        gens = [torch.Generator().manual_seed(k) for k in range(pack)]
        thetas = theta.unsqueeze(0).expand(pack * n_clients, -1)
        # warm-up for the packed shape: its kernels (Triton compiles per tile shape, which depends on the
        # number of clients). Without it the first process on a machine timed the
        # compilation too (Kather's packed round 0.89 s cold, 0.41 s warm, same code and card)
        train_vectorised(model, thetas, x, y, [s[:bs * 2] for s in shards] * pack, generator=gens[0],
                         **{**kw, "epochs": 1})
        _sync(dev)
        clear_graph_cache()
        t = time.perf_counter()  # the cells' batch plans are drawn inside the timing, as a packed round does
        plan = concat_plans([batch_plan(shards, epochs, bs, g) for g in gens])
        train_vectorised(model, thetas, x, y, shards * pack, plan=plan, generator=None, **kw)
        _sync(dev)
        tp = time.perf_counter() - t
        out["packed_cells"] = pack
        out["packed_s_per_round"] = tp
        out["packed_s_per_cell_round"] = tp / pack
        out["packed_tflops"] = total_flops * pack / tp / 1e12
        if dev.type == "cuda":
            out["packed_peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out


def bench_unequal(name: str, dev: torch.device, n_clients: int, epochs: int, precision: str, frac: float,
                  alpha: float, repeats: int = 3, engine: EngineOptions | None = None) -> dict:
    """One round on Dirichlet(alpha) shards: ``skip_idle`` on vs off (best of ``repeats``, alternating)."""
    model, theta, x, _, bs, c = _setup(name, dev, n_clients, frac)
    n_total = len(x)
    y = torch.arange(n_total, device=dev) % c  # balanced classes
    shards = [torch.as_tensor(p, device=dev) for p in dirichlet(y.cpu().numpy(), n_clients, alpha, seed=0)]
    sizes = [len(s) for s in shards]
    steps = [epochs * -(-k // bs) for k in sizes]
    out: dict = {"model": SETTINGS[name][0], "n_clients": n_clients, "samples": n_total, "dirichlet_alpha": alpha,
                 "batch": bs, "epochs": epochs, "precision": precision, "shard_sizes": sizes,
                 "real_client_steps": sum(steps), "padded_client_steps": max(steps) * n_clients}
    out["fill"] = out["real_client_steps"] / out["padded_client_steps"]
    engine = (engine or engine_options()).resolve(model, dev, precision)
    out.update(conv=engine.conv, cuda_graph=engine.cuda_graph)
    kw = dict(epochs=epochs, batch_size=bs, lr=1e-3, precision=precision)
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(repeats + 1):  # the first pass warms up
        for skip in (True, False):
            _sync(dev)
            t = time.perf_counter()
            train_vectorised(model, theta, x, y, shards, generator=torch.Generator().manual_seed(0),
                             options=engine.replace(skip_idle=skip), **kw)
            _sync(dev)
            if r:
                times[skip].append(time.perf_counter() - t)
    out["skip_idle_s_per_round"] = min(times[True])
    out["masked_s_per_round"] = min(times[False])
    out["speedup_skip_idle"] = out["masked_s_per_round"] / out["skip_idle_s_per_round"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["fmnist", "cifar10", "kather"])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--no-sequential", action="store_true")
    ap.add_argument("--pack", type=int, default=1)
    ap.add_argument("--frac", type=float, default=1.0, help="fraction of each client's shard (quick checks)")
    ap.add_argument("--dirichlet", type=float, default=None, metavar="ALPHA",
                    help="time unequal (Dirichlet) shards, skip_idle on vs off")
    ap.add_argument("--conv", default="auto", help="EngineOptions.conv: auto (what a run uses; the default), "
                    "vmap, or grouped, channels_last, triton (robustfl.engine.stacked)")
    ap.add_argument("--cuda-graph", action="store_true", default=None,
                    help="capture the stacked step as a CUDA graph (with --conv auto: on unless --no-cuda-graph)")
    ap.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument("--options", choices=list(OPTION_SETS), default="default",
                    help="named engine options (OPTION_SETS)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    graph = a.cuda_graph if a.conv == "auto" else bool(a.cuda_graph)
    engine = engine_options(a.options, conv=a.conv, cuda_graph=graph)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = result_header(dev, options=a.options)
    for m in a.models:
        if a.dirichlet is not None:
            r = bench_unequal(m, dev, a.clients, a.epochs, a.precision, a.frac, a.dirichlet, engine=engine)
        else:
            r = bench_one(m, dev, a.clients, a.epochs, a.precision, not a.no_sequential, a.pack, a.frac,
                          engine=engine)
        r["cudnn_benchmark"] = a.cudnn_benchmark
        print(json.dumps(r), flush=True)
        res["results"].append(r)
    if a.out:
        atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
