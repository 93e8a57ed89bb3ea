"""robustfl.reporting.report_card: grid, per-run reduction, summary, tables and figures, checked by hand.

Every frame here is a synthetic fixture in the column layout of ``all_rounds.csv`` / ``all_clients.csv``
(robustfl.reporting.results.collect_runs).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from robustfl.aggregation.defenses import DEFENSES
from robustfl.attacks import ATTACKS, is_targeted
from robustfl.config import RunConfig
from robustfl.pipeline import card
from robustfl.reporting import report_card as rc
from robustfl.reporting.results import CLIENT_COLUMNS, CONFIG_COLUMNS, ROUND_COLUMNS


# ------------------------------------------------------------------------------------------------ fixtures
def run_frames(defense: str, attack: str = "none", f: int = 0, seed: int = 0, acc: list[float] | float = 0.8,
               asr: list[float] | float = math.nan, weights: list[list[float]] | None = None,
               partition: str = "iid", alpha: float = math.nan, n: int = 4, rounds: int = 2,
               agg_s: list[float] | float = 0.1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One run: ``rounds`` rounds of ``n`` clients, the first ``f`` malicious; equal weights unless given."""
    accs = acc if isinstance(acc, list) else [acc] * rounds
    asrs = asr if isinstance(asr, list) else [asr] * rounds
    aggs = agg_s if isinstance(agg_s, list) else [agg_s] * rounds
    w = weights if weights is not None else [[1.0 / n] * n] * rounds
    bd = attack in ("krum_backdoor", "median_backdoor", "adaptive_plr")
    cfg = {"study": "fixture", "cell_id": f"{defense}-{attack}-{f}-{partition}-{alpha}", "dataset": "digits",
           "attack": attack, "attack_variant": "default", "backdoor": "semantic" if bd else "none",
           "backdoor_mode": "single" if bd else "none", "defense": defense, "defense_variant": "default",
           "defense_options": "default", "partition": partition, "c_sel": math.nan, "alpha": alpha,
           "n_clients": n, "n_attackers": f, "aux_size": 10, "aux_class": 1, "seed": seed}
    run_dir = f"runs/{cfg['cell_id']}/seed{seed}"
    rnd = pd.DataFrame({"round": range(1, rounds + 1), "test_acc": accs, "test_loss": 0.5, "asr": asrs,
                        "target_conf": math.nan, "train_s": 1.0, "attack_s": 0.0, "agg_s": aggs, "n_excluded": 0})
    clients = pd.DataFrame([{"round": r + 1, "client": i, "malicious": int(i < f), "weight": w[r][i],
                             "detected": int(w[r][i] < np.mean(w[r]))} for r in range(rounds) for i in range(n)])
    out = []
    for df in (rnd, clients):
        head = pd.DataFrame({**cfg, "run_dir": run_dir, "device": "cpu"}, index=df.index)
        out.append(pd.concat([head, df], axis=1))
    return out[0], out[1]


