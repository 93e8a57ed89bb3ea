"""Defense report card: one defense under every attack, attacker fraction, partition and seed.

* :func:`robustfl.pipeline.card.card_grid` lists the runs of a card (the study expansion);
* :func:`detection_rounds`, :func:`card_runs` reduce the pipeline's tidy frames (``all_rounds.csv``,
  ``all_clients.csv`` of :func:`robustfl.reporting.results.collect_runs`) to one row per run;
* :func:`card_summary` gives, per defense x setting, the attack-free accuracy and its cost against FedAvg,
  the worst-case accuracy and maximum ASR over attacks (with the attack achieving each), detection rates
  and aggregation time, with 95 % Student t intervals over seeds;
* :func:`card_table`, :func:`card_markdown`, :func:`card_latex`, :func:`write_card_tables`, :func:`heatmap`
  and :func:`ranking` render them.

A *setting* is (dataset, n, partition, attacker count f). Definitions and their reasons:
``docs/decisions/report-card.md``.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from robustfl.config import RunConfig  # noqa: E402
from robustfl.io import atomic_write_bytes, atomic_write_text  # noqa: E402
from robustfl.reporting import results  # noqa: E402
from robustfl.pipeline.card import NO_ATTACK  # noqa: E402
from robustfl.reporting.tables import display  # noqa: E402

#: Confidence level of the intervals over seeds.
LEVEL = 0.95
#: A client counts as excluded in a round when its weight share w_i / sum_j w_j is below 1 / (EXCLUSION_FACTOR n).
EXCLUSION_FACTOR = 10.0
#: Relative tolerance of the below-the-mean rule (w_i < mean(w) (1 - tol)): float round-off of equal weights is no
#: detection.
MEAN_RULE_RTOL = 1e-9
#: Defenses whose own detection definition is reported beside the threshold rule: FLARE, trust below the mean
#: trust 1/n (Section 7.4).
MEAN_RULE_DEFENSES = frozenset({"flare"})
#: What identifies a setting (besides the defense).
SETTING_KEYS: tuple[str, ...] = ("dataset", "n_clients", "partition_label", "n_attackers")
#: What identifies the attack-free reference of a setting.
CLEAN_KEYS: tuple[str, ...] = ("dataset", "n_clients", "partition_label")
RUN_COLUMNS: tuple[str, ...] = (
    "dataset", "defense", "defense_options", "attack", "attack_variant", "backdoor", "backdoor_mode", "attack_label",
    "partition", "alpha", "c_sel", "partition_label", "n_clients", "n_attackers", "fraction", "setting", "seed",
    "acc", "asr_rounds", "asr_final", "tpr", "fpr", "honest_excluded", "tpr_below_mean", "fpr_below_mean",
    "honest_excluded_below_mean", "agg_s", "rounds", "run_dir",
)
SUMMARY_COLUMNS: tuple[str, ...] = (
    "dataset", "defense", "partition_label", "n_clients", "n_attackers", "fraction", "setting", "n_attacks", "n_seeds",
    "clean_acc", "clean_acc_lo", "clean_acc_hi", "fedavg_clean_acc", "clean_cost", "clean_cost_lo", "clean_cost_hi",
    "worst_acc", "worst_acc_lo", "worst_acc_hi", "worst_acc_attack",
    "max_asr", "max_asr_lo", "max_asr_hi", "max_asr_attack",
    "tpr", "tpr_min", "tpr_min_attack", "fpr", "fpr_max", "fpr_max_attack", "tpr_below_mean", "fpr_below_mean",
    "clean_fpr", "clean_honest_excluded", "clean_fpr_below_mean", "agg_s",
)


# ------------------------------------------------------------------------------------------- labels
def _num(x: Any) -> str:
    return f"{float(x):g}"


def partition_label(partition: str, alpha: Any = math.nan, c_sel: Any = math.nan) -> str:
    """``IID``, ``Dir(0.3)`` (Dirichlet alpha) or ``Classes(2)`` (c_sel classes per client)."""
    if partition == "dirichlet":
        return f"Dir({_num(alpha)})"
    if partition == "classes":
        return f"Classes({_num(c_sel)})"
    return "IID" if partition == "iid" else str(partition)


def setting_label(part_label: str, n_attackers: int, n_clients: int) -> str:
    """``IID, 10 %`` (partition, attacker share f / n) or ``IID, no attack``."""
    if int(n_attackers) == 0:
        return f"{part_label}, no attack"
    return f"{part_label}, {100 * int(n_attackers) / int(n_clients):g} %"


def _attack_label(attack: str, variant: Any, backdoor: Any, mode: Any) -> str:
    lab = str(attack)
    extra = [str(x) for x, default in ((backdoor, "semantic"), (mode, "single"))
             if isinstance(x, str) and x not in ("none", default, "", "nan")]
    if extra:
        lab += f" ({', '.join(extra)})"
    if isinstance(variant, str) and variant not in ("default", "", "nan"):
        lab += f" [{variant}]"
    return lab


def _partition_order(label: str) -> tuple[int, float]:
    """IID first, then Dirichlet by decreasing alpha, then classes by decreasing c_sel (more skew later)."""
    for i, prefix in enumerate(("IID", "Dir(", "Classes(")):
        if label.startswith(prefix):
            try:
                return i, -float(label[len(prefix):].rstrip(")")) if prefix != "IID" else 0.0
            except ValueError:
                return i, 0.0
    return 3, 0.0


def _sort_settings(df: pd.DataFrame) -> pd.DataFrame:
    key = df["partition_label"].map(_partition_order)
    return (df.assign(_p0=key.map(lambda k: k[0]), _p1=key.map(lambda k: k[1]))
            .sort_values(["dataset", "_p0", "_p1", "partition_label", "n_attackers"], kind="stable")
            .drop(columns=["_p0", "_p1"]))


# --------------------------------------------------------------------------------------- per round / run
def _run_key(rounds: pd.DataFrame, clients: pd.DataFrame) -> list[str]:
    if "run_dir" in rounds.columns and "run_dir" in clients.columns:
        return ["run_dir"]
    raise ValueError("report card: the rounds and clients frames need a run_dir column (collect_runs writes it)")


def detection_rounds(clients: pd.DataFrame, factor: float = EXCLUSION_FACTOR) -> pd.DataFrame:
    """One row per run x round: attackers and honest clients excluded, TPR and FPR.

    Excluded (all rules): share_i = w_i / sum_j w_j < 1 / (factor n), n the round's clients (a round whose
    weights sum to 0 excludes everyone). Below the mean (FLARE, Section 7.4): w_i < mean_j w_j, i.e. trust
    below 1/n. TPR_r = excluded attackers / attackers (NaN without attackers), FPR_r = excluded honest /
    honest clients.
    """
    cols = ["run_dir", "round", "n_malicious", "n_honest", "tp", "fp", "tpr", "fpr", "tp_below_mean",
            "fp_below_mean", "tpr_below_mean", "fpr_below_mean"]
    if clients.empty:
        return pd.DataFrame(columns=cols)
    c = clients[["run_dir", "round", "malicious", "weight"]].copy()
    c["weight"] = c["weight"].astype(float)
    g = c.groupby(["run_dir", "round"], sort=True)
    n = g["weight"].transform("size").astype(float)
    total = g["weight"].transform("sum")
    mal = c["malicious"].astype(int) == 1
    excluded = (c["weight"] < total / (factor * n)) | (total <= 0)
    below = c["weight"] < (total / n) * (1 - MEAN_RULE_RTOL)
    parts = pd.DataFrame({"run_dir": c["run_dir"], "round": c["round"], "mal": mal.astype(int),
                          "hon": (~mal).astype(int), "tp": (excluded & mal).astype(int),
                          "fp": (excluded & ~mal).astype(int), "tp_below_mean": (below & mal).astype(int),
                          "fp_below_mean": (below & ~mal).astype(int)})
    out = parts.groupby(["run_dir", "round"], sort=True).sum().reset_index()
    out = out.rename(columns={"mal": "n_malicious", "hon": "n_honest"})
    nm = out["n_malicious"].where(out["n_malicious"] > 0)
    nh = out["n_honest"].where(out["n_honest"] > 0)
    out["tpr"], out["fpr"] = out["tp"] / nm, out["fp"] / nh
    out["tpr_below_mean"], out["fpr_below_mean"] = out["tp_below_mean"] / nm, out["fp_below_mean"] / nh
    return out[cols]


def card_runs(rounds: pd.DataFrame, clients: pd.DataFrame, factor: float = EXCLUSION_FACTOR) -> pd.DataFrame:
    """One row per run (defense x attack x setting x seed), :data:`RUN_COLUMNS`.

    ``acc``: final clean test accuracy; ``asr_rounds``: per-round ASR averaged over the run's rounds (the
    paper's ASR, :data:`robustfl.reporting.results.ROUND_MEAN_METRICS`), ``asr_final`` the last round's;
    ``tpr``, ``fpr``: :func:`detection_rounds` averaged over rounds; ``honest_excluded``: honest clients
    excluded per round (mean); the ``*_below_mean`` columns: the same by FLARE's rule, FLARE rows only;
    ``agg_s``: server aggregation seconds per round (mean).
    """
    if rounds.empty:
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    key = _run_key(rounds, clients)
    per = results.final_metrics(rounds)
    det = detection_rounds(clients, factor)
    rates = det.groupby(key, sort=True)[["tpr", "fpr", "fp", "tpr_below_mean", "fpr_below_mean",
                                         "fp_below_mean"]].mean()
    rates = rates.rename(columns={"fp": "honest_excluded", "fp_below_mean": "honest_excluded_below_mean"})
    per = per.merge(rates.reset_index(), on=key, how="left")
    for col in ("tpr", "fpr", "honest_excluded", "tpr_below_mean", "fpr_below_mean", "honest_excluded_below_mean"):
        if col not in per:
            per[col] = math.nan
    mean_rule = per["defense"].isin(MEAN_RULE_DEFENSES)
    for col in ("tpr_below_mean", "fpr_below_mean", "honest_excluded_below_mean"):
        per[col] = per[col].where(mean_rule)
    for col, default in (("alpha", math.nan), ("c_sel", math.nan), ("attack_variant", "default"),
                         ("backdoor", "none"), ("backdoor_mode", "none"), ("defense_options", "default")):
        if col not in per:
            per[col] = default
    per = per.rename(columns={"test_acc": "acc", "asr": "asr_final", "final_round": "rounds"})
    per["n_clients"] = per["n_clients"].astype(int)
    per["n_attackers"] = per["n_attackers"].astype(int)
    per["fraction"] = per["n_attackers"] / per["n_clients"]
    per["partition_label"] = [partition_label(p, a, c) for p, a, c in zip(per["partition"], per["alpha"], per["c_sel"])]
    per["setting"] = [setting_label(p, f, n) for p, f, n in zip(per["partition_label"], per["n_attackers"],
                                                                  per["n_clients"])]
    per["attack_label"] = [_attack_label(*r) for r in zip(per["attack"], per["attack_variant"], per["backdoor"],
                                                         per["backdoor_mode"])]
    per = _sort_settings(per).sort_values(["dataset", "defense", "attack_label", "seed"], kind="stable")
    return per[list(RUN_COLUMNS)].reset_index(drop=True)


# ------------------------------------------------------------------------------------------- summary
def t_interval(values: Iterable[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, lo, hi): Student t interval mean -/+ t_{(1+level)/2, k-1} s / sqrt(k) over the k finite
    values (s: sample sd, ddof = 1). One value: (mean, NaN, NaN); none: all NaN."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    h = float(stats.t.ppf((1 + level) / 2, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return m, m - h, m + h


def _extreme(cells: pd.DataFrame, col: str, worst: str) -> tuple[str | float, float]:
    """The attack whose seed mean of ``col`` is smallest (``worst="min"``) or largest; ties: first attack label."""
    means = cells.groupby("attack_label", sort=True)[col].mean().dropna()
    if means.empty:
        return math.nan, math.nan
    attack = str(means.idxmin() if worst == "min" else means.idxmax())
    return attack, float(means[attack])


def card_summary(runs: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """Per defense x setting (:data:`SUMMARY_COLUMNS`; a setting is :data:`SETTING_KEYS`, f > 0).

    ``clean_acc``: the defense's attack-free accuracy under the setting's partition; ``clean_cost`` =
    acc(FedAvg) - acc(defense) without attack, CI over the per-seed differences (same seed: same
    partition); ``worst_acc``: min over attacks of the seed-mean accuracy, ``worst_acc_attack`` the attack;
    ``max_asr``: max over attacks of the seed-mean ASR (``asr_rounds``), ``max_asr_attack`` the attack; each
    with the ``level`` Student t interval over its seeds (:func:`t_interval`; NaN with one seed). ``tpr``,
    ``fpr``: means over attacks of the seed means, ``tpr_min`` / ``fpr_max`` the worst attack's;
    ``clean_fpr``, ``clean_honest_excluded``: honest false exclusions without attack; ``agg_s``: aggregation
    seconds per round over the setting's runs.
    """
    if runs.empty:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    clean = runs[runs["attack"] == NO_ATTACK]
    att = runs[runs["attack"] != NO_ATTACK]
    fed = clean[clean["defense"] == "fedavg"]
    rows = []
    for key, cells in att.groupby(["defense", *SETTING_KEYS], sort=True):
        row: dict[str, Any] = dict(zip(["defense", *SETTING_KEYS], key))
        row["fraction"] = row["n_attackers"] / row["n_clients"]
        row["setting"] = setting_label(row["partition_label"], row["n_attackers"], row["n_clients"])
        row["n_attacks"] = cells["attack_label"].nunique()
        row["n_seeds"] = cells["seed"].nunique()
        ref = {k: row[k] for k in CLEAN_KEYS}
        mine = clean[(clean["defense"] == row["defense"]) & _match(clean, ref)]
        theirs = fed[_match(fed, ref)]
        row["clean_acc"], row["clean_acc_lo"], row["clean_acc_hi"] = t_interval(mine["acc"], level)
        row["fedavg_clean_acc"] = t_interval(theirs["acc"], level)[0]
        paired = (theirs.groupby("seed")["acc"].mean() - mine.groupby("seed")["acc"].mean()).dropna()
        row["clean_cost"], row["clean_cost_lo"], row["clean_cost_hi"] = t_interval(paired, level)
        attack, _ = _extreme(cells, "acc", "min")
        row["worst_acc_attack"] = attack
        row["worst_acc"], row["worst_acc_lo"], row["worst_acc_hi"] = (
            t_interval(cells.loc[cells["attack_label"] == attack, "acc"], level) if isinstance(attack, str)
            else (math.nan,) * 3)
        attack, _ = _extreme(cells, "asr_rounds", "max")
        row["max_asr_attack"] = attack
        row["max_asr"], row["max_asr_lo"], row["max_asr_hi"] = (
            t_interval(cells.loc[cells["attack_label"] == attack, "asr_rounds"], level) if isinstance(attack, str)
            else (math.nan,) * 3)
        per_attack = cells.groupby("attack_label", sort=True)[["tpr", "fpr", "tpr_below_mean", "fpr_below_mean"]].mean()
        row["tpr"], row["fpr"] = per_attack["tpr"].mean(), per_attack["fpr"].mean()
        row["tpr_min_attack"], row["tpr_min"] = _extreme(cells, "tpr", "min")
        row["fpr_max_attack"], row["fpr_max"] = _extreme(cells, "fpr", "max")
        row["tpr_below_mean"] = per_attack["tpr_below_mean"].mean()
        row["fpr_below_mean"] = per_attack["fpr_below_mean"].mean()
        row["clean_fpr"] = mine["fpr"].mean()
        row["clean_honest_excluded"] = mine["honest_excluded"].mean()
        row["clean_fpr_below_mean"] = mine["fpr_below_mean"].mean()
        row["agg_s"] = cells["agg_s"].mean()
        rows.append(row)
    out = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    return _sort_settings(out).sort_values(["dataset", "defense"], kind="stable").reset_index(drop=True)


def _match(df: pd.DataFrame, ref: Mapping[str, Any]) -> pd.Series:
    m = pd.Series(True, index=df.index)
    for k, v in ref.items():
        m &= df[k] == v
    return m


# ------------------------------------------------------------------------------------------- tables
def _pct(m: Any, lo: Any = math.nan, hi: Any = math.nan, scale: float = 100.0, decimals: int = 1) -> str:
    if m is None or pd.isna(m):
        return "-"
    s = f"{scale * m:.{decimals}f}"
    if not (pd.isna(lo) or pd.isna(hi)):
        s += f" [{scale * lo:.{decimals}f}, {scale * hi:.{decimals}f}]"
    return s


def _attack_name(a: Any) -> str:
    if not isinstance(a, str):
        return "-"
    base, _, rest = a.partition(" ")
    return display("attack", base) + (f" {rest}" if rest else "")


def card_table(summary: pd.DataFrame, defense: str) -> pd.DataFrame:
    """The card of ``defense`` as a display frame, one row per setting: percentages with one decimal and
    their 95 % interval in brackets (none with one seed)."""
    s = summary[summary["defense"] == defense]
    if s.empty:
        raise ValueError(f"report card: no summary rows for defense {defense!r}")
    multi = s["dataset"].nunique() > 1
    out = pd.DataFrame({
        "Setting": [(f"{display('dataset', d)}, " if multi else "") + st for d, st in zip(s["dataset"], s["setting"])],
        "Clean acc %": [_pct(*r) for r in zip(s["clean_acc"], s["clean_acc_lo"], s["clean_acc_hi"])],
        "Cost vs FedAvg (pts)": [_pct(*r) for r in zip(s["clean_cost"], s["clean_cost_lo"], s["clean_cost_hi"])],
        "Worst acc %": [_pct(*r) for r in zip(s["worst_acc"], s["worst_acc_lo"], s["worst_acc_hi"])],
        "Worst-acc attack": [_attack_name(a) for a in s["worst_acc_attack"]],
        "Max ASR %": [_pct(*r) for r in zip(s["max_asr"], s["max_asr_lo"], s["max_asr_hi"])],
        "Max-ASR attack": [_attack_name(a) for a in s["max_asr_attack"]],
        "TPR %": [_pct(m) for m in s["tpr"]],
        "FPR %": [_pct(m) for m in s["fpr"]],
        "Honest excl. % (no attack)": [_pct(m) for m in s["clean_fpr"]],
    })
    if defense in MEAN_RULE_DEFENSES:
        out["TPR % (trust < 1/n)"] = [_pct(m) for m in s["tpr_below_mean"]]
        out["FPR % (trust < 1/n)"] = [_pct(m) for m in s["fpr_below_mean"]]
        out["Honest excl. % (no attack, trust < 1/n)"] = [_pct(m) for m in s["clean_fpr_below_mean"]]
    out["Agg. s / round"] = [_pct(m, scale=1.0, decimals=3) for m in s["agg_s"]]
    return out.reset_index(drop=True)


def card_caption(defense: str, level: float = LEVEL, factor: float = EXCLUSION_FACTOR) -> str:
    """The caption of a card table: what every column means."""
    cap = (f"Report card of {display('defense', defense)}: one row per setting (partition, attackers f / n). "
           f"Mean over seeds with the {100 * level:g} % Student t interval over seeds in brackets (none with one "
           "seed). Clean acc: accuracy without attack; cost: FedAvg's minus it, interval over per-seed differences. "
           "Worst acc: the lowest seed-mean accuracy over attacks; max ASR: the highest seed-mean ASR (per round, "
           "the share of targeted inputs predicted as the target label, averaged over rounds); each with the "
           "attack achieving it. TPR / FPR: per round, the share of attackers / honest clients excluded, averaged "
           f"over rounds, seeds and attacks; a client is excluded when its weight share is below 1/({factor:g} n). "
           "Honest excl.: FPR without attack under the same partition.")
    if defense in MEAN_RULE_DEFENSES:
        cap += " Columns 'trust < 1/n': FLARE's own rule (Section 7.4), trust below the mean trust 1/n."
    return cap + " Agg.: server aggregation seconds per round."


def card_markdown(summary: pd.DataFrame, defense: str) -> str:
    """The card of ``defense`` as Markdown: caption, blank line, table."""
    table = card_table(summary, defense).to_markdown(index=False, disable_numparse=True)
    return f"{card_caption(defense)}\n\n{table}\n"


def card_latex(summary: pd.DataFrame, defense: str) -> str:
    """The card of ``defense`` as a LaTeX table (booktabs rules), caption escaped."""
    df = card_table(summary, defense)
    sty = df.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    cap = "".join("\\" + ch if ch in "%&_#$" else ch for ch in card_caption(defense))
    return sty.to_latex(caption=cap, hrules=True, column_format="l" * len(df.columns))


def write_card_tables(summary: pd.DataFrame, defense: str, prefix: str | os.PathLike[str]) -> list[Path]:
    """Write ``prefix.csv`` (the defense's summary rows), ``prefix.md`` and ``prefix.tex`` atomically."""
    prefix = Path(prefix)
    rows = summary[summary["defense"] == defense]
    return [atomic_write_text(prefix.with_name(prefix.name + ".csv"), rows.to_csv(index=False)),
            atomic_write_text(prefix.with_name(prefix.name + ".md"), card_markdown(summary, defense)),
            atomic_write_text(prefix.with_name(prefix.name + ".tex"), card_latex(summary, defense))]


# ------------------------------------------------------------------------------------------- figures
def _save(fig: plt.Figure, out: str | os.PathLike[str]) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(out, buf.getvalue())


def _grid(runs: pd.DataFrame, col: str, settings: list[str], attacks: list[str]) -> np.ndarray:
    means = runs.groupby(["attack_label", "setting"])[col].mean()
    return np.array([[means.get((a, s), math.nan) for s in settings] for a in attacks], dtype=float)


def _heat_panel(ax: plt.Axes, vals: np.ndarray, rows: list[str], settings: list[str], first: int,
                worst: str, title: str, cmap: str) -> None:
    im = ax.imshow(np.ma.masked_invalid(100 * vals), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            if np.isfinite(vals[i, j]):
                ax.text(j, i, f"{100 * vals[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if (vals[i, j] < 0.5) == (cmap == "viridis") else "black")
    attacked = vals[first:]
    for j in range(vals.shape[1]):  # the setting's worst case (the card's number): outlined
        col = attacked[:, j]
        if np.isfinite(col).any():
            i = int(np.nanargmin(col) if worst == "min" else np.nanargmax(col)) + first
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    if np.isfinite(attacked).any():  # the worst cell of all: starred
        flat = np.nanargmin(attacked) if worst == "min" else np.nanargmax(attacked)
        i, j = np.unravel_index(flat, attacked.shape)
        ax.text(j + 0.42, i + first - 0.42, "*", ha="right", va="top", fontsize=12, color="red", fontweight="bold")
    if first:
        ax.axhline(first - 0.5, color="black", linewidth=1)
    ax.set_xticks(range(len(settings)), settings, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=9)
    plt.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="%")


def heatmap(runs: pd.DataFrame, defense: str, path: str | os.PathLike[str]) -> Path:
    """Seed-mean accuracy (and ASR of targeted attacks) of ``defense``: attacks x settings, the attack-free
    accuracy of each partition on top. Red box: each setting's worst case; star: the worst cell."""
    r = runs[runs["defense"] == defense]
    att = r[r["attack"] != NO_ATTACK]
    if att.empty:
        raise ValueError(f"heatmap: no attacked runs of defense {defense!r}")
    order = _sort_settings(att.drop_duplicates("setting"))
    settings = list(order["setting"])
    attacks = sorted(att["attack_label"].unique())
    acc = _grid(att, "acc", settings, attacks)
    clean = r[r["attack"] == NO_ATTACK].groupby("partition_label")["acc"].mean()
    top = np.array([[clean.get(p, math.nan) for p in order["partition_label"]]])
    acc = np.vstack([top, acc])
    asr_attacks = [a for a in attacks if att.loc[att["attack_label"] == a, "asr_rounds"].notna().any()]
    panels = 2 if asr_attacks else 1
    height = 1.2 + 0.45 * (len(attacks) + 1)
    fig, axes = plt.subplots(1, panels, figsize=(1.0 + 0.75 * len(settings) * panels + 3 * panels, height),
                             squeeze=False, layout="constrained")
    names = [_attack_name(a) for a in attacks]
    _heat_panel(axes[0, 0], acc, ["no attack", *names], settings, 1, "min", "(a) accuracy %", "viridis")
    if asr_attacks:
        _heat_panel(axes[0, 1], _grid(att, "asr_rounds", settings, asr_attacks), [_attack_name(a) for a in asr_attacks],
                    settings, 0, "max", "(b) ASR % (per-round mean)", "magma_r")
    n_seeds = r["seed"].nunique()
    fig.suptitle(f"Report card: {display('defense', defense)} (mean over {n_seeds} seed{'s' * (n_seeds != 1)})",
                 fontsize=10)
    return _save(fig, path)


def ranking(summary: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Defenses ranked by worst-case accuracy, averaged over settings (bar; dots: each setting; diamond: mean
    attack-free accuracy), beside their maximum ASR (bar: mean over settings; dots: each setting)."""
    if summary.empty or summary["worst_acc"].isna().all():
        raise ValueError("ranking: no defense has a worst-case accuracy")
    g = summary.groupby("defense")
    order = g["worst_acc"].mean().sort_values(ascending=True, kind="stable").index.tolist()  # best on top
    y = {d: i for i, d in enumerate(order)}
    has_asr = summary["max_asr"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_asr else 1, figsize=(11 if has_asr else 6, 1.2 + 0.45 * len(order)),
                             squeeze=False, sharey=True, layout="constrained")
    ax = axes[0, 0]
    ax.barh([y[d] for d in order], [100 * g["worst_acc"].mean()[d] for d in order], color="tab:blue", alpha=0.5,
            label="worst-case acc, mean over settings")
    ax.scatter(100 * summary["worst_acc"], summary["defense"].map(y), s=12, color="tab:blue", zorder=3,
               label="worst-case acc, one setting")
    ax.scatter([100 * g["clean_acc"].mean()[d] for d in order], [y[d] for d in order], marker="D", s=25,
               color="black", zorder=4, label="attack-free acc (mean)")
    ax.set_yticks(range(len(order)), [display("defense", d) for d in order])
    ax.set_xlabel("accuracy %")
    ax.set_xlim(0, 100)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    ax.set_title("(a) worst-case accuracy over attacks", fontsize=9)
    if has_asr:
        ax = axes[0, 1]
        ax.barh([y[d] for d in order], [100 * g["max_asr"].mean()[d] for d in order], color="tab:red", alpha=0.5,
                label="max ASR, mean over settings")
        ax.scatter(100 * summary["max_asr"], summary["defense"].map(y), s=12, color="tab:red", zorder=3,
                   label="max ASR, one setting")
        ax.set_xlabel("ASR % (per-round mean)")
        ax.set_xlim(0, 100)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
        ax.set_title("(b) maximum ASR over attacks", fontsize=9)
    fig.suptitle("Defenses ranked by worst-case accuracy (best on top)", fontsize=10)
    return _save(fig, path)


__all__ = [
    "CLEAN_KEYS", "EXCLUSION_FACTOR", "LEVEL", "RUN_COLUMNS", "SETTING_KEYS",
    "SUMMARY_COLUMNS", "card_caption", "card_latex", "card_markdown", "card_runs",
    "card_summary", "card_table", "detection_rounds", "heatmap", "partition_label", "ranking",
    "setting_label", "t_interval", "write_card_tables",
]
