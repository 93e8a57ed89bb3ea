"""Benchmark: one paper-setting FL run end to end (the target: one fmnist paper run in at most 30 s, data
load to final metrics, bench/README.md), through the library's own entry point :func:`robustfl.fl.experiment.run_cell`:
load the prepared arrays, build the partition's shards and server sets, 20 rounds of 10 clients x
5 local epochs with FedAvg and no attack (test accuracy evaluated every round), write the run's CSVs and
``run.json``. The vectorised engine's kernel options are compared side by side in one process.

Real data when ``--data DIR`` names a prepared dataset (``robustfl.data.datasets.prepare``); otherwise random uint8
images of the dataset's shape and size (fmnist: 60,000 + 10,000 of 28x28x1, 10 classes), prepared once
into a temporary cache, so the timing covers the same code path (accuracy is then chance level).

    python bench/bench_run.py --dataset fmnist --variants vmap auto --out bench/results/run_fmnist.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from robustfl.config import RunConfig
from robustfl.data.datasets import DATASETS, ArrayDataset, prepare
from robustfl.fl.experiment import build_partition, run_cell
from robustfl.io import atomic_write_json

try:  # run as `python bench/bench_run.py` from the repository root
    from bench_engine import result_header
except ImportError:  # pragma: no cover - imported as bench.bench_run
    from bench.bench_engine import result_header

# name -> (train, test, H, W, C, classes)
SHAPES = {"fmnist": (60000, 10000, 28, 28, 1, 10), "cifar10": (50000, 10000, 32, 32, 3, 10),
          "kather": (4000, 1000, 128, 128, 3, 8)}
#: variant -> (the run's engine mapping, its precision or None for --precision)
VARIANTS = {
    "vmap": ({"conv": "vmap", "cuda_graph": False}, None),
    "grouped+graph": ({"conv": "grouped", "cuda_graph": True}, None),
    "channels_last+graph": ({"conv": "channels_last", "cuda_graph": True}, None),
    "triton+graph": ({"conv": "triton", "cuda_graph": True}, None),
    "triton+graph+tf32": ({"conv": "triton", "cuda_graph": True}, "tf32"),
    "triton+graph+bf16": ({"conv": "triton", "cuda_graph": True}, "bf16"),
    "auto": ({"conv": "auto", "cuda_graph": None}, None),
}


def register_random(name: str, scale: float = 1.0, *, n_train: int | None = None,
                    n_test: int | None = None) -> str:
    """Register random uint8 data of dataset ``name``'s shape (:data:`SHAPES`): its train/test sizes times
    ``scale``, or exactly ``n_train``/``n_test`` images where given. Returns the registered dataset name."""
    n_tr, n_te, h, w, c, k = SHAPES[name]
    if n_train is None:
        n_tr, n_te = int(n_tr * scale), int(n_te * scale)
        key = f"random_{name}_{scale:g}"
    else:
        n_tr, n_te = n_train, n_test
        key = f"random_{name}_{n_tr}_{n_te}"
    if key in DATASETS:
        return key

    @DATASETS.register(key)
    def _random(spec: dict, raw_dir: Path) -> ArrayDataset:  # noqa: ARG001
        g = np.random.default_rng(0)
        return ArrayDataset(g.integers(0, 256, (n_tr, h, w, c), dtype=np.uint8), np.arange(n_tr) % k,
                            g.integers(0, 256, (n_te, h, w, c), dtype=np.uint8), np.arange(n_te) % k,
                            [str(i) for i in range(k)], name, meta={"source": {"kind": "random uint8"}})
    return key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="fmnist", choices=list(SHAPES))
    ap.add_argument("--data", type=Path, default=None, help="a prepared dataset directory (real data)")
    ap.add_argument("--variants", nargs="+", default=["vmap", "channels_last+graph"], choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--precision", default="fp32", help="of the variants that name none")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the random dataset's size (smoke tests)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench_run-"))
    t = time.perf_counter()
    if a.data is not None:
        data_dir, source = a.data, "real"
    else:
        data_dir, source = prepare(register_random(a.dataset, a.scale), {}, tmp / "data"), "random"
    prep_s = time.perf_counter() - t
    base = dict(dataset=a.dataset, rounds=a.rounds, device=str(dev), engine={"kind": "vectorised"},
                precision=a.precision, checkpoint_every=0, snapshot_round=None)
    cfg0 = RunConfig(**base)
    part = tmp / "partition.npz"
    t = time.perf_counter()
    build_partition(data_dir, cfg0, part)
    part_s = time.perf_counter() - t
    res = result_header(dev, scale=a.scale, data=source, prepare_s=prep_s, partition_s=part_s)
    # warm-up: CUDA context, cuDNN handles, first kernel loads (a one-round run, not timed)
    run_cell(RunConfig(**{**base, "rounds": 1}), data_dir, part, tmp / "warm")
    for r in range(a.repeats):
        for v in a.variants:
            engine, precision = VARIANTS[v]  # a variant may name its own precision
            cfg = RunConfig(**{**base, "engine": {"kind": "vectorised", **engine}, "precision": precision or a.precision})
            out_dir = tmp / f"run_{v}_{r}"
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            final = run_cell(cfg, data_dir, part, out_dir)
            wall = time.perf_counter() - t
            run = json.loads((out_dir / "run.json").read_text())
            row = {"variant": v, "repeat": r, "precision": cfg.precision, "end_to_end_s": wall,
                   "sim_wall_s": final.get("sim_wall_s"),
                   "test_acc": final["test_acc"], "engine_conv": final.get("engine_conv"),
                   "engine_cuda_graph": final.get("engine_cuda_graph"),
                   "peak_gpu_mem_gib": run.get("peak_gpu_mem_gib"), "rounds": a.rounds}
            rounds = pd.read_csv(out_dir / "rounds.csv")
            for col in ("train_s", "attack_s", "agg_s"):
                row[f"{col}_total"] = float(rounds[col].sum())
            print(json.dumps(row), flush=True)
            res["results"].append(row)
    if a.out:
        atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
