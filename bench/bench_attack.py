"""Benchmark: the backdoor attackers' crafting (Bhagoji et al.'s alternating minimisation, what
Attack-Krum-Backdoor runs for every attacker every round; or with ``--attack boosting`` the explicit
boosting to convergence of Attack-Coomed-Backdoor), eagerly vs one iteration captured as a CUDA
graph (``robustfl.attacks.backdoor.ATTACK_CUDA_GRAPH``), side by side in one process. Paper settings:
the attacker's shard (CIFAR-10: 5,000 samples, batch 32; fmnist: 6,000, batch 64), 2 benign epochs
(the authors' ``mal_E``), rho 1e-4, boost n = 10, a backdoor set of ``--bd`` images; random inputs.

    python bench/bench_attack.py --models cifar10 fmnist --out bench/results/attack_h100.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import robustfl.attacks.backdoor as B
from robustfl.io import atomic_write_json
from robustfl.models import build_model
from robustfl.params import model_to_flat

try:
    from bench_engine import SETTINGS, result_header
except ImportError:  # pragma: no cover
    from bench.bench_engine import SETTINGS, result_header


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["cifar10", "fmnist"])
    ap.add_argument("--bd", type=int, default=100, help="backdoor-set size")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--attack", choices=["alternating", "boosting"], default="alternating",
                    help="alternating minimisation (Attack-Krum-Backdoor) or explicit boosting to convergence "
                    "(Attack-Coomed-Backdoor: full-batch Adam on the backdoor set, loss read every step, "
                    "tol 1e-6, at most --max-steps steps)")
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--tol", type=float, default=1e-6, help="boosting's convergence threshold (-1: never, so "
                    "every run takes --max-steps steps)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = result_header(dev)
    for name in a.models:
        mname, c, h, w, ch, per, bs = SETTINGS[name]
        torch.manual_seed(0)
        model = build_model(mname, c, ch).to(dev)
        theta = model_to_flat(model)
        x = torch.randint(0, 256, (per, h, w, ch), dtype=torch.uint8, device=dev)
        y = torch.randint(0, c, (per,), device=dev)
        xb = torch.randint(0, 256, (a.bd, h, w, ch), dtype=torch.uint8, device=dev)
        yb = torch.full((a.bd,), 1, device=dev)
        ref = 1e-3 * torch.randn_like(theta)
        out, info = {}, {}
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(a.repeats + 1):  # the first pass warms up
            for graph in (False, True):
                B.ATTACK_CUDA_GRAPH = graph
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                if a.attack == "alternating":
                    d = B.alternating_minimisation(model, theta, x, y, xb, yb, ref, boost=10.0, rho=1e-4,
                                                   benign_epochs=2.0, batch_size=bs,
                                                   generator=torch.Generator().manual_seed(0))
                else:
                    d, info[graph] = B.explicit_boosting(model, theta, xb, yb, boost=10.0, max_steps=a.max_steps,
                                                         tol=a.tol, generator=torch.Generator().manual_seed(0))
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if r:
                    times[graph].append(time.perf_counter() - t)
                out[graph] = d
        B.ATTACK_CUDA_GRAPH = True
        row = {"model": mname, "attack": a.attack, "shard": per, "batch": bs, "backdoor_set": a.bd,
               "eager_s": min(times[False]), "graph_s": min(times[True]),
               "rel_diff_graph_vs_eager": float((out[True] - out[False]).norm() / out[False].norm())}
        if a.attack == "alternating":
            row.update(benign_epochs=2.0, iterations=2 * -(-per // bs))
        else:
            row.update(max_steps=a.max_steps, tol=a.tol, steps_eager=info[False]["steps"], steps_graph=info[True]["steps"],
                       mal_loss_eager=info[False]["mal_loss"], mal_loss_graph=info[True]["mal_loss"])
        row["speedup"] = row["eager_s"] / row["graph_s"]
        print(json.dumps(row), flush=True)
        res["results"].append(row)
    if a.out:
        atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
