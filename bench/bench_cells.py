"""Benchmark: what a round of each kind of grid cell costs besides local training, on a GPU of its own.

bench/estimate_grid.py adds, per run and round, the packed training time and three more terms: the
attackers' crafting (``attack_s``), the server's aggregation including FLARE's PLRs and FLTrust's
server update (``agg_s``), and everything else (evaluation, metrics, checkpoints: ``other``). Before
this script they came from the CIFAR-10 reproduction's rounds, which ran up to 10 jobs per GPU and so
measured contention as much as work. Here every attack of the paper's grid (with FedAvg) and every
defense (without attack) runs ``--rounds`` paper-setting rounds (10 clients, 5 local epochs, paper
batch sizes) through :func:`robustfl.fl.experiment.run_cell`, unpacked and alone on its GPU, on random
images of each dataset's shape and size (as bench_run.py; real data where ``--data`` names it). The
first round (kernel compilation, graph capture) is left out of the medians.

Several GPUs: one process per GPU, each taking every k-th job (``--shard i --shards k``); their files
are merged by estimate_grid.py.

    CUDA_VISIBLE_DEVICES=0 python bench/bench_cells.py --shard 0 --shards 4 --out bench/results/cells_0.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from robustfl.config import RunConfig
from robustfl.data.datasets import prepare
from robustfl.fl.experiment import build_partition, run_cell
from robustfl.io import atomic_write_json

try:  # run as `python bench/bench_cells.py` from the repository root
    from bench_engine import result_header
    from bench_run import SHAPES, register_random
except ImportError:  # pragma: no cover - imported as bench.bench_cells
    from bench.bench_engine import result_header
    from bench.bench_run import SHAPES, register_random

#: the attacks of the paper's grid (reports/full/cells.csv) with their attacker counts (Section 6.1)
ATTACKS = [dict(attack="krum_backdoor", n_attackers=1), dict(attack="krum_backdoor", n_attackers=1, backdoor="trojan"),
           dict(attack="median_backdoor", n_attackers=1), dict(attack="median_backdoor", n_attackers=1, backdoor="trojan"),
           dict(attack="krum_untargeted", n_attackers=3),
           dict(attack="trimmedmean_untargeted", n_attackers=3), dict(attack="adaptive_plr", n_attackers=1)]
DEFENSES = ["fedavg", "krum", "median", "trimmed_mean", "bulyan", "fltrust", "flare"]
#: the grid's other (clients, attackers) settings, per dataset (the study of the number of clients and
#: attackers, fmnist only): crafting grows with the attackers and shrinks with their shards
SCALING = {"fmnist": [dict(attack="krum_backdoor", n_clients=n, n_attackers=k)
                      for n, k in [(20, 1), (20, 2), (20, 3), (20, 4), (20, 5), (20, 6), (30, 3), (40, 4), (50, 5)]]}


def jobs(datasets: list[str], attacks_only: bool = False) -> list[dict]:
    """Every (dataset, attack with FedAvg) cell, the :data:`SCALING` settings, and (unless
    ``attacks_only``) every (dataset, defense without attack) cell to time."""
    out = []
    for ds in datasets:
        out += [dict(dataset=ds, **a) for a in ATTACKS + SCALING.get(ds, [])]
        if not attacks_only:
            out += [dict(dataset=ds, defense=d) for d in DEFENSES]
    return out


def time_cell(overrides: dict, data_dir: Path, rounds: int, device: str, tmp: Path, tag: str) -> dict:
    cfg = RunConfig(**overrides, rounds=rounds, device=device, engine={"kind": "vectorised"}, checkpoint_every=0,
                    snapshot_round=None)
    part = tmp / f"partition_{tag}.npz"
    build_partition(data_dir, cfg, part)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    final = run_cell(cfg, data_dir, part, tmp / f"run_{tag}")
    wall = time.perf_counter() - t
    r = pd.read_csv(tmp / f"run_{tag}" / "rounds.csv")
    busy = float(r[["train_s", "attack_s", "agg_s"]].sum().sum())
    later = r[r["round"] > 1]
    return {**overrides, "rounds": rounds, "end_to_end_s": wall, "sim_wall_s": final["sim_wall_s"],
            "train_s_median": float(later["train_s"].median()), "attack_s_median": float(later["attack_s"].median()),
            "agg_s_median": float(later["agg_s"].median()), "agg_s_first": float(r["agg_s"].iloc[0]),
            "attack_s_first": float(r["attack_s"].iloc[0]),
            # everything outside training, crafting and aggregation, set-up included, per round
            "other_s_per_round": (final["sim_wall_s"] - busy) / rounds,
            "engine_conv": final.get("engine_conv"), "precision": cfg.precision}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--datasets", nargs="+", default=["fmnist", "cifar10", "kather"], choices=list(SHAPES))
    ap.add_argument("--data", nargs="*", default=[], metavar="NAME=DIR", help="prepared real datasets to use")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the random datasets' size (smoke tests)")
    ap.add_argument("--attacks-only", action="store_true", help="time the attack cells only (no defenses)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.rounds < 2:
        ap.error("--rounds must be >= 2 (the first round is left out of the medians)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench_cells-"))
    real = dict(kv.split("=", 1) for kv in a.data)
    todo = jobs(a.datasets, a.attacks_only)[a.shard::a.shards]
    res = result_header(dev, shard=a.shard, shards=a.shards, scale=a.scale,
                        data={ds: ("real" if ds in real else "random") for ds in a.datasets})
    dirs: dict[str, Path] = {}
    for i, job in enumerate(todo):
        ds = job["dataset"]
        if ds not in dirs:
            dirs[ds] = Path(real[ds]) if ds in real else prepare(register_random(ds, a.scale), {}, tmp / f"data_{ds}")
        row = time_cell(job, dirs[ds], a.rounds, str(dev), tmp, f"{a.shard}_{i}")
        print(json.dumps(row), flush=True)
        res["results"].append(row)
        if a.out:  # after every cell: an interrupted call keeps what it measured
            atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
