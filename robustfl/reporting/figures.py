"""Figures mirroring the paper's (1, 4, 6-13 and the Section 7.4 cost numbers), and per-round attack
diagnostics, as PNG.

Inputs are the frames of :mod:`robustfl.reporting.results` (``collect_runs`` / ``summarise``) or a run's
``snapshot.npz``. Every function writes one PNG atomically (temp file + ``os.replace``) and returns
its path; it raises ``ValueError`` when there is nothing at all to draw (empty panels say "not run").
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from robustfl.reporting.plr import project_plrs, select_classes  # noqa: E402
from robustfl.io import atomic_write_bytes  # noqa: E402
from robustfl.reporting.tables import DATASET_NAMES, DEFENSE_NAMES, PAPER_DIR, display, load_paper  # noqa: E402

BENIGN, MALICIOUS = "tab:blue", "tab:red"
BACKDOORS = ("krum_backdoor", "median_backdoor")
#: The default setting of Section 6.1 (Figures 7-9 and 13 use it).
DEFAULT_SETTING: dict[str, Any] = {"partition": "iid", "n_clients": 10, "aux_size": 10}


def _save(fig: plt.Figure, out: str | os.PathLike[str]) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(out, buf.getvalue())


def _filter(df: pd.DataFrame, filters: Mapping[str, Any]) -> pd.DataFrame:
    for k, v in filters.items():
        if v is not None and k in df.columns:
            df = df[df[k].isin(v) if isinstance(v, (list, tuple, set, frozenset)) else df[k] == v]
    return df


def _defense_label(df: pd.DataFrame, no_defense: str | None = None) -> pd.Series:
    """Display name per row, e.g. ``FLARE`` or ``FLARE (code)``; FedAvg optionally as ``no_defense``."""
    lab = df["defense"].map(lambda d: no_defense if (no_defense and d == "fedavg") else display("defense", d))
    if "defense_variant" in df.columns:
        v = df["defense_variant"].fillna("default").astype(str)
        lab = lab.where(v == "default", lab + " (" + v + ")")
    return lab


def _not_run(ax: plt.Axes) -> None:
    ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="grey")


# ------------------------------------------------------------------------------ Figures 7-9
def fig_confidence(rounds_df: pd.DataFrame, out: str | os.PathLike[str],
                   filters: Mapping[str, Any] | None = None) -> Path:
    """Target-label confidence per round, one line per defense (mean ± sd over seeds), one panel per
    dataset x attack/backdoor: mirrors Figures 7 (fMNIST), 8 (CIFAR-10), 9 (Kather)."""
    flt = {**DEFAULT_SETTING, "n_attackers": 1, "attack": BACKDOORS, **(filters or {})}
    df = _filter(rounds_df, flt)
    df = df[df["target_conf"].notna()].copy()
    if df.empty:
        raise ValueError("fig_confidence: no backdoor rounds with a target confidence")
    df["Defense"] = _defense_label(df)
    df["panel"] = df["attack"].map(lambda a: display("attack", a)) + " (" + df["backdoor"].astype(str) + ")"
    order = list(DATASET_NAMES)
    datasets = sorted(df["dataset"].unique(), key=lambda d: (order.index(d) if d in order else len(order), d))
    # paper order (Figure 7): semantic before trojan, Krum before Coomed
    pk = df.drop_duplicates("panel").set_index("panel")
    panels = sorted(pk.index, key=lambda p: (pk.loc[p, "backdoor"] != "semantic", str(pk.loc[p, "backdoor"]),
                                             BACKDOORS.index(pk.loc[p, "attack"])))
    hue_order = sorted(df["Defense"].unique(), key=lambda lab: next(
        (i for i, d in enumerate(DEFENSE_NAMES.values()) if lab.startswith(d)), 99))
    palette = dict(zip(hue_order, sns.color_palette(n_colors=len(hue_order))))
    # at least 7.5 inches wide: the title and the legend outside must not meet over a single panel
    fig, axes = plt.subplots(len(datasets), len(panels),
                             figsize=(max(4.2 * len(panels) + 1.5, 7.5), 3.2 * len(datasets)),
                             squeeze=False, sharey=True, layout="constrained")
    for i, ds in enumerate(datasets):
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            sub = df[(df["dataset"] == ds) & (df["panel"] == panel)]
            if sub.empty:
                _not_run(ax)
            else:
                sns.lineplot(sub, x="round", y="target_conf", hue="Defense", hue_order=hue_order, palette=palette,
                             errorbar="sd", marker="o", markersize=3, ax=ax, legend=False)
            ax.set_title(f"{display('dataset', ds)}: {panel}", fontsize=9)
            ax.set_xlabel("FL iteration")
            ax.set_ylabel("confidence on target label")
            ax.set_ylim(-0.02, 1.02)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Line2D([], [], color=palette[h], marker="o", markersize=3, label=h) for h in hue_order]
    fig.legend(handles=handles, title="Defense", loc="outside right upper", fontsize=8)
    fig.suptitle("Model confidence on targeted inputs under backdoor MPAs\n(mirrors paper Figures 7-9)", fontsize=11)
    return _save(fig, out)


# ------------------------------------------------------------------------------ Figure 12
def _scaling_panel(ax: plt.Axes, df: pd.DataFrame, x: str, xlabel: str) -> None:
    if df.empty:
        _not_run(ax)
    for label, sub in df.groupby("Defense", sort=True):
        sub = sub.sort_values(x)
        ax.errorbar(sub[x], sub["asr_mean"], yerr=sub["asr_std"].fillna(0), marker="o", capsize=3,
                    label=label, color=MALICIOUS if label.startswith("No defense") else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ASR")
    ax.set_ylim(-0.02, 1.02)
    if not df.empty:
        ax.legend(fontsize=8)
    if df[x].nunique() == 1:  # a panel that shares its only point with another: say the sweep was not run
        ax.text(0.5, 0.5, f"only {xlabel.split(' (')[0].split(',')[0]} = {df[x].iloc[0]:g} run",
                ha="center", va="center", transform=ax.transAxes, color="grey")


def fig_scaling(summary: pd.DataFrame, out: str | os.PathLike[str], attack: str = "krum_backdoor",
                dataset: str = "fmnist", defenses: Sequence[str] = ("fedavg", "flare"),
                filters: Mapping[str, Any] | None = None) -> Path:
    """ASR (mean ± sd over seeds) of FLARE vs no defense under ``attack``: (a) vs number of clients at
    10 % attackers, (b) vs attacker percentage at n = 20, (c) vs auxiliary size m at n = 10, one
    attacker. Mirrors paper Figure 12 (a, b) and the Section 7.3.1 text on m."""
    flt = {"partition": "iid", "attack": attack, "backdoor": "semantic", "dataset": dataset,
           "defense": tuple(defenses), **(filters or {})}
    df = _filter(summary, flt)
    df = df[df["asr_mean"].notna()].copy()
    if df.empty:
        raise ValueError(f"fig_scaling: no {attack} / {dataset} cells with an ASR for {list(defenses)}")
    df["Defense"] = _defense_label(df, no_defense="No defense (FedAvg)")
    df["pct"] = 100.0 * df["n_attackers"] / df["n_clients"]
    a = df[np.isclose(df["pct"], 10.0) & (df["aux_size"] == 10)]
    b = df[(df["n_clients"] == 20) & (df["aux_size"] == 10)]
    c = df[(df["n_clients"] == 10) & (df["n_attackers"] == 1)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    _scaling_panel(axes[0], a, "n_clients", "number of clients n (10 % malicious)")
    _scaling_panel(axes[1], b, "pct", "malicious clients p (%), n = 20")
    _scaling_panel(axes[2], c, "aux_size", "auxiliary set size m (n = 10, 1 attacker)")
    for ax, t in zip(axes, ("(a) Fig. 12(a)", "(b) Fig. 12(b)", "(c) Sec. 7.3.1, m")):
        ax.set_title(t, fontsize=9)
    fig.suptitle(f"ASR against {display('attack', attack)} on {display('dataset', dataset)} "
                 "(mirrors paper Figure 12)")
    return _save(fig, out)


# ------------------------------------------------------------------------------ Figure 13
def adaptive_flags(rounds_df: pd.DataFrame, clients_df: pd.DataFrame,
                   success_threshold: float = 0.5) -> pd.DataFrame:
    """Per (defense, round): fraction of runs whose malicious clients were all detected (trust below
    the mean, Section 7.4) and fraction whose backdoor succeeded (ASR >= ``success_threshold``)."""
    keys = ["defense", "defense_variant", "run_dir", "round"]
    mal = clients_df[clients_df["malicious"].astype(int) == 1]
    det = mal.groupby(keys, dropna=False)["detected"].agg(lambda s: float((s.astype(int) == 1).all()))
    succ = rounds_df.set_index(keys)["asr"].ge(success_threshold).astype(float)
    succ = succ.where(rounds_df.set_index(keys)["asr"].notna())
    both = pd.concat({"detected": det, "attack_succeeded": succ}, axis=1).reset_index()
    return (both.groupby(["defense", "defense_variant", "round"], dropna=False)[["detected", "attack_succeeded"]]
            .mean().reset_index())


def fig_adaptive(rounds_df: pd.DataFrame, clients_df: pd.DataFrame, out: str | os.PathLike[str],
                 attack: str = "adaptive_plr", success_threshold: float = 0.5,
                 filters: Mapping[str, Any] | None = None) -> Path:
    """(a) target confidence per round, no defense vs FLARE; (b) per-round flags under FLARE:
    malicious update detected / attack succeeded (fraction of runs; 0/1 for one seed).
    Mirrors paper Figure 13 (a, b)."""
    flt = {**DEFAULT_SETTING, "attack": attack, "defense": ("fedavg", "flare"), **(filters or {})}
    r = _filter(rounds_df, flt).copy()
    cl = _filter(clients_df, flt)
    if r.empty:
        raise ValueError(f"fig_adaptive: no rounds of attack {attack!r}")
    r["Defense"] = _defense_label(r, no_defense="No defense")
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    sns.lineplot(r[r["target_conf"].notna()], x="round", y="target_conf", hue="Defense", errorbar="sd",
                 marker="o", markersize=3, ax=ax_a)
    ax_a.set(xlabel="FL iteration", ylabel="confidence on target label", ylim=(-0.02, 1.02),
             title="(a) Fig. 13(a): confidence")
    flags = adaptive_flags(_filter(r, {"defense": "flare"}), _filter(cl, {"defense": "flare"}), success_threshold)
    if flags.empty:
        _not_run(ax_b)
    for col, marker, color in (("detected", "s", BENIGN), ("attack_succeeded", "x", MALICIOUS)):
        if not flags.empty:
            g = flags.groupby("round")[col].mean()
            ax_b.plot(g.index, g.values, marker=marker, color=color, label=col.replace("_", " "))
    ax_b.set(xlabel="FL iteration", ylabel="fraction of FLARE runs", ylim=(-0.05, 1.05),
             title=f"(b) Fig. 13(b): flags (success: ASR >= {success_threshold:g})")
    if not flags.empty:
        ax_b.legend(fontsize=8)
    for ax in (ax_a, ax_b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("FLARE against the adaptive attack (mirrors paper Figure 13)")
    return _save(fig, out)


# ------------------------------------------------------------------------------ attack diagnostics
ATTACK_PANELS = (("mal_dist_ratio", "distance to benign mean / benign spread"),
                 ("mal_krum_rank", "best attacker's Krum rank"),
                 ("mal_selected", "fraction selected (attackers x seeds)"))


def fig_attack(rounds_df: pd.DataFrame, clients_df: pd.DataFrame, out: str | os.PathLike[str]) -> Path:
    """Where one cell's attackers stand, per round (thin lines: seeds; thick: their mean): (a) their
    ``mal_dist_ratio`` ||delta - mu_B|| / s (1 = the benign spread; grey: the benign clients' range; the axis
    turns logarithmic above 1 when an attacker is beyond 10 spreads), (b) the
    best attacker's Krum rank (1 = Krum with f = max(attackers, 1) would select it, whatever the cell's
    defense), (c) the fraction of attackers the cell's defense gave a positive weight (bars: mean over seeds).
    Columns of :data:`robustfl.reporting.results.ROUND_OPTIONAL_COLUMNS` and ``clients.csv``'s ``dist_ratio``."""
    if rounds_df.empty:
        raise ValueError("fig_attack: no rounds")
    cells = sorted(rounds_df["cell_id"].astype(str).unique())
    if len(cells) != 1:
        raise ValueError(f"fig_attack draws one cell, got {len(cells)}: {cells}")
    cols = [c for c, _ in ATTACK_PANELS]
    if not rounds_df[cols].notna().any().any():
        raise ValueError(f"fig_attack: cell {cells[0]!r} has no attack diagnostics ({', '.join(cols)} all NaN: "
                         "no attackers, or runs written before these columns existed)")
    r = rounds_df.sort_values(["seed", "round"])
    first = r.iloc[0]
    mean = r.groupby("round")[cols].mean()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    ben = clients_df[clients_df["malicious"].astype(int) == 0].groupby("round")["dist_ratio"]
    lo, hi = ben.min(), ben.max()
    if lo.notna().any():
        axes[0].fill_between(lo.index, lo.values, hi.values, color="grey", alpha=0.25, label="benign clients (range)")
    axes[0].axhline(1.0, color=BENIGN, ls="--", lw=1, label="benign spread (RMS)")
    for ax, (col, label) in zip(axes[:2], ATTACK_PANELS[:2]):
        for _, run in r.groupby("seed"):
            ax.plot(run["round"], run[col], color=MALICIOUS, alpha=0.35, lw=0.8)
        ax.plot(mean.index, mean[col], color=MALICIOUS, marker="o", markersize=3, lw=2, label="attackers (mean over seeds)")
        ax.set(xlabel="FL iteration", ylabel=label)
    axes[0].set_ylim(bottom=0)
    if float(r["mal_dist_ratio"].max()) > 10:  # far attackers: log above 1 keeps the benign range readable
        axes[0].set_yscale("symlog", linthresh=1.0, linscale=0.5)
    axes[0].set_title("(a) distance to the benign mean", fontsize=9)
    axes[1].axhline(1.0, color="black", ls="--", lw=1, label="Krum's choice")
    axes[1].set_ylim(0.5, int(first["n_clients"]) + 0.5)
    axes[1].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_title(f"(b) Krum rank (f = {max(int(first['n_attackers']), 1)}; 1 = selected)", fontsize=9)
    axes[2].bar(mean.index, mean["mal_selected"], color=MALICIOUS, alpha=0.7, label="mean over seeds")
    axes[2].set(xlabel="FL iteration", ylabel=ATTACK_PANELS[2][1], ylim=(0, 1.05))
    axes[2].set_title(f"(c) selected by {_defense_label(r.head(1)).iloc[0]} (weight > 0)", fontsize=9)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    seeds = r["seed"].nunique()
    fig.suptitle(f"{display('attack', first['attack'])} ({first['backdoor']}) vs {_defense_label(r.head(1)).iloc[0]} "
                 f"on {display('dataset', first['dataset'])}, {int(first['n_attackers'])} of {int(first['n_clients'])} "
                 f"clients malicious, {seeds} seed{'s' if seeds != 1 else ''}\n{cells[0]}", fontsize=10)
    return _save(fig, out)


