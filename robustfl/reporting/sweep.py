"""Attack sweeps: does an attack do what it is designed to do against its own target rule?

Per run, from ``rounds.csv`` and ``clients.csv`` (:func:`robustfl.reporting.results.collect_runs`):

* ``selected`` -- the fraction of (round, attacker) pairs in which the rule gave the attacker a positive
  aggregation weight (Krum: the attacker's update is the one chosen);
* ``asr_rounds`` -- the fraction of rounds in which the global model, after aggregation, classifies the
  targeted input as the target label (the FLARE authors' ASR for one target image; for a set of targets
  the per-round share, averaged over rounds); ``asr`` -- the final round's;
* ``norm_ratio`` -- the attackers' update norm over the mean benign update norm, averaged over rounds;
* ``dist_ratio`` -- the attackers' distance to the mean benign update over the benign spread, averaged over
  rounds (``mal_dist_ratio`` of ``rounds.csv``; below 1 is inside the benign scatter);
* ``krum_first`` -- the fraction of rounds in which an attacker has the lowest Krum score of all updates
  (``mal_krum_rank`` = 1), whatever rule the cell runs;
* ``test_acc`` -- the final clean accuracy.

Per cell, :func:`sweep_table` averages them over seeds and sets each attack cell beside the attack-free
cell of the same rule (``acc_cost`` = attack-free accuracy - accuracy under attack). ``target_rule``
marks the rule an attack is built against (FLARE Sec. 7.1.1: Attack-Krum-Backdoor -> Krum,
Attack-Coomed-Backdoor -> coordinate-wise median).
"""
from __future__ import annotations

import pandas as pd

from robustfl.reporting import results

#: the rule each attack is designed against (FLARE Sec. 7.1.1, 7.2.1)
TARGET_RULE = {"krum_backdoor": "krum", "median_backdoor": "median", "krum_untargeted": "krum",
               "trimmedmean_untargeted": "trimmed_mean",
               "model_replacement": "fedavg"}
#: what identifies a cell in a sweep (the seed is averaged over)
SWEEP_KEYS = ("dataset", "attack", "attack_variant", "backdoor", "backdoor_mode", "defense", "defense_options",
              "partition", "n_clients", "n_attackers")
#: the attack-free cell an attack cell is compared with shares these
BASELINE_KEYS = ("dataset", "defense", "defense_options", "partition", "n_clients")
RUN_METRICS = ("selected", "asr_rounds", "asr", "norm_ratio", "dist_ratio", "krum_first", "test_acc")


def run_metrics(rounds_df: pd.DataFrame, clients_df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (``run_dir``) with its :data:`SWEEP_KEYS`, ``seed`` and :data:`RUN_METRICS`: the final
    and round-averaged metrics of :func:`robustfl.reporting.results.final_metrics`, the round means of the attacker
    diagnostics of ``rounds.csv`` and the norm ratio from ``clients.csv``."""
    keys = [k for k in (*SWEEP_KEYS, "seed") if k in rounds_df.columns]
    if rounds_df.empty:
        return pd.DataFrame(columns=["run_dir", *keys, *RUN_METRICS])
    out = results.final_metrics(rounds_df).set_index("run_dir")
    by_run = rounds_df.groupby("run_dir")
    rank = rounds_df["mal_krum_rank"]
    out["selected"] = by_run["mal_selected"].mean()
    out["dist_ratio"] = by_run["mal_dist_ratio"].mean()
    out["krum_first"] = (rank == 1).where(rank.notna()).groupby(rounds_df["run_dir"]).mean()
    c = clients_df[clients_df["run_dir"].isin(out.index)]
    mal, ben = c[c["malicious"] == 1], c[c["malicious"] == 0]
    mal_norm = mal.groupby(["run_dir", "round"])["update_norm"].mean()
    ben_norm = ben.groupby(["run_dir", "round"])["update_norm"].mean()
    out["norm_ratio"] = (mal_norm / ben_norm).groupby(level="run_dir").mean()
    return out.reset_index()[["run_dir", *keys, *RUN_METRICS]]


def sweep_table(rounds_df: pd.DataFrame, clients_df: pd.DataFrame) -> pd.DataFrame:
    """Per cell: ``{metric}_mean`` / ``{metric}_std`` (ddof = 1) over seeds of :data:`RUN_METRICS`,
    ``n_seeds``, ``target_rule`` (this rule is the one the attack is built against), and
    ``acc_free`` / ``acc_cost`` against the attack-free cell of the same rule (NaN without one)."""
    per_run = run_metrics(rounds_df, clients_df)
    keys = [k for k in SWEEP_KEYS if k in per_run.columns]
    g = per_run.groupby(keys, dropna=False, sort=True)
    out = pd.DataFrame(index=g.size().index)
    for m in RUN_METRICS:
        out[f"{m}_mean"] = g[m].mean()
        out[f"{m}_std"] = g[m].std(ddof=1)
    out["n_seeds"] = g["seed"].nunique()
    out = out.reset_index()
    out["target_rule"] = [TARGET_RULE.get(a) == d for a, d in zip(out["attack"], out["defense"])]
    free = out[out["attack"] == "none"]
    base = [k for k in BASELINE_KEYS if k in out.columns]
    free = free[[*base, "test_acc_mean"]].drop_duplicates(base).rename(columns={"test_acc_mean": "acc_free"})
    out = out.merge(free, on=base, how="left")
    out["acc_cost"] = out["acc_free"] - out["test_acc_mean"]
    return out


def sweep_markdown(table: pd.DataFrame) -> str:
    """The sweep as a Markdown table, percentages with one decimal, mean +- std over seeds."""
    def pct(row: pd.Series, m: str) -> str:
        mean, std = row[f"{m}_mean"], row[f"{m}_std"]
        if pd.isna(mean):
            return "-"
        return f"{100 * mean:.1f}" + ("" if pd.isna(std) else f" ± {100 * std:.1f}")

    cols = ["attack", "attack_variant", "backdoor_mode", "defense", "defense options", "selected %", "ASR (rounds) %",
            "ASR (final) %", "acc %", "acc cost (points)", "norm ratio", "distance / spread", "Krum's first %",
            "seeds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        rule = f"**{row['defense']}**" if row["target_rule"] else row["defense"]
        cost = "-" if pd.isna(row["acc_cost"]) else f"{100 * row['acc_cost']:.1f}"
        ratio, dist = ("-" if pd.isna(row[f"{m}_mean"]) else f"{row[f'{m}_mean']:.2f}"
                       for m in ("norm_ratio", "dist_ratio"))
        cells = [row["attack"], f"`{row['attack_variant']}`", row.get("backdoor_mode", ""), rule,
                 f"`{row.get('defense_options', 'default')}`",
                 pct(row, "selected"), pct(row, "asr_rounds"), pct(row, "asr"), pct(row, "test_acc"), cost, ratio,
                 dist, pct(row, "krum_first"), str(int(row["n_seeds"]))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
