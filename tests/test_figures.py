"""robustfl.reporting.figures: every figure writes a PNG; the derived quantities are checked by hand.

All frames and snapshots here are synthetic test fixtures.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustfl.reporting.figures import (
    adaptive_flags, cost_frame, fig_adaptive, fig_attack, fig_confidence, fig_cost, fig_mmd, fig_plr, fig_scaling,
    mean_mmd,
)

CFG = {"study": "fixture", "cell_id": "c", "dataset": "fmnist", "attack": "krum_backdoor", "backdoor": "semantic",
       "defense": "flare", "defense_variant": "default", "partition": "iid", "c_sel": math.nan,
       "alpha": math.nan, "n_clients": 10, "n_attackers": 1, "aux_size": 10}
T = 5


def is_png(path: Path) -> bool:
    data = Path(path).read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def rounds_frame(**cfg: object) -> pd.DataFrame:
    """T rounds of one run (fixture); ``seed`` and ``conf`` (list or scalar) may be given."""
    conf = cfg.pop("conf", 0.1)
    seed = int(cfg.pop("seed", 0))  # type: ignore[arg-type]
    row = {**CFG, **cfg, "seed": seed}
    df = pd.DataFrame({"round": range(1, T + 1), "test_acc": 0.8, "test_loss": 0.5,
                       "target_conf": conf, "train_s": 1.0, "attack_s": 0.1, "agg_s": 0.2, "n_excluded": 0})
    df["asr"] = df["target_conf"].gt(0.5).astype(float)
    for k, v in row.items():
        df[k] = v
    df["run_dir"] = f"{row['attack']}/{row['defense']}/{row['backdoor']}/{seed}"
    return df


def test_fig_confidence(tmp_path: Path) -> None:
    df = pd.concat([rounds_frame(defense=d, backdoor=b, seed=s, conf=list(np.linspace(0.1, 0.9 if d != "flare"
                                 else 0.1, T)))
                    for d in ("fedavg", "krum", "flare") for b in ("semantic", "trojan") for s in (0, 1)]
                   + [rounds_frame(attack="median_backdoor", dataset="cifar10")], ignore_index=True)
    out = fig_confidence(df, tmp_path / "fig7.png")
    assert out == tmp_path / "fig7.png" and is_png(out)
    with pytest.raises(ValueError, match="no backdoor rounds"):
        fig_confidence(df.assign(target_conf=np.nan), tmp_path / "x.png")


def test_fig_scaling(tmp_path: Path) -> None:
    rows = []
    for d, asr in (("fedavg", 0.9), ("flare", 0.0)):
        rows += [{**CFG, "defense": d, "n_clients": n, "n_attackers": n // 10, "asr_mean": asr, "asr_std": 0.05}
                 for n in (10, 20, 30)]
        rows += [{**CFG, "defense": d, "n_clients": 20, "n_attackers": f, "asr_mean": asr, "asr_std": 0.0}
                 for f in (1, 4, 6)]
        rows += [{**CFG, "defense": d, "aux_size": m, "asr_mean": asr, "asr_std": math.nan} for m in (3, 7)]
    out = fig_scaling(pd.DataFrame(rows), tmp_path / "fig12.png")
    assert is_png(out)
    with pytest.raises(ValueError, match="no krum_backdoor"):
        fig_scaling(pd.DataFrame(rows), tmp_path / "x.png", dataset="kather")


def test_fig_scaling_says_which_sweeps_were_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only panel (a) run: panels (b) and (c) hold the one point they share with (a) and say so."""
    import robustfl.reporting.figures as figures

    rows = [{**CFG, "defense": d, "n_clients": n, "n_attackers": n // 10, "asr_mean": 0.5, "asr_std": 0.1}
            for d in ("fedavg", "flare") for n in (10, 20, 30)]
    seen = {}
    monkeypatch.setattr(figures, "_save", lambda fig, out: seen.setdefault("fig", fig))
    fig_scaling(pd.DataFrame(rows), tmp_path / "fig12.png")
    texts = [[t.get_text() for t in ax.texts] for ax in seen["fig"].axes]
    assert texts == [[], ["only malicious clients p = 10 run"], ["only auxiliary set size m = 10 run"]]


def adaptive_data() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two FLARE seeds + one FedAvg seed of the adaptive attack, client 2 malicious."""
    detected = {0: [1, 0, 1, 1, 1], 1: [1, 1, 1, 0, 1]}
    conf = {0: [0.1, 0.6, 0.1, 0.1, 0.1], 1: [0.1, 0.1, 0.1, 0.7, 0.1]}
    rounds = [rounds_frame(attack="adaptive_plr", defense="flare", seed=s, conf=conf[s]) for s in (0, 1)]
    rounds.append(rounds_frame(attack="adaptive_plr", defense="fedavg", conf=0.95))
    clients = []
    for r in rounds:
        run = r.iloc[0]
        for t in range(1, T + 1):
            for c in range(3):
                det = detected[int(run["seed"])][t - 1] if (c == 2 and run["defense"] == "flare") else 0
                clients.append({**{k: run[k] for k in (*CFG, "seed", "run_dir")}, "round": t, "client": c,
                                "malicious": int(c == 2), "weight": 0.3, "detected": det})
    return pd.concat(rounds, ignore_index=True), pd.DataFrame(clients)


def test_adaptive_flags_by_hand() -> None:
    rounds, clients = adaptive_data()
    flags = adaptive_flags(rounds[rounds["defense"] == "flare"], clients[clients["defense"] == "flare"])
    assert list(flags["round"]) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(flags["detected"], [1.0, 0.5, 1.0, 0.5, 1.0])
    np.testing.assert_allclose(flags["attack_succeeded"], [0.0, 0.5, 0.0, 0.5, 0.0])
    rounds.loc[(rounds["round"] == 1) & (rounds["seed"] == 0), "asr"] = 0.5  # at the threshold: succeeded
    rounds.loc[(rounds["round"] == 3), "asr"] = np.nan  # not evaluated: no flag, not a failure
    flags = adaptive_flags(rounds[rounds["defense"] == "flare"], clients[clients["defense"] == "flare"])
    np.testing.assert_allclose(flags["attack_succeeded"], [0.5, 0.5, np.nan, 0.5, 0.0])


def test_fig_adaptive(tmp_path: Path) -> None:
    rounds, clients = adaptive_data()
    assert is_png(fig_adaptive(rounds, clients, tmp_path / "fig13.png"))
    with pytest.raises(ValueError, match="adaptive_plr"):
        fig_adaptive(rounds[rounds["attack"] == "x"], clients, tmp_path / "x.png")


def attack_data(n: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One Krum backdoor cell, two seeds (fixture): the attacker (client n - 1) drifts from 3 benign spreads
    to 0.5, its Krum rank from n to 1, and Krum selects it from round 4 on in seed 0, round 5 in seed 1."""
    rounds, clients = [], []
    for seed in (0, 1):
        r = rounds_frame(defense="krum", seed=seed, cell_id="cell-krum")
        r["mal_dist_ratio"] = np.linspace(3.0, 0.5, T) + 0.1 * seed
        r["mal_krum_rank"] = [n, n, 4, 1, 1] if seed == 0 else [n, n, 6, 2, 1]
        r["mal_selected"] = (r["mal_krum_rank"] == 1).astype(float)
        rounds.append(r)
        for t in range(1, T + 1):
            for i in range(n):
                mal = i == n - 1
                clients.append({**CFG, "defense": "krum", "cell_id": "cell-krum", "seed": seed, "round": t,
                                "client": i, "malicious": int(mal), "dist_ratio": float(
                                    r["mal_dist_ratio"].iloc[t - 1]) if mal else 0.6 + 0.08 * i,
                                "selected": int(r["mal_selected"].iloc[t - 1]) if mal else 0})
    return pd.concat(rounds, ignore_index=True), pd.DataFrame(clients)


def test_fig_attack(tmp_path: Path) -> None:
    rounds, clients = attack_data()
    out = fig_attack(rounds, clients, tmp_path / "fig_attack.png")
    assert out == tmp_path / "fig_attack.png" and is_png(out)
    # a run written before the diagnostics (NaN) beside one with them still draws; benign rows are optional
    legacy = rounds.assign(seed=2, mal_dist_ratio=np.nan, mal_krum_rank=np.nan, mal_selected=np.nan)
    assert is_png(fig_attack(pd.concat([rounds, legacy]), clients[clients["malicious"] == 1], tmp_path / "b.png"))
    with pytest.raises(ValueError, match="no attack diagnostics"):
        fig_attack(legacy, clients, tmp_path / "x.png")
    with pytest.raises(ValueError, match="one cell, got 2"):
        fig_attack(pd.concat([rounds, rounds.assign(cell_id="other")]), clients, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no rounds"):
        fig_attack(rounds.iloc[:0], clients, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    n, c, o, per = 10, 10, 8, 4
    probe_y = np.repeat(np.arange(c), per)
    centres = rng.normal(size=(c, o)) * 3
    plrs = centres[probe_y][None] + 0.2 * rng.normal(size=(n, len(probe_y), o))
    malicious = np.zeros(n, dtype=bool)
    malicious[-1] = True
    plrs[malicious] += 2.0
    templates = centres[None].repeat(n, 0) + 0.01 * rng.normal(size=(n, c, o))
    mmd = np.full((n, n), 0.1)
    mmd[malicious, :] = mmd[:, malicious] = 1.0
    np.fill_diagonal(mmd, -0.05)  # the unbiased MMD^2 of a set with itself is <= 0, not 0
    path = tmp_path / "snapshot.npz"
    np.savez(path, plrs=plrs.astype(np.float32), probe_y=probe_y, templates=templates.astype(np.float32),
             malicious=malicious, mmd=mmd, round=np.array(20))
    return path


def test_fig_plr_and_mmd(snapshot: Path, tmp_path: Path) -> None:
    assert is_png(fig_plr(snapshot, tmp_path / "fig4.png", per_class=1))
    assert is_png(fig_mmd(snapshot, tmp_path / "fig1b.png"))
    with np.load(snapshot) as z:
        avg = mean_mmd(z["mmd"])
    np.testing.assert_allclose(avg[:-1], (8 * 0.1 + 1.0) / 9)  # benign: 8 benign peers + the attacker
    assert avg[-1] == pytest.approx(1.0)
    with np.load(snapshot) as z:
        snap = {k: z[k] for k in z.files}
    snap["plrs"][0, 0, 0] = np.inf  # a diverged model is left out, not a crash
    np.savez(tmp_path / "inf.npz", **snap)
    assert is_png(fig_plr(tmp_path / "inf.npz", tmp_path / "inf.png", classes=(0, 1, 2)))
    del snap["mmd"]
    np.savez(tmp_path / "nommd.npz", **snap)
    with pytest.raises(ValueError, match="lacks \\['mmd'\\]"):
        fig_mmd(tmp_path / "nommd.npz", tmp_path / "x.png")


def test_fig_cost(tmp_path: Path) -> None:
    summary = pd.DataFrame([{**CFG, "n_clients": n, "agg_s_mean": s, "agg_s_std": 0.01}
                            for n, s in ((10, 0.05), (50, 0.4))]
                           + [{**CFG, "defense": "krum", "n_clients": 10, "agg_s_mean": 9.0, "agg_s_std": 0.0}])
    tidy = cost_frame(summary)
    assert list(tidy["n"]) == [10, 50] and list(tidy["seconds"]) == [0.05, 0.4]  # FLARE rows only
    assert set(tidy["source"]) == {"ours (fMNIST)"}
    assert is_png(fig_cost(summary, tmp_path / "cost.png"))
    direct = cost_frame(pd.DataFrame({"n": [10, 20], "seconds": [0.1, 0.2]}), label="H100")
    assert list(direct["source"]) == ["H100", "H100"] and direct["sd"].isna().all()
    with pytest.raises(ValueError, match="no FLARE"):
        fig_cost(summary[summary["defense"] == "krum"], tmp_path / "x.png")