# ------------------------------------------------------------------------------ Figures 1, 4, 6, 10, 11
def _load_snapshot(path: str | os.PathLike[str], *required: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        snap = {k: z[k] for k in z.files}
    missing = [k for k in required if k not in snap]
    if missing:
        raise ValueError(f"{path}: snapshot lacks {missing} (has {sorted(snap)})")
    return snap


def fig_plr(snapshot_path: str | os.PathLike[str], out: str | os.PathLike[str],
            classes: Sequence[int] | None = None, per_class: int | None = None, seed: int = 0,
            affine: bool = True) -> Path:
    """PLRs of three classes projected as in Section 4.3 (benign blue, malicious red; one marker
    per class; the classes' templates as black stars). ``per_class`` limits the probe inputs per
    class (1 gives the Figure 4 view). Mirrors paper Figures 1a, 4, 6, 10, 11."""
    s = _load_snapshot(snapshot_path, "plrs", "probe_y", "templates", "malicious")
    plrs, y, mal = s["plrs"], np.asarray(s["probe_y"]), np.asarray(s["malicious"]).astype(bool)
    cls = tuple(classes) if classes is not None else select_classes(y, 3, seed)
    idx = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in cls])
    finite = np.isfinite(plrs[:, idx]).all(axis=(1, 2)) & np.isfinite(s["templates"]).all(axis=(1, 2))
    if not finite.any():
        raise ValueError(f"{snapshot_path}: no model has finite PLRs on the probe inputs")
    dropped = int((~finite).sum())  # diverged models (e.g. under untargeted attacks) cannot be drawn
    plrs, mal, tmpl = plrs[finite], mal[finite], s["templates"][finite]
    ref = tmpl[~mal] if (~mal).any() else tmpl
    templates = ref[:, list(cls), :].mean(axis=0)  # benign models' omega rows of the three classes
    n, o = plrs.shape[0], plrs.shape[-1]
    pts, tpl = project_plrs(plrs[:, idx, :].reshape(-1, o), templates, affine=affine)
    pts = pts.reshape(n, len(idx), 2)
    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    for m, c in zip(("o", "+", "s"), cls):
        sel = y[idx] == c
        for flag, color, who in ((False, BENIGN, "benign"), (True, MALICIOUS, "malicious")):
            p = pts[mal == flag][:, sel, :].reshape(-1, 2)
            if len(p):
                style = {"facecolors": "none", "edgecolors": color} if m == "s" else {"color": color}
                ax.scatter(p[:, 0], p[:, 1], marker=m, s=14, alpha=0.6, label=f"class {c}, {who}", **style)
    ax.scatter(tpl[:, 0], tpl[:, 1], marker="*", s=160, color="black", label="templates")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    rnd = f", round {int(s['round'])}" if "round" in s else ""
    note = f"; {dropped} model(s) with non-finite PLRs omitted" if dropped else ""
    ax.set_title(f"PLRs of classes {list(cls)}{rnd}{note}\n(mirrors paper Figures 1a, 4, 6, 10, 11)", fontsize=9)
    return _save(fig, out)


