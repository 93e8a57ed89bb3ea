"""Estimate: GPU-hours of a whole study grid (the target: the whole paper grid, all studies, 3 seeds,
estimated from measured per-cell times, under 3 GPU-hours; bench/README.md), from measured numbers only:

* local training, per run and round: the packed per-cell-round time of the engine benchmark
  (``bench_engine.py --pack 9``, ``round_auto_h100.json``: 9 runs of 10 clients in one call, the
  pipeline's ``pack: 9`` mode), per dataset's model. For IID shards a run's client-steps per round are
  the same for any n (n clients x 1/n of the pool), so the n = 10 time stands for n = 20-50 too;
* the attacker's crafting and the server's aggregation, per round: the median ``attack_s`` per attack
  and ``agg_s`` per defense over the CIFAR-10 reproduction's rounds (``reports/reproduction/all_rounds.csv``,
  H100 and H200). Crafting a backdoor trains the attacker's model like one sequential client, so for the
  other datasets it is scaled by the sequential engine's per-round time relative to CIFAR-10's
  (``round_cudnn_h100.json``);
* everything else in a round (evaluation, PLRs for FLARE's MMD, logging): the median of
  ``(sim_wall_s - sum of train_s + attack_s + agg_s) / rounds`` over the reproduction's unpacked runs.

The reproduction's runs shared each GPU with up to 9 other jobs, so these last three terms measured
contention as well as work. ``--costs`` replaces them with bench_cells.py's measurements (every attack
and defense of the grid, per dataset, alone on a GPU): crafting per (dataset, attack, backdoor kind),
aggregation per (dataset, defense), everything else per dataset, no scaling between datasets.

    snakemake --cores 1 --config study=full -- reports/full/cells.csv
    python bench/estimate_grid.py --cells reports/full/cells.csv --out bench/results/grid_estimate_fp32_h100.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import pandas as pd

from robustfl.io import atomic_write_json, git_commit

DATASET_MODEL = {"fmnist": "fmnist_cnn", "cifar10": "cifar10_cnn", "kather": "kather_cnn"}


def _by_model(path: Path, key: str) -> dict[str, float]:
    return {r["model"]: r[key] for r in json.loads(path.read_text())["results"] if key in r}


def other_per_round(runs_dir: Path, rounds: pd.DataFrame) -> float:
    """Median per-round time outside training, attack and aggregation, over the unpacked reproduction
    runs (their ``run.json`` under ``runs_dir``, their rounds in ``rounds`` by ``run_dir``)."""
    busy = rounds.groupby("run_dir")[["train_s", "attack_s", "agg_s"]].sum().sum(axis=1)
    n = rounds.groupby("run_dir")["round"].count()
    vals = []
    for f in sorted(runs_dir.glob("*/seed*/run.json")):
        run = json.loads(f.read_text())
        key = f"results/runs/{f.parent.parent.name}/{f.parent.name}"
        if run.get("packed_cells", 1) != 1 or key not in busy:
            continue
        vals.append((run["final"]["sim_wall_s"] - busy[key]) / n[key])
    if not vals:
        raise ValueError(f"no unpacked run under {runs_dir} with rounds in the rounds table")
    return float(pd.Series(vals).median())


#: attacks whose crafting runs as a CUDA graph since the reproduction's runs were measured
#: (Attack-Krum-Backdoor's alternating minimisation; bench_attack.py measures its speed-up)
GRAPHED_ATTACKS = ("krum_backdoor",)


class Costs:
    """Per-round crafting, aggregation and other time of a cell, from bench_cells.py's files."""

    def __init__(self, paths: list[Path]) -> None:
        files = [json.loads(p.read_text()) for p in paths]
        df = pd.DataFrame([r for f in files for r in f["results"]])
        for col in ("attack", "defense", "backdoor", "n_clients"):
            if col not in df:
                df[col] = None
        df["attack"] = df["attack"].fillna("none")
        df["defense"] = df["defense"].fillna("fedavg")
        df["backdoor"] = df["backdoor"].fillna("semantic")
        df["n_clients"] = df["n_clients"].fillna(10).astype(int)
        att = df[df["attack"] != "none"]
        # a later file's measurement of the same setting replaces an earlier one's
        self.attack = {(r.dataset, r.attack, r.backdoor): r.attack_s_median for r in att.itertuples()
                       if r.n_clients == 10}
        self.attack_setting = {(r.dataset, r.attack, r.backdoor, r.n_clients, int(r.n_attackers)): r.attack_s_median
                               for r in att.itertuples()}
        self.default_attackers = {(r.dataset, r.attack, r.backdoor): int(r.n_attackers) for r in att.itertuples()
                                  if r.n_clients == 10}
        self.unmeasured: set[tuple] = set()
        dfn = df[df["attack"] == "none"]
        self.agg = {(r.dataset, r.defense): r.agg_s_median for r in dfn.itertuples()}
        self.other = df.groupby("dataset")["other_s_per_round"].median().to_dict()
        self.devices = sorted({f["device"] for f in files})

    def per_round(self, ds: str, attack: str, backdoor: str, defense: str, n_clients: int = 10,
                  n_attackers: int | None = None) -> tuple[float, float, float]:
        """(crafting, aggregation, other) seconds per round; KeyError names a combination not measured.
        Crafting is looked up for the cell's number of clients and attackers; a setting not measured
        takes the n = 10 measurement scaled by attackers / their shard size (each attacker's crafting is
        proportional to its shard) and is listed in :meth:`summary`."""
        try:
            craft = 0.0
            if attack != "none":
                key = (ds, attack, backdoor)
                k = self.default_attackers[key] if n_attackers is None else int(n_attackers)
                craft = self.attack_setting.get((*key, n_clients, k))
                if craft is None:
                    self.unmeasured.add((*key, n_clients, k))
                    craft = self.attack[key] * (k / self.default_attackers[key]) * (10 / n_clients)
            return craft, self.agg[(ds, defense)], self.other[ds]
        except KeyError as exc:
            raise KeyError(f"bench_cells results have no measurement for {exc.args[0]}") from None

    def summary(self) -> dict:
        return {"attack_s_per_round": {"/".join(map(str, k)): v for k, v in self.attack_setting.items()},
                "attack_settings_scaled_not_measured": ["/".join(map(str, k)) for k in sorted(self.unmeasured)],
                "agg_s_per_round": {"/".join(k): v for k, v in self.agg.items()},
                "other_s_per_round": self.other, "devices": self.devices}


