"""Benchmark: the backdoor attackers' crafting (Bhagoji et al.'s alternating minimisation, what
Attack-Krum-Backdoor runs for every attacker every round; or with ``--attack boosting`` the explicit
boosting to convergence of Attack-Coomed-Backdoor), eagerly vs one iteration captured as a CUDA
graph (``robustfl.engine.EngineOptions.attack_cuda_graph``), side by side in one process. Paper settings:
the attacker's shard (CIFAR-10: 5,000 samples, batch 32; fmnist: 6,000, batch 64), 2 benign epochs
(the authors' ``mal_E``), rho 1e-4, boost n = 10, a backdoor set of ``--bd`` images; random inputs.

    python bench/bench_attack.py --models cifar10 fmnist --out bench/results/attack_graph_h100.json

``--attackers K [K ...]`` instead compares the two ways of crafting for K attackers (each on its own
shard of the paper's size): one model at a time through PyTorch's layers (the single-model loops,
CUDA-graphed), and all K at once on the stacked engine (the loops' ``layout``, the one the engine picks
for the model), side by side in one process:

    python bench/bench_attack.py --attackers 1 3 6 --attack alternating --out bench/results/attack_stacked_alternating_h100.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import robustfl.attacks.backdoor as B
from robustfl.engine import EngineOptions
from robustfl.io import atomic_write_json
from robustfl.models import build_model
from robustfl.params import model_to_flat

try:
    from bench_engine import SETTINGS, result_header
except ImportError:  # pragma: no cover
    from bench.bench_engine import SETTINGS, result_header


#: models whose dropout can be switched off (``dropout=False``), so that both ways give the same update
HAS_DROPOUT = ("fmnist_cnn", "digits_cnn")


def _craft(a: argparse.Namespace, model, theta, owns, xb, yb, ref, bs: int, layout: str | None):  # noqa: ANN001, ANN202
    """One round's crafting for ``len(owns)`` attackers: single-model loops (``layout=None``) or stacked."""
    gens = [torch.Generator().manual_seed(i) for i in range(len(owns))]
    if a.attack == "alternating":
        return B.alternating_minimisation(model, theta, owns, xb, yb, ref, boost=10.0, rho=1e-4, generators=gens,
                                          layout=layout, benign_epochs=2.0, batch_size=bs), None
    return B.explicit_boosting(model, theta, xb, yb, boost=10.0, generators=gens, layout=layout,
                               max_steps=a.max_steps, tol=a.tol)


def compare_engines(a: argparse.Namespace, dev: torch.device, res: dict) -> None:
    """Single-model vs stacked crafting for each model and attacker count (``--attackers``); the
    models with dropout off as well, where the two must give the same updates up to float rounding."""
    for name in a.models:
        mname, c, h, w, ch, per, bs = SETTINGS[name]
        for k in a.attackers:
            for dropout in ((True, False) if mname in HAS_DROPOUT else (None,)):
                torch.manual_seed(0)
                model = build_model(mname, c, ch, **({} if dropout is None else {"dropout": dropout})).to(dev)
                layout = EngineOptions(kind="vectorised").resolve(model, dev).layout or "grouped"
                theta = model_to_flat(model)
                owns = [(torch.randint(0, 256, (per, h, w, ch), dtype=torch.uint8, device=dev),
                         torch.randint(0, c, (per,), device=dev)) for _ in range(k)]
                xb = torch.randint(0, 256, (a.bd, h, w, ch), dtype=torch.uint8, device=dev)
                yb = torch.full((a.bd,), 1, device=dev)
                ref = 1e-3 * torch.randn_like(theta)
                times: dict[str, list[float]] = {"single": [], "stacked": []}
                out, info = {}, {}
                for r in range(a.repeats + 1):  # the first pass warms up
                    for mode, lay in (("single", None), ("stacked", layout)):
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                        t = time.perf_counter()
                        out[mode], info[mode] = _craft(a, model, theta, owns, xb, yb, ref, bs, lay)
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                        if r:
                            times[mode].append(time.perf_counter() - t)
                row = {"model": mname, "dropout": dropout, "attack": a.attack, "attackers": k, "layout": layout,
                       "shard": per, "batch": bs, "backdoor_set": a.bd,
                       "single_s": min(times["single"]), "stacked_s": min(times["stacked"]),
                       "rel_diff_stacked_vs_single": float((out["stacked"] - out["single"]).norm()
                                                           / out["single"].norm())}
                if a.attack == "boosting":
                    row.update(max_steps=a.max_steps, tol=a.tol,
                               steps_single=[i["steps"] for i in info["single"]],
                               steps_stacked=[i["steps"] for i in info["stacked"]])
                row["speedup"] = row["single_s"] / row["stacked_s"]
                print(json.dumps(row), flush=True)
                res["results"].append(row)


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
    ap.add_argument("--attackers", type=int, nargs="*", default=[],
                    help="compare single-model crafting with the stacked engine's for these attacker counts")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = result_header(dev)
    if a.attackers:
        compare_engines(a, dev, res)
        if a.out:
            atomic_write_json(a.out, res)
        return
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
                engine = EngineOptions(attack_cuda_graph=graph)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                if a.attack == "alternating":
                    d = B.alternating_minimisation(model, theta, [(x, y)], xb, yb, ref, boost=10.0, rho=1e-4,
                                                   benign_epochs=2.0, batch_size=bs,
                                                   generators=[torch.Generator().manual_seed(0)], engine=engine)[0]
                else:
                    d, infos = B.explicit_boosting(model, theta, xb, yb, boost=10.0, max_steps=a.max_steps,
                                                   tol=a.tol, generators=[torch.Generator().manual_seed(0)],
                                                   engine=engine)
                    d, info[graph] = d[0], infos[0]
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if r:
                    times[graph].append(time.perf_counter() - t)
                out[graph] = d
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