def mean_mmd(mmd: np.ndarray) -> np.ndarray:
    """Each model's mean MMD to the other models (off-diagonal row mean), as in Figure 1b."""
    m = np.array(mmd, dtype=float)
    np.fill_diagonal(m, np.nan)  # the unbiased estimator's diagonal is not 0: leave it out
    return np.nanmean(m, axis=1)


def fig_mmd(snapshot_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Mean MMD per model: box over benign models, red dots for malicious ones. Mirrors Figure 1b."""
    s = _load_snapshot(snapshot_path, "mmd", "malicious")
    mal = np.asarray(s["malicious"]).astype(bool)
    avg = mean_mmd(s["mmd"])
    fig, ax = plt.subplots(figsize=(3.5, 4), layout="constrained")
    if (~mal).any():
        ax.boxplot([avg[~mal]], positions=[0], widths=0.5, showfliers=False)
        ax.scatter(np.zeros((~mal).sum()), avg[~mal], color=BENIGN, s=12, alpha=0.6, label="benign")
    if mal.any():
        ax.scatter(np.zeros(mal.sum()), avg[mal], color=MALICIOUS, s=30, label="malicious", zorder=3)
    ax.set_xticks([0], ["models"])
    ax.set_ylabel("mean MMD$^2$ to other models")
    ax.legend(fontsize=8)
    ax.set_title("Averaged MMD of PLRs (mirrors paper Figure 1b)", fontsize=9)
    return _save(fig, out)


# ------------------------------------------------------------------------------ Section 7.4 cost
def cost_frame(df: pd.DataFrame, label: str = "ours") -> pd.DataFrame:
    """Tidy ``(n, seconds, sd, source)`` from either a frame with ``n, seconds[, source]`` or a
    ``summarise`` frame (FLARE rows, per-round ``agg_s`` mean over cells, one source per dataset)."""
    if {"n", "seconds"} <= set(df.columns):
        out = df.copy()
        out["source"] = out["source"] if "source" in out.columns else label
        out["sd"] = out["sd"] if "sd" in out.columns else np.nan
        return out[["n", "seconds", "sd", "source"]]
    f = df[(df["defense"] == "flare") & df["agg_s_mean"].notna()]
    g = f.groupby(["dataset", "n_clients"]).agg(seconds=("agg_s_mean", "mean"), sd=("agg_s_std", "mean"))
    g = g.reset_index().rename(columns={"n_clients": "n"})
    g["source"] = label + " (" + g["dataset"].map(lambda d: display("dataset", d)) + ")"
    return g[["n", "seconds", "sd", "source"]]


def fig_cost(df: pd.DataFrame, out: str | os.PathLike[str], label: str = "ours",
             paper: pd.DataFrame | None = None) -> Path:
    """FLARE aggregation time per iteration vs n: ours beside the paper's 3.2 s (n = 10) and 28.3 s
    (n = 50) on an RTX 2080 Ti (Section 7.4). ``df``: see :func:`cost_frame`."""
    ours = cost_frame(df, label)
    if ours.empty:
        raise ValueError("fig_cost: no FLARE aggregation times")
    pap = load_paper("cost.csv", PAPER_DIR) if paper is None else paper
    pap = pap.assign(source="paper (TF, RTX 2080 Ti)", sd=np.nan)[["n", "seconds", "sd", "source"]]
    both = pd.concat([pap, ours], ignore_index=True)
    ns = sorted(both["n"].unique())
    sources = list(dict.fromkeys(both["source"]))
    width = 0.8 / len(sources)
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    for k, src in enumerate(sources):
        sub = both[both["source"] == src].set_index("n").reindex(ns)
        x = np.arange(len(ns)) + (k - (len(sources) - 1) / 2) * width
        yerr = sub["sd"].fillna(0) if sub["sd"].notna().any() else None
        ax.bar(x, sub["seconds"], width, yerr=yerr, label=src, capsize=3)
        for xi, v in zip(x, sub["seconds"]):
            if pd.notna(v):
                ax.annotate(f"{v:.3g}", (xi, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(ns)), [str(int(n)) for n in ns])
    ax.set_xlabel("number of clients n")
    ax.set_ylabel("FLARE aggregation time per iteration (s)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("FLARE cost (mirrors paper Section 7.4: 3.2 s @ n=10, 28.3 s @ n=50)", fontsize=9)
    return _save(fig, out)


__all__ = ["adaptive_flags", "cost_frame", "fig_adaptive", "fig_attack", "fig_confidence", "fig_cost", "fig_mmd",
           "fig_plr", "fig_scaling", "mean_mmd"]
