"""Benchmark: the per-round attack diagnostics (:func:`robustfl.fl.metrics.attack_diagnostics`: each client's
distance to the benign mean and Krum rank), which every run computes after every round, for n clients' random
updates of a model's size d; median of ``--repeats`` after one warm-up. ``--trees`` times the same call in
other checkouts of the library (e.g. a worktree of an earlier commit), each in its own process, side by side
in one call; the Krum ranks of every tree are recorded so that equal results can be checked.

    python bench/bench_diagnostics.py --trees /path/to/before . --out bench/results/diagnostics_cpu.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

try:  # run as `python bench/bench_diagnostics.py` from the repository root
    from bench_engine import result_header
except ImportError:  # pragma: no cover - imported as bench.bench_diagnostics
    from bench.bench_engine import result_header

#: fmnist_cnn's parameter count (Appendix C, Table 6)
D_FMNIST = 3_382_346

CHILD = """
import json, statistics, sys, time, torch
sys.path.insert(0, {tree!r})
from robustfl.fl.metrics import attack_diagnostics
torch.set_num_threads({threads})
dev = torch.device({device!r})
u = torch.randn({n}, {d}, generator=torch.Generator().manual_seed(0)).to(dev)
def once():
    t = time.perf_counter()
    out = attack_diagnostics(u, range({n} - 1), 1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t, out
once()
ts, out = zip(*(once() for _ in range({repeats})))
print(json.dumps({{"median_s": statistics.median(ts), "all_s": list(ts),
                   "krum_rank": out[-1]["krum_rank"].tolist()}}))
"""


def _commit(tree: Path) -> str:
    """The checkout's commit, ``+dirty`` where its tracked files differ from it (no machine paths recorded)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trees", nargs="+", type=Path, default=[Path(".")], help="library checkouts to time")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--d", type=int, default=D_FMNIST)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    res = result_header(torch.device(a.device), note=a.note, n=a.n, d=a.d, repeats=a.repeats, threads=a.threads)
    for tree in a.trees:
        code = CHILD.format(tree=str(tree.resolve()), threads=a.threads, device=a.device, n=a.n, d=a.d,
                            repeats=a.repeats)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        row = {"library_commit": _commit(tree), **json.loads(out.stdout.strip().splitlines()[-1])}
        print(json.dumps({k: v for k, v in row.items() if k != "all_s"}))
        res["results"].append(row)
    if a.out is not None:
        a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