def stack(*frames: tuple[pd.DataFrame, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (pd.concat([f[0] for f in frames], ignore_index=True),
            pd.concat([f[1] for f in frames], ignore_index=True))


def test_fixture_layout() -> None:
    r, c = run_frames("krum", "krum_backdoor", 1)
    assert set(CONFIG_COLUMNS) <= set(r.columns) and set(ROUND_COLUMNS) <= set(r.columns)
    assert set(CONFIG_COLUMNS) <= set(c.columns) and set(CLIENT_COLUMNS) <= set(c.columns)


# ------------------------------------------------------------------------------------------------ CI
def test_t_interval_matches_scipy() -> None:
    x = [0.81, 0.84, 0.78]
    m, lo, hi = rc.t_interval(x)
    ref = stats.t.interval(0.95, df=2, loc=np.mean(x), scale=stats.sem(x))
    assert m == pytest.approx(np.mean(x))
    assert (lo, hi) == pytest.approx(ref, rel=1e-12)
    m, lo, hi = rc.t_interval([0.1, 0.2, 0.4, 0.3, float("nan")], level=0.9)  # NaN skipped: k = 4
    assert (lo, hi) == pytest.approx(stats.t.interval(0.9, df=3, loc=0.25, scale=stats.sem([0.1, 0.2, 0.4, 0.3])))


def test_t_interval_one_seed_none_and_zero_spread() -> None:
    m, lo, hi = rc.t_interval([0.7])
    assert m == 0.7 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in rc.t_interval([]))
    assert rc.t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------------------ detection
def test_detection_rounds_by_hand() -> None:
    # n = 4, client 0 malicious. Threshold: share < 1/(10 * 4) = 0.025. Mean rule: w < mean = 0.25.
    # round 1: [0.0, 0.2, 0.3, 0.5]: threshold excludes 0 (tp 1, fp 0); mean rule excludes 0 and 1 (tp 1, fp 1)
    # round 2: [0.3, 0.01, 0.29, 0.4]: threshold excludes 1 (tp 0, fp 1); mean rule excludes 1 (tp 0, fp 1)
    w = [[0.0, 0.2, 0.3, 0.5], [0.3, 0.01, 0.29, 0.4]]
    _, c = run_frames("flare", "krum_backdoor", 1, weights=w)
    d = rc.detection_rounds(c)
    assert list(d["tp"]) == [1, 0] and list(d["fp"]) == [0, 1]
    assert list(d["tp_below_mean"]) == [1, 0] and list(d["fp_below_mean"]) == [1, 1]
    np.testing.assert_allclose(d["tpr"], [1.0, 0.0])
    np.testing.assert_allclose(d["fpr"], [0.0, 1 / 3])
    np.testing.assert_allclose(d["fpr_below_mean"], [1 / 3, 1 / 3])
    # the threshold is on the share: weights summing to 2 (coordinate-wise median, even n) give the same
    _, c2 = run_frames("median", "krum_backdoor", 1, weights=[[2 * x for x in row] for row in w])
    pd.testing.assert_frame_equal(rc.detection_rounds(c2).drop(columns="run_dir"), d.drop(columns="run_dir"))


def test_detection_without_attackers_and_equal_weights() -> None:
    _, c = run_frames("fedavg", weights=[[0.1] * 10] * 2, n=10)  # 0.1 ten times: float mean may differ by an ulp
    d = rc.detection_rounds(c)
    assert d["tpr"].isna().all() and (d["fpr"] == 0).all() and (d["fpr_below_mean"] == 0).all()
    _, c = run_frames("krum", weights=[[0.0, 1.0, 0.0, 0.0]] * 2)  # Krum without attack: 3 of 4 honest excluded
    assert (rc.detection_rounds(c)["fpr"] == 0.75).all()


# ------------------------------------------------------------------------------------------------ per run
def test_card_runs_by_hand() -> None:
    w = [[0.0, 0.2, 0.3, 0.5], [0.3, 0.01, 0.29, 0.4]]
    frames = [run_frames("flare", "krum_backdoor", 1, acc=[0.5, 0.7], asr=[1.0, 0.0], weights=w, agg_s=[0.2, 0.4]),
              run_frames("krum", "krum_backdoor", 1, acc=[0.6, float("nan")], asr=[1.0, 1.0], weights=w),
              run_frames("krum", partition="dirichlet", alpha=0.3, weights=[[0.0, 1.0, 0.0, 0.0]] * 2)]
    runs = rc.card_runs(*stack(*frames))
    assert list(runs.columns) == list(rc.RUN_COLUMNS) and len(runs) == 3
    fl = runs[runs["defense"] == "flare"].iloc[0]
    assert fl["acc"] == 0.7 and fl["asr_rounds"] == 0.5 and fl["asr_final"] == 0.0
    assert fl["tpr"] == 0.5 and fl["fpr"] == pytest.approx(1 / 6) and fl["honest_excluded"] == 0.5
    assert fl["tpr_below_mean"] == 0.5 and fl["fpr_below_mean"] == pytest.approx(1 / 3)
    assert fl["agg_s"] == pytest.approx(0.3) and fl["rounds"] == 2
    assert fl["setting"] == "IID, 25 %" and fl["fraction"] == 0.25 and fl["attack_label"] == "krum_backdoor"
    kr = runs[(runs["defense"] == "krum") & (runs["attack"] != "none")].iloc[0]
    assert kr["acc"] == 0.6  # the last evaluated round
    assert math.isnan(kr["tpr_below_mean"]) and math.isnan(kr["fpr_below_mean"])  # FLARE's rule: FLARE only
    free = runs[runs["attack"] == "none"].iloc[0]
    assert free["setting"] == "Dir(0.3), no attack" and free["fpr"] == 0.75 and math.isnan(free["tpr"])


def test_card_runs_empty_and_needs_run_dir() -> None:
    r, c = run_frames("krum")
    assert list(rc.card_runs(r.iloc[:0], c.iloc[:0]).columns) == list(rc.RUN_COLUMNS)
    with pytest.raises(ValueError, match="run_dir"):
        rc.card_runs(r.drop(columns="run_dir"), c.drop(columns="run_dir"))


# ------------------------------------------------------------------------------------------------ summary
def runs_frame(rows: list[dict]) -> pd.DataFrame:
    """card_runs-layout rows: defense, attack, seed, acc, asr_rounds (+ any column), the rest defaulted."""
    base = {"dataset": "digits", "defense_options": "default", "attack_variant": "default", "backdoor": "none",
            "backdoor_mode": "none", "partition": "iid", "alpha": math.nan, "c_sel": math.nan,
            "partition_label": "IID", "n_clients": 10, "n_attackers": 1, "asr_final": math.nan,
            "asr_rounds": math.nan, "tpr": math.nan, "fpr": 0.0, "honest_excluded": 0.0, "tpr_below_mean": math.nan,
            "fpr_below_mean": math.nan, "honest_excluded_below_mean": math.nan, "agg_s": 0.1, "rounds": 2,
            "run_dir": ""}
    df = pd.DataFrame([{**base, **r} for r in rows])
    df.loc[df["attack"] == "none", "n_attackers"] = 0
    df["attack_label"] = df["attack"]
    df["fraction"] = df["n_attackers"] / df["n_clients"]
    df["setting"] = [rc.setting_label(p, f, n) for p, f, n in zip(df["partition_label"], df["n_attackers"],
                                                                  df["n_clients"])]
    return df[list(rc.RUN_COLUMNS)]


def card_fixture(seeds: tuple[int, ...] = (0, 1, 2)) -> pd.DataFrame:
    """Krum, IID, f = 1 of 10: krum_backdoor acc [.5 .6 .7] ASR [.2 .4 .6]; krum_untargeted acc [.3 .5 .7]
    (worst: mean .5); median_backdoor acc [.6 .7 .8] ASR [.9 .8 .7] (max: mean .8). Clean Krum [.85 .9 .9],
    FedAvg [.9 .92 .94] (paired cost [.05 .02 .04])."""
    acc = {"krum_backdoor": [0.5, 0.6, 0.7], "krum_untargeted": [0.3, 0.5, 0.7], "median_backdoor": [0.6, 0.7, 0.8]}
    asr = {"krum_backdoor": [0.2, 0.4, 0.6], "median_backdoor": [0.9, 0.8, 0.7]}
    tpr = {"krum_backdoor": 1.0, "krum_untargeted": 0.5, "median_backdoor": 0.0}
    fpr = {"krum_backdoor": 0.8, "krum_untargeted": 0.9, "median_backdoor": 0.7}
    rows = []
    for s in seeds:
        rows += [{"defense": "krum", "attack": a, "seed": s, "acc": acc[a][s],
                  "asr_rounds": asr.get(a, [math.nan] * 3)[s], "tpr": tpr[a], "fpr": fpr[a], "agg_s": 0.1 * (s + 1)}
                 for a in acc]
        rows += [{"defense": "krum", "attack": "none", "seed": s, "acc": [0.85, 0.9, 0.9][s], "fpr": 0.9,
                  "honest_excluded": 9.0},
                 {"defense": "fedavg", "attack": "none", "seed": s, "acc": [0.9, 0.92, 0.94][s]}]
    return runs_frame(rows)


def test_card_summary_worst_case_and_cis() -> None:
    s = rc.card_summary(card_fixture())
    assert list(s.columns) == list(rc.SUMMARY_COLUMNS) and len(s) == 1
    row = s.iloc[0]
    assert row["defense"] == "krum" and row["setting"] == "IID, 10 %" and row["n_attacks"] == 3
    assert row["n_seeds"] == 3
    t = lambda x: stats.t.interval(0.95, df=len(x) - 1, loc=np.mean(x), scale=stats.sem(x))  # noqa: E731
    assert row["worst_acc_attack"] == "krum_untargeted" and row["worst_acc"] == pytest.approx(0.5)
    assert (row["worst_acc_lo"], row["worst_acc_hi"]) == pytest.approx(t([0.3, 0.5, 0.7]))
    assert row["max_asr_attack"] == "median_backdoor" and row["max_asr"] == pytest.approx(0.8)
    assert (row["max_asr_lo"], row["max_asr_hi"]) == pytest.approx(t([0.9, 0.8, 0.7]))
    assert row["clean_acc"] == pytest.approx(np.mean([0.85, 0.9, 0.9]))
    assert (row["clean_acc_lo"], row["clean_acc_hi"]) == pytest.approx(t([0.85, 0.9, 0.9]))
    assert row["fedavg_clean_acc"] == pytest.approx(0.92)
    assert row["clean_cost"] == pytest.approx(np.mean([0.05, 0.02, 0.04]))
    assert (row["clean_cost_lo"], row["clean_cost_hi"]) == pytest.approx(t([0.05, 0.02, 0.04]))
    assert row["tpr"] == pytest.approx(0.5) and row["tpr_min"] == 0.0 and row["tpr_min_attack"] == "median_backdoor"
    assert row["fpr"] == pytest.approx(0.8) and row["fpr_max"] == 0.9 and row["fpr_max_attack"] == "krum_untargeted"
    assert row["clean_fpr"] == 0.9 and row["clean_honest_excluded"] == 9.0
    assert row["agg_s"] == pytest.approx(0.2)
    assert math.isnan(row["tpr_below_mean"]) and math.isnan(row["clean_fpr_below_mean"])


def test_card_summary_ties_one_seed_and_settings() -> None:
    # a tie in seed-mean accuracy goes to the first attack label; one seed: no interval
    runs = runs_frame([{"defense": "flare", "attack": a, "seed": 0, "acc": 0.4, "asr_rounds": r, "tpr": 1.0,
                        "tpr_below_mean": 1.0, "fpr_below_mean": 0.1}
                       for a, r in (("median_backdoor", 0.3), ("krum_backdoor", 0.3))]
                      + [{"defense": "flare", "attack": "none", "seed": 0, "acc": 0.9, "fpr_below_mean": 0.2},
                         {"defense": "flare", "attack": "krum_backdoor", "seed": 0, "acc": 0.1, "asr_rounds": 1.0,
                          "n_attackers": 3, "partition": "dirichlet", "alpha": 0.3, "partition_label": "Dir(0.3)"}])
    s = rc.card_summary(runs)
    assert list(s["setting"]) == ["IID, 10 %", "Dir(0.3), 30 %"]  # IID first, then by skew
    iid, dirichlet = s.iloc[0], s.iloc[1]
    assert iid["worst_acc_attack"] == "krum_backdoor" and iid["max_asr_attack"] == "krum_backdoor"
    assert iid["worst_acc"] == 0.4 and math.isnan(iid["worst_acc_lo"]) and math.isnan(iid["worst_acc_hi"])
    assert math.isnan(iid["fedavg_clean_acc"]) and math.isnan(iid["clean_cost"])  # no FedAvg reference run
    assert iid["tpr_below_mean"] == 1.0 and iid["clean_fpr_below_mean"] == 0.2
    assert dirichlet["worst_acc"] == 0.1 and math.isnan(dirichlet["clean_acc"])  # no clean run under Dir(0.3)
    assert rc.card_summary(runs.iloc[:0]).empty


def test_card_pipeline_from_frames() -> None:
    """rounds/clients frames -> card_runs -> card_summary: FedAvg's cost reference, FLARE's rule columns."""
    frames = []
    for s in (0, 1):
        frames += [run_frames("fedavg", seed=s, acc=0.9),
                   run_frames("flare", seed=s, acc=0.88, weights=[[0.24, 0.26, 0.25, 0.25]] * 2),
                   run_frames("flare", "krum_backdoor", 1, seed=s, acc=0.8, asr=[0.0, 1.0],
                              weights=[[0.001, 0.3, 0.3, 0.399]] * 2),
                   run_frames("flare", "krum_untargeted", 1, seed=s, acc=[0.7, 0.6 + 0.1 * s],
                              weights=[[0.1, 0.3, 0.3, 0.3]] * 2)]
    s = rc.card_summary(rc.card_runs(*stack(*frames)))
    row = s.iloc[0]
    assert len(s) == 1 and row["setting"] == "IID, 25 %"
    assert row["clean_cost"] == pytest.approx(0.02) and row["clean_cost_lo"] == pytest.approx(0.02)
    assert row["worst_acc_attack"] == "krum_untargeted" and row["worst_acc"] == pytest.approx(0.65)
    assert row["max_asr_attack"] == "krum_backdoor" and row["max_asr"] == pytest.approx(0.5)
    assert row["tpr"] == pytest.approx(0.5)  # backdoor attacker excluded (share 0.001), untargeted kept (0.1)
    assert row["tpr_below_mean"] == pytest.approx(1.0)  # both below the mean trust 1/n
    assert row["clean_fpr"] == 0.0 and row["clean_fpr_below_mean"] == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------------ grid
def test_card_grid_counts_dedup_and_fields() -> None:
    cells = card.card_grid(["flare", "krum", "fedavg"], ["krum_backdoor", "krum_untargeted"], seeds=[0, 1])
    keys = [tuple(sorted((k, str(v)) for k, v in c.items())) for c in cells]
    assert len(keys) == len(set(keys))
    # 3 defenses (FedAvg is also the baseline: once) x (1 clean + 2 attacks x 3 fractions) x 3 partitions x 2 seeds
    assert len(cells) == 3 * 7 * 3 * 2
    for c in cells:
        RunConfig.from_dict(c)
        assert c["dataset"] == "cifar10" and c["n_clients"] == 10
        assert c["n_attackers"] in ((0,) if c["attack"] == "none" else (1, 2, 3))
        assert ("backdoor" in c) == (c["attack"] == "krum_backdoor")
    assert {(c["partition"], c["partition_params"].get("alpha")) for c in cells} == {
        ("iid", None), ("dirichlet", 1.0), ("dirichlet", 0.3)}
    clean = card.card_grid(["krum"], ["krum_backdoor"], seeds=[0], baseline="clean")
    assert {(c["defense"], c["attack"]) for c in clean} == {("fedavg", "none"), ("krum", "none"),
                                                              ("krum", "krum_backdoor")}
    assert len(clean) == (1 + 1 + 3) * 3


def test_card_grid_defaults_are_every_registered_name() -> None:
    cells = card.card_grid(seeds=[0], partitions=["iid"], fractions=[0.1])
    assert {c["defense"] for c in cells} == set(DEFENSES.names())
    assert {c["attack"] for c in cells} == {"none", *ATTACKS.names()}
    assert len(cells) == len(DEFENSES.names()) * (1 + len(ATTACKS.names()))
    assert all(("backdoor" in c) == (c["attack"] != "none" and is_targeted(c["attack"])) for c in cells)


def test_card_grid_fraction_rounding_base_and_bulyan() -> None:
    assert [card.attackers(x, 10) for x in (0.1, 0.15, 0.25, 0.3, 0.35)] == [1, 2, 3, 3, 4]
    cells = card.card_grid(["bulyan"], ["krum_backdoor"], fractions=[0.1, 0.14, 0.3], partitions=["iid"], seeds=[0],
                         base={"rounds": 3, "backdoor": "trojan"}, baseline="clean", dataset="digits")
    by_f = {c["n_attackers"]: c for c in cells if c["defense"] == "bulyan"}
    assert sorted(by_f) == [0, 1, 3]  # 0.1 and 0.14 of 10 both give f = 1: one cell
    assert all(c["rounds"] == 3 for c in cells)
    assert by_f[3]["backdoor"] == "trojan" and "backdoor" not in by_f[0]
    assert "defense_params" not in by_f[1] and by_f[3]["defense_params"] == {"f": 1}  # n >= 4f + 3 at n = 10
    given = card.card_grid(["krum"], ["krum_backdoor"], fractions=[0.1], partitions=["iid"], seeds=[0],
                         defense_params={"krum": {"m": 2}})
    assert all(c["defense_params"] == {"m": 2} for c in given if c["defense"] == "krum")


@pytest.mark.parametrize("kwargs, message", [
    ({"defenses": ["nope"]}, "unknown defense 'nope'"),
    ({"attacks": ["nope"]}, "unknown attack 'nope'"),
    ({"attacks": ["none"]}, "attack-free baseline"),
    ({"defenses": []}, "list of defenses is empty"),
    ({"attacks": []}, "list of attacks is empty"),
    ({"fractions": []}, "list of attacker fractions is empty"),
    ({"partitions": []}, "list of partitions is empty"),
    ({"seeds": []}, "list of seeds is empty"),
    ({"fractions": [0.5]}, r"f = 5 >= n/2"),
    ({"fractions": [0.45]}, r"f = 5 >= n/2"),
    ({"fractions": [0.4], "n_clients": 4}, r"f = 2 >= n/2"),
    ({"fractions": [0.01]}, "f = 0 attackers"),
    ({"fractions": [1.5]}, r"must be a number in \(0, 1\)"),
    ({"partitions": ["random"]}, "unknown partition 'random'"),
    ({"partitions": ["dirichlet"]}, "needs partition_params {alpha"),
    ({"partitions": [{"partition": "classes"}]}, "needs partition_params {c_sel"),
    ({"partitions": [{"partition": "iid", "alpha": 1}]}, "unknown keys"),
    ({"base": {"defense": "krum"}}, "base sets \\['defense'\\]"),
    ({"base": {"rounds": 0}}, "report card cell .*'rounds': must be >= 1"),
    ({"base": {"no_such_field": 1}}, "report card cell .*unknown config key"),
    ({"baseline": "some"}, "baseline must be"),
    ({"defense_params": {"nope": {}}}, "defense_params names unknown defense 'nope'"),
    ({"base": {"aux_size": 1}}, "report card cell .*aux_size"),
])
def test_card_grid_errors_are_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as exc:
        card.card_grid(**{"defenses": ["krum"], "attacks": ["krum_backdoor"], "seeds": [0], **kwargs})
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------------------ rendering
def is_png(path: Path) -> bool:
    data = Path(path).read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_tables(tmp_path: Path) -> None:
    s = rc.card_summary(card_fixture())
    table = rc.card_table(s, "krum")
    assert table.loc[0, "Worst acc %"] == "50.0 [{:.1f}, {:.1f}]".format(*(100 * np.array(
        stats.t.interval(0.95, df=2, loc=0.5, scale=stats.sem([0.3, 0.5, 0.7])))))
    assert table.loc[0, "Worst-acc attack"] == "Attack-Krum-Untargeted"
    assert "TPR % (trust < 1/n)" not in table.columns
    md = rc.card_markdown(s, "krum")
    assert md.startswith("Report card of Krum") and "| IID, 10 %" in md and "1/(10 n)" in md
    tex = rc.card_latex(s, "krum")
    assert tex.startswith("\\begin{table}") and "10 \\%" in tex and "\\toprule" in tex
    paths = rc.write_card_tables(s, "krum", tmp_path / "card_krum")
    assert [p.name for p in paths] == ["card_krum.csv", "card_krum.md", "card_krum.tex"]
    assert pd.read_csv(paths[0])["defense"].tolist() == ["krum"]
    one = rc.card_table(rc.card_summary(card_fixture(seeds=(0,))), "krum")
    assert one.loc[0, "Worst acc %"] == "30.0"  # one seed: no interval
    with pytest.raises(ValueError, match="no summary rows for defense 'flare'"):
        rc.card_table(s, "flare")


def test_flare_table_has_its_own_rule() -> None:
    runs = card_fixture().replace({"defense": {"krum": "flare"}})
    runs["tpr_below_mean"] = 1.0
    table = rc.card_table(rc.card_summary(runs), "flare")
    assert table.loc[0, "TPR % (trust < 1/n)"] == "100.0"
    assert "trust below the mean trust 1/n" in rc.card_markdown(rc.card_summary(runs), "flare")


def test_figures(tmp_path: Path) -> None:
    runs = card_fixture()
    more = card_fixture().replace({"defense": {"krum": "flare"}})
    more["acc"] = more["acc"] + 0.05
    runs = pd.concat([runs, more[more["defense"] == "flare"],
                      runs[runs["attack"] != "none"].assign(n_attackers=3, setting="IID, 30 %", fraction=0.3)],
                     ignore_index=True)
    out = rc.heatmap(runs, "krum", tmp_path / "heat.png")
    assert out == tmp_path / "heat.png" and is_png(out)
    untargeted = runs[runs["attack"].isin(["none", "krum_untargeted"])]
    assert is_png(rc.heatmap(untargeted, "krum", tmp_path / "heat_acc_only.png"))  # no ASR panel
    assert is_png(rc.ranking(rc.card_summary(runs), tmp_path / "ranking.png"))
    with pytest.raises(ValueError, match="no attacked runs of defense 'median'"):
        rc.heatmap(runs, "median", tmp_path / "x.png")
    with pytest.raises(ValueError, match="ranking"):
        rc.ranking(rc.card_summary(runs.iloc[:0]), tmp_path / "x.png")


def test_heatmap_marks_each_settings_worst_cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    monkeypatch.setattr(rc, "_save", lambda fig, out: seen.setdefault("fig", fig))
    rc.heatmap(card_fixture(), "krum", tmp_path / "heat.png")
    acc_ax = seen["fig"].axes[0]
    boxes = [p for p in acc_ax.patches if p.get_edgecolor()[:3] == (1.0, 0.0, 0.0)]
    # rows: no attack (0), krum_backdoor (1), krum_untargeted (2), median_backdoor (3): worst accuracy is row 2
    assert [(b.get_x(), b.get_y()) for b in boxes] == [(-0.5, 1.5)]
    assert [t.get_text() for t in acc_ax.texts].count("*") == 1
