"""Benchmark: aggregation time of every rule for n clients and the fmnist model's d (~3.38 M), on CPU
and GPU, side by side with ByzFL's implementations (and Flower's, where installed) in the same process.
FLARE's time includes computing the n models' PLRs on the m auxiliary inputs (Section 7.4 reports
3.2 s at n = 10 and 28.3 s at n = 50 for the whole FLARE step).

    python bench/bench_aggregators.py --n 10 50 100 200 --devices cpu cuda --out bench/results/aggregators.json
    # the defense suite (robustfl.aggregation.suite + pre-aggregators), with ByzFL where it has the method:
    python bench/bench_aggregators.py --n 10 50 100 --devices cuda --peers --out bench/results/suite.json
    # quick CPU smoke test: random updates of a small d instead of the fmnist model (FLARE rules skipped)
    python bench/bench_aggregators.py --n 10 --d 2000 --devices cpu --reps 1

ByzFL rows are keyed to the robustfl rule with the same definition, so ``max_abs_diff_vs_robustfl`` compares
like with like: ``geomed_zero_start`` (ByzFL's GeometricMedian starts at 0 and runs T = 3 steps; our default
``geomed`` starts at the mean and may stop early), ``centered_clipping`` (a fresh ByzFL instance per call:
centre 0), ``nnm_fedavg`` / ``bucketing_fedavg`` (the pre-aggregator, then the mean), ``multikrum``
(ByzFL's MultiKrum(f) = our Krum with f - 1 and m = n - f).
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
from robustfl.aggregation import preaggregators as pre
from robustfl.aggregation import suite
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


def ours(model: torch.nn.Module | None, theta: torch.Tensor, aux: torch.Tensor | None, n: int, f: int
         ) -> tuple[dict[str, Callable], torch.Tensor]:
    """Our rules on n random updates of theta's size; ``model=None`` (the small-d smoke path) skips FLARE."""
    dev = theta.device
    g = torch.Generator(device=dev).manual_seed(n)
    u = 1e-3 * torch.randn(n, theta.numel(), device=dev, generator=g)
    server = 1e-3 * torch.randn(theta.numel(), device=dev, generator=g)
    k = f
    out = {
        "fedavg": lambda: agg.fedavg(u),
        "krum": lambda: agg.krum(u, f),
        "multikrum": lambda: agg.krum(u, f - 1, m=n - f),
        "median": lambda: agg.median(u),
        "trimmed_mean": lambda: agg.trimmed_mean(u, k),
        "fltrust": lambda: agg.fltrust(u, server),
    }
    if model is not None:
        out["flare_incl_plr"] = lambda: agg.flare(u, model_plrs(model, theta + u, aux))
        out["flare_mmd_only"] = (lambda p=model_plrs(model, theta + u, aux): agg.flare_trust(p))
    if n >= 4 * f + 3:
        out["bulyan"] = lambda: agg.bulyan(u, f)
    # the defense suite, with the papers' defaults; a generator on the updates' device for the random draws
    rng = torch.Generator(device=dev).manual_seed(0)
    out.update({
        "geomed": lambda: suite.geomed(u),
        "geomed_zero_start": lambda: suite.geomed(u, nu=1e-6, iters=3, tol=0.0, init="zero"),
        "centered_clipping": lambda: suite.centered_clipping(u, tau=100.0, iters=1),
        "dnc": lambda: suite.dnc(u, f, generator=rng),
        "signguard": lambda: suite.signguard(u, generator=rng),
        "flame": lambda: suite.flame(u, generator=rng),
        "foolsgold": lambda: suite.foolsgold(u),
        "norm_clipping": lambda: suite.norm_clipping(u),
        "weak_dp": lambda: suite.norm_clipping(u, sigma=0.025, generator=rng),
        "nnm_fedavg": lambda: agg.fedavg(pre.nnm(u, f)[0]),
        "bucketing_fedavg": lambda: agg.fedavg(pre.bucketing(u, 2, generator=rng)[0]),
    })
    return out, u


def byzfl_rules(u: torch.Tensor, f: int) -> dict[str, Callable]:
    try:
        import byzfl
    except Exception:  # noqa: BLE001 - optional comparison
        return {}
    out: dict[str, Callable] = {}
    for name, cls, kw in [("krum", "Krum", {"f": f}), ("median", "Median", {}), ("trimmed_mean", "TrMean", {"f": f}),
                          ("fedavg", "Average", {}), ("multikrum", "MultiKrum", {"f": f}),
                          ("geomed_zero_start", "GeometricMedian", {"nu": 1e-6, "T": 3})]:
        if hasattr(byzfl, cls):
            rule = getattr(byzfl, cls)(**kw)
            out[name] = (lambda r=rule: r(u))
    if hasattr(byzfl, "CenteredClipping"):  # stateful (keeps its output as the next centre): a fresh one per call
        out["centered_clipping"] = lambda: byzfl.CenteredClipping(L=1, tau=100.0)(u)
    if hasattr(byzfl, "NNM") and hasattr(byzfl, "Average"):
        out["nnm_fedavg"] = lambda: byzfl.Average()(byzfl.NNM(f=f)(u))
    if hasattr(byzfl, "Bucketing") and hasattr(byzfl, "Average"):
        out["bucketing_fedavg"] = lambda: byzfl.Average()(byzfl.Bucketing(s=2)(u))
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, nargs="+", default=[10, 50, 100, 200])
    ap.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--peers", action="store_true", help="also time ByzFL / Flower implementations")
    ap.add_argument("--max-cpu-n", type=int, default=200)
    ap.add_argument("--peer-max-n", type=int, default=200, help="largest n for the peers (Flower's Krum is O(n^2) in Python)")
    ap.add_argument("--d", type=int, default=None,
                    help="random updates of this many coordinates instead of the fmnist model (smoke test; no FLARE)")
    ap.add_argument("--rules", nargs="+", default=None, help="time only these rules (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    vers = versions()
    if a.peers:  # the peers compared against, where installed
        import importlib.metadata

        for dist in ("byzfl", "flwr"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                vers[dist] = importlib.metadata.version(dist)
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": vers,
           "git_commit": git_commit(), "model": "fmnist_cnn" if a.d is None else f"random d={a.d}", "m_aux": 10,
           "results": []}
    for dname in a.devices:
        dev = torch.device(dname)
        torch.manual_seed(0)
        if a.d is None:
            model = build_model("fmnist_cnn", 10, 1).to(dev)
            theta = model_to_flat(model)
            aux = torch.randint(0, 256, (10, 28, 28, 1), dtype=torch.uint8, device=dev)
        else:
            model, aux = None, None
            theta = torch.zeros(a.d, device=dev)
        for n in a.n:
            if dev.type == "cpu" and n > a.max_cpu_n:
                continue
            f = max(1, n // 10)
            rules, u = ours(model, theta, aux, n, f)
            if a.rules is not None:
                rules = {k: v for k, v in rules.items() if k in a.rules}
            impls = {"robustfl": rules}
            if a.peers and n <= a.peer_max_n:
                impls["byzfl"] = {k: v for k, v in byzfl_rules(u, f).items() if a.rules is None or k in a.rules}
                if dev.type == "cpu":
                    impls["flower"] = {k: v for k, v in flower_rules(u, f).items() if a.rules is None or k in a.rules}
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
    return res


if __name__ == "__main__":
    main()
