"""Profile: where one vectorised training step's GPU time goes, by kernel.

Runs ``train_vectorised`` eagerly (no CUDA graph, so that the profiler sees each kernel) on random
inputs of the model's paper shape for ``--steps`` steps of ``--clients`` clients, under
torch.profiler, and writes the kernels' total CUDA time, grouped by name, largest first.

    python bench/profile_step.py --model fmnist --conv triton --out bench/results/profile_fmnist_h100.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from robustfl.io import atomic_write_json
from robustfl.models import build_model
from robustfl.params import model_to_flat
from robustfl.engine.train import train_vectorised

try:  # run as `python bench/profile_step.py` from the repository root
    from bench_engine import SETTINGS, engine_options, result_header
except ImportError:  # pragma: no cover - imported as bench.profile_step
    from bench.bench_engine import SETTINGS, engine_options, result_header


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="fmnist")
    ap.add_argument("--conv", default="triton")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    mname, c, h, w, ch, _, bs = SETTINGS[a.model]
    torch.manual_seed(0)
    model = build_model(mname, c, ch).to(dev)
    theta = model_to_flat(model)
    per = bs * a.steps
    x = torch.randint(0, 256, (a.clients * per, h, w, ch), dtype=torch.uint8, device=dev)
    y = torch.randint(0, c, (a.clients * per,), device=dev)
    shards = [torch.arange(i * per, (i + 1) * per, device=dev) for i in range(a.clients)]

    opts = engine_options(conv=a.conv, cuda_graph=False)  # eager: the profiler sees each kernel

    def run() -> None:
        train_vectorised(model, theta, x, y, shards, epochs=1, batch_size=bs, lr=1e-3,
                         generator=torch.Generator().manual_seed(0), precision=a.precision, options=opts)

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.key and not e.key.startswith("ProfilerStep"):
            rows.append({"kernel": e.key[:160], "calls": e.count, "ms_per_step": t / 1e3 / a.steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    res = result_header(dev, model=mname, conv=a.conv, precision=a.precision, clients=a.clients, batch=bs,
                        steps=a.steps, kernels_ms_per_step=total)
    res["results"] = rows[: a.top]
    for r in res["results"]:
        print(f"{r['ms_per_step']:8.3f} ms/step {r['calls'] // a.steps:4d}/step  {r['kernel'][:110]}")
    print(f"total kernel time {total:.3f} ms per step")
    atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