def estimate(cells: pd.DataFrame, packed: dict[str, float], seq: dict[str, float], rounds: pd.DataFrame,
             other: float, attack_speedup: dict[str, float] | None = None,
             costs: Costs | None = None) -> tuple[pd.DataFrame, dict]:
    """``attack_speedup[model]``: divide the crafting time of :data:`GRAPHED_ATTACKS` by it (measured by
    bench_attack.py; models without a measurement keep the reproduction's time). ``costs``: crafting,
    aggregation and other time measured per dataset by bench_cells.py instead (``rounds``, ``other``,
    ``seq`` and ``attack_speedup`` then go unused)."""
    attack_speedup = attack_speedup or {}
    attack_s = agg_s = {}
    if costs is None:
        attack_s = rounds.groupby("attack")["attack_s"].median().to_dict()
        agg_s = rounds.groupby("defense")["agg_s"].median().to_dict()
    rows = []
    for _, c in cells.iterrows():
        ov = json.loads(c["overrides"])
        ds = ov.get("dataset", "digits")
        model = DATASET_MODEL[ds]
        attack, defense = ov.get("attack", "none"), ov.get("defense", "fedavg")
        t_rounds = ov.get("rounds", 20)
        if costs is not None:
            craft, agg, oth = costs.per_round(ds, attack, ov.get("backdoor", "semantic"), defense,
                                              int(ov.get("n_clients", 10)), ov.get("n_attackers"))
        else:
            scale = seq[model] / seq["cifar10_cnn"]
            if attack in GRAPHED_ATTACKS:
                scale /= attack_speedup.get(model, 1.0)
            craft = attack_s.get(attack, attack_s["none"]) * scale
            agg, oth = agg_s.get(defense, max(agg_s.values())), other
        per_round = packed[model] + craft + agg + oth
        n_seeds = len(str(c["seeds"]).split())
        rows.append({"cell_id": c["cell_id"], "dataset": ds, "attack": attack, "defense": defense,
                     "runs": n_seeds, "s_per_run": per_round * t_rounds, "gpu_s": per_round * t_rounds * n_seeds,
                     "attack_gpu_s": craft * t_rounds * n_seeds,
                     "train_gpu_s": packed[model] * t_rounds * n_seeds})
    est = pd.DataFrame(rows)
    summary = {
        "runs": int(est["runs"].sum()),
        "gpu_hours": float(est["gpu_s"].sum() / 3600),
        "gpu_hours_by_dataset": (est.groupby("dataset")["gpu_s"].sum() / 3600).round(3).to_dict(),
        "gpu_hours_training_only": float(est["train_gpu_s"].sum() / 3600),
        "gpu_hours_attack_crafting": float(est["attack_gpu_s"].sum() / 3600),
        "inputs": ({"packed_train_s_per_cell_round": packed, "cell_costs": costs.summary()} if costs is not None else
                   {"packed_train_s_per_cell_round": packed, "sequential_s_per_round": seq,
                    "attack_s_per_round_cifar10": attack_s, "agg_s_per_round": agg_s, "other_s_per_round": other,
                    "attack_speedup": attack_speedup, "graphed_attacks": list(GRAPHED_ATTACKS)}),
    }
    return est, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cells", type=Path, default=Path("reports/full/cells.csv"))
    ap.add_argument("--engine", type=Path, nargs="+", default=[Path("bench/results/round_auto_h100.json")],
                    help="bench_engine.py --pack results; a later file's model replaces an earlier one's")
    ap.add_argument("--sequential", type=Path, default=Path("bench/results/round_cudnn_h100.json"))
    ap.add_argument("--rounds", type=Path, default=Path("reports/reproduction/all_rounds.csv"))
    ap.add_argument("--runs", type=Path, default=Path("reports/reproduction/runs"))
    ap.add_argument("--attack-bench", type=Path, default=None,
                    help="bench_attack.py results: speed-ups of the graphed crafting per model")
    ap.add_argument("--costs", type=Path, nargs="+", default=None,
                    help="bench_cells.py results: crafting, aggregation and other time per dataset, measured alone "
                         "on a GPU (replace --rounds, --runs, --sequential and --attack-bench)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    packed = {m: v for f in a.engine for m, v in _by_model(f, "packed_s_per_cell_round").items()}
    cells = pd.read_csv(a.cells)
    if a.costs:
        est, summary = estimate(cells, packed, {}, pd.DataFrame(), 0.0, costs=Costs(a.costs))
    else:
        speedup = _by_model(a.attack_bench, "speedup") if a.attack_bench else {}
        seq = _by_model(a.sequential, "sequential_s_per_round")
        rounds = pd.read_csv(a.rounds)
        est, summary = estimate(cells, packed, seq, rounds, other_per_round(a.runs, rounds), speedup)
    devices = sorted({json.loads(f.read_text())["device"] for f in a.engine})
    summary.update(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), git_commit=git_commit(),
                   device=", ".join(devices), engine_file=[str(f) for f in a.engine], cells_file=str(a.cells),
                   attack_bench_file=str(a.attack_bench) if a.attack_bench and not a.costs else None,
                   costs_files=[str(p) for p in a.costs] if a.costs else None,
                   per_cell=est.to_dict(orient="records"))
    if a.out:
        atomic_write_json(a.out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_cell"}, indent=1))


if __name__ == "__main__":
    main()
