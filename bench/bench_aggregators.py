"""Benchmark: aggregation time of every rule for n clients and the fmnist model's d (~3.38 M), on CPU
and GPU, side by side with ByzFL's implementations (and Flower's, where installed) in the same process.
FLARE's time includes computing the n models' PLRs on the m auxiliary inputs (Section 7.4 reports
3.2 s at n = 10 and 28.3 s at n = 50 for the whole FLARE step).

    python bench/bench_aggregators.py --n 10 50 100 200 --devices cpu cuda --out bench/results/aggregators.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from robustfl.aggregation import aggregators as agg
from robustfl.io import atomic_write_json, device_name, git_commit, versions
from robustfl.models import build_model
from robustfl.params import model_to_flat
from robustfl.engine import model_plrs


def _time(fn: Callable[[], object], dev: torch.device, reps: int) -> float:
    fn()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def ours(model: torch.nn.Module, theta: torch.Tensor, aux: torch.Tensor, n: int, f: int) -> tuple[dict[str, Callable], torch.Tensor]:
    g = torch.Generator(device=theta.device).manual_seed(n)
    u = 1e-3 * torch.randn(n, theta.numel(), device=theta.device, generator=g)
    server = 1e-3 * torch.randn(theta.numel(), device=theta.device, generator=g)
    k = f
    out = {
        "fedavg": lambda: agg.fedavg(u),
        "krum": lambda: agg.krum(u, f),
        "median": lambda: agg.median(u),
        "trimmed_mean": lambda: agg.trimmed_mean(u, k),
        "fltrust": lambda: agg.fltrust(u, server),
        "flare_incl_plr": lambda: agg.flare(u, model_plrs(model, theta + u, aux)),
        "flare_mmd_only": (lambda p=model_plrs(model, theta + u, aux): agg.flare_trust(p)),
    }
    if n >= 4 * f + 3:
        out["bulyan"] = lambda: agg.bulyan(u, f)
    return out, u


def byzfl_rules(u: torch.Tensor, f: int) -> dict[str, Callable]:
    try:
        import byzfl
    except Exception:  # noqa: BLE001 - optional comparison
        return {}
    out: dict[str, Callable] = {}
    for name, cls, kw in [("krum", "Krum", {"f": f}), ("median", "Median", {}), ("trimmed_mean", "TrMean", {"f": f}),
                          ("fedavg", "Average", {})]:
        if hasattr(byzfl, cls):
            rule = getattr(byzfl, cls)(**kw)
            out[name] = (lambda r=rule: r(u))
    return out


def flower_rules(u: torch.Tensor, f: int) -> dict[str, Callable]:
    """Flower's numpy implementations (``flwr.server.strategy.aggregate``), one layer = the flat vector."""
    try:
        from flwr.server.strategy import aggregate as fa
    except Exception:  # noqa: BLE001 - optional comparison
        return {}
    res = [([row.cpu().numpy()], 1) for row in u]
    trimmed = getattr(fa, "aggregate_trimmed_avg", None) or getattr(fa, "aggregate_trimmed_mean")
    out = {"krum": lambda: fa.aggregate_krum(res, f, 0), "median": lambda: fa.aggregate_median(res),
           "trimmed_mean": lambda: trimmed(res, f / len(res))}
    if hasattr(fa, "aggregate_bulyan") and len(res) >= 4 * f + 3:
        # aggregate_bulyan pops from its argument: a fresh list per call
        out["bulyan"] = lambda: fa.aggregate_bulyan(list(res), f, fa.aggregate_krum, to_keep=0)
    return out


def _flat(x: object) -> torch.Tensor:
    """A rule's output as one float64 CPU vector (our AggResult, a tensor, or Flower's list of arrays)."""
    import numpy as np

    x = getattr(x, "update", x)
    if isinstance(x, (list, tuple)):
        x = np.concatenate([np.asarray(a).ravel() for a in x])
    return torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)).double().flatten()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, nargs="+", default=[10, 50, 100, 200])
    ap.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--peers", action="store_true", help="also time ByzFL / Flower implementations")
    ap.add_argument("--max-cpu-n", type=int, default=200)
    ap.add_argument("--peer-max-n", type=int, default=200, help="largest n for the peers (Flower's Krum is O(n^2) in Python)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    vers = versions()
    if a.peers:  # the peers compared against, where installed
        import importlib.metadata

        for dist in ("byzfl", "flwr"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                vers[dist] = importlib.metadata.version(dist)
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": vers,
           "git_commit": git_commit(), "model": "fmnist_cnn", "m_aux": 10, "results": []}
    for dname in a.devices:
        dev = torch.device(dname)
        torch.manual_seed(0)
        model = build_model("fmnist_cnn", 10, 1).to(dev)
        theta = model_to_flat(model)
        aux = torch.randint(0, 256, (10, 28, 28, 1), dtype=torch.uint8, device=dev)
        for n in a.n:
            if dev.type == "cpu" and n > a.max_cpu_n:
                continue
            f = max(1, n // 10)
            rules, u = ours(model, theta, aux, n, f)
            impls = {"robustfl": rules}
            if a.peers and n <= a.peer_max_n:
                impls["byzfl"] = byzfl_rules(u, f)
                if dev.type == "cpu":
                    impls["flower"] = flower_rules(u, f)
            for impl, rs in impls.items():
                for rule, fn in rs.items():
                    reps = a.reps if not (dev.type == "cpu" and n >= 100) else 2
                    try:
                        t = _time(fn, dev, reps)
                    except Exception as exc:  # noqa: BLE001 - record, do not hide
                        row = {"device": device_name(dev), "n": n, "d": theta.numel(), "f": f, "impl": impl,
                               "rule": rule, "error": f"{type(exc).__name__}: {exc}"}
                    else:
                        row = {"device": device_name(dev), "n": n, "d": theta.numel(), "f": f, "impl": impl,
                               "rule": rule, "seconds": t}
                        if impl != "robustfl" and rule in rules:  # same inputs: do the answers agree?
                            diff = (_flat(fn()) - _flat(rules[rule]())).abs().max().item()
                            row["max_abs_diff_vs_robustfl"] = diff
                    print(json.dumps(row), flush=True)
                    res["results"].append(row)
            del u
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if a.out:
        atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
