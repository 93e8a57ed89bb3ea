"""robustfl.reporting.tables and the transcribed paper numbers in robustfl/reporting/paper/.

Our results here are a synthetic per-round frame (test fixture) summarised by robustfl.reporting.results.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from robustfl.reporting.results import summarise
from robustfl.reporting.tables import (
    PAPER_DIR, SPECS, TABLES, build_table, caption, format_cell, load_paper, pivot, write_paper_table, write_table,
)

BASE = {"study": "fixture", "cell_id": "", "dataset": "fmnist", "attack": "none", "backdoor": "none",
        "backdoor_mode": "none", "defense": "fedavg", "defense_variant": "default", "partition": "iid",
        "c_sel": math.nan, "alpha": math.nan, "n_clients": 10, "n_attackers": 0, "aux_size": 10, "aux_class": 1}


def fake_rounds(runs: list[dict]) -> pd.DataFrame:
    """One final round per run: each dict overrides BASE and gives seed, test_acc[, asr]."""
    rows = []
    for i, r in enumerate(runs):
        row = {**BASE, "cell_id": f"c{i}", "round": 20, "test_loss": 0.3, "asr": math.nan,
               "target_conf": math.nan, "train_s": 1.0, "attack_s": 0.0, "agg_s": 0.1, "n_excluded": 0, **r}
        row["cell_id"] = r.get("cell_id", "|".join(f"{k}={v}" for k, v in r.items() if k not in
                                                   ("seed", "test_acc", "asr")))
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture
def summary() -> pd.DataFrame:
    bd = {"attack": "krum_backdoor", "backdoor": "semantic", "backdoor_mode": "single", "n_attackers": 1,
          "defense": "flare"}
    return summarise(fake_rounds([
        {"seed": 0, "test_acc": 0.90}, {"seed": 1, "test_acc": 0.92},  # table 2 fmnist FedAvg
        {"seed": 0, "test_acc": 0.5, "n_clients": 20},  # scaling cell: must not enter table 2
        {"seed": 0, "test_acc": 0.95, "dataset": "digits"},  # ours only: paper empty
        {"seed": 0, "test_acc": 0.91, "asr": 0.0, **bd}, {"seed": 1, "test_acc": 0.89, "asr": 0.1, **bd},
        {"seed": 0, "test_acc": 0.80, "asr": 0.5, **bd, "backdoor": "trojan"},
        {"seed": 0, "test_acc": 0.70, "asr": 0.2, **bd, "defense_params": None, "defense_variant": "code"},
        {"seed": 0, "test_acc": 0.9, "asr": 0.05, **bd, "partition": "classes", "c_sel": 2.0},
        {"seed": 0, "test_acc": 0.6, "n_attackers": 3, "attack": "krum_untargeted", "defense": "krum"},
    ]).drop(columns=["defense_params"]))


def cell(long: pd.DataFrame, **keys: object) -> pd.Series:
    m = pd.Series(True, index=long.index)
    for k, v in keys.items():
        m &= long[k] == v
    assert m.sum() == 1, (keys, m.sum())
    return long[m].iloc[0]


def test_paper_csvs_complete_and_spot_values() -> None:
    t2, t3, t4, t5 = (load_paper(f"table{i}.csv") for i in (2, 3, 4, 5))
    cost = load_paper("cost.csv")
    assert (len(t2), len(t3), len(t4), len(t5), len(cost)) == (18, 42, 42, 10, 2)
    assert not t2.duplicated(["dataset", "defense"]).any()
    assert not t3.duplicated(["attack", "dataset", "defense"]).any()
    assert not t4.duplicated(["attack", "dataset", "defense"]).any()
    assert set(t3["defense"]) == set(t4["defense"]) == {"fedavg", "krum", "median", "trimmed_mean",
                                                        "bulyan", "fltrust", "flare"}
    assert "fltrust" not in set(t2["defense"]) and "fedavg" not in set(t5["defense"])
    idx2 = t2.set_index(["dataset", "defense"])["acc"]
    assert idx2[("cifar10", "krum")] == pytest.approx(55.19) and idx2[("kather", "bulyan")] == pytest.approx(75.1)
    idx3 = t3.set_index(["attack", "dataset", "defense"])
    assert tuple(idx3.loc[("median_backdoor", "kather", "fltrust"), ["acc", "asr"]]) == pytest.approx((76.2, 7.2))
    assert tuple(idx3.loc[("krum_backdoor", "cifar10", "krum"), ["acc", "asr"]]) == pytest.approx((48.1, 100.0))
    assert set(t3["backdoor"]) == {"semantic"}
    assert t4.set_index(["attack", "dataset", "defense"])["acc"][("krum_untargeted", "kather", "krum")] == 12.34
    assert t5.set_index(["attack", "defense"])["asr"][("krum_backdoor", "flare")] == pytest.approx(0.016)
    assert dict(zip(cost["n"], cost["seconds"])) == {10: 3.2, 50: 28.3}
    assert t3["asr"].between(0, 100).all() and t5["asr"].between(0, 1).all()


def test_table2_joins_paper_and_difference(summary: pd.DataFrame) -> None:
    long = build_table(summary, "table2")
    fed = cell(long, dataset="fmnist", defense="fedavg")
    assert fed["ours_mean"] == pytest.approx(91.0)
    assert fed["ours_std"] == pytest.approx(100 * math.sqrt(2 * 0.01 ** 2))
    assert fed["n"] == 2 and fed["paper"] == pytest.approx(91.77)
    assert fed["diff"] == pytest.approx(91.0 - 91.77)
    missing = cell(long, dataset="kather", defense="bulyan")  # not run: ours empty, paper kept
    assert pd.isna(missing["ours_mean"]) and pd.isna(missing["n"]) and pd.isna(missing["diff"])
    assert missing["paper"] == pytest.approx(75.1)
    ours_only = cell(long, dataset="digits", defense="fedavg")
    assert pd.isna(ours_only["paper"]) and ours_only["ours_mean"] == pytest.approx(95.0)
    assert len(long) == 18 + 1  # the n = 20 scaling cell is filtered out
    assert list(long["dataset"].unique()) == ["fmnist", "cifar10", "kather", "digits"]  # paper order


def test_table3_semantic_trojan_and_variants(summary: pd.DataFrame) -> None:
    long = build_table(summary, "table3")
    asr = cell(long, attack="krum_backdoor", dataset="fmnist", defense="flare", metric="asr",
               defense_variant="default")
    assert asr["ours_mean"] == pytest.approx(5.0) and asr["paper"] == 0.0 and asr["diff"] == pytest.approx(5.0)
    code = cell(long, attack="krum_backdoor", dataset="fmnist", defense="flare", metric="acc",
                defense_variant="code")
    assert code["ours_mean"] == pytest.approx(70.0) and code["paper"] == pytest.approx(91.2)
    assert long["ours_mean"].notna().sum() == 4  # semantic default + code, acc and asr
    trojan = build_table(summary, "table3_trojan")
    assert trojan["paper"].isna().all()  # the paper prints no trojan numbers
    assert len(trojan) == 2 * 42  # paper grid kept, empty where not run
    tro = cell(trojan, attack="krum_backdoor", dataset="fmnist", defense="flare", metric="asr")
    assert tro["ours_mean"] == pytest.approx(50.0)


def test_table4_and_table5(summary: pd.DataFrame) -> None:
    t4 = build_table(summary, "table4")
    k = cell(t4, attack="krum_untargeted", dataset="fmnist", defense="krum")
    assert (k["ours_mean"], k["paper"]) == pytest.approx((60.0, 6.93))
    t5 = build_table(summary, "table5")
    f = cell(t5, attack="krum_backdoor", defense="flare")
    assert f["ours_mean"] == pytest.approx(0.05) and f["paper"] == pytest.approx(0.016)  # fraction
    assert f["c_sel"] == 2.0 and f["unit"] == "fraction"
    assert len(t5) == 10


def test_percent_guard_and_unknown_table(summary: pd.DataFrame) -> None:
    bad = summary.copy()
    bad["test_acc_mean"] = bad["test_acc_mean"] * 100
    with pytest.raises(ValueError, match="fraction"):
        build_table(bad, "table2")
    with pytest.raises(ValueError, match="unknown table"):
        build_table(summary, "table9")


def test_pivot_layout_and_cells(summary: pd.DataFrame) -> None:
    wide = pivot(build_table(summary, "table2"), "table2")
    assert list(wide.columns) == ["Dataset", "FedAvg", "Krum", "Coomed", "TrimmedMean", "Bulyan", "FLARE"]
    row = wide.set_index("Dataset").loc["fMNIST"]
    assert row["FedAvg"] == "91.00 ± 1.41 (n=2) [91.77]"
    assert row["Krum"] == "[88.68]"
    assert wide.set_index("Dataset").loc["Digits (stand-in)", "Krum"] == ""
    w3 = pivot(build_table(summary, "table3"), "table3")
    assert list(w3.columns[:4]) == ["Attack", "Dataset", "FedAvg Acc", "FedAvg ASR"]
    assert list(w3.columns[-4:]) == ["FLARE Acc", "FLARE ASR", "FLARE (code) Acc", "FLARE (code) ASR"]
    assert len(w3) == 6 and w3.loc[0, "FLARE ASR"] == "5.0 ± 7.1 (n=2) [0.0]"
    assert w3.loc[1, "Krum ASR"] == "[100.0]"
    w5 = pivot(build_table(summary, "table5"), "table5")
    assert len(w5) == 2  # c_sel of the run cell is shown on its whole row
    assert w5.loc[0, "c_sel"] == "2" and w5.loc[0, "Krum"] == "[0.750]" and w5.loc[1, "c_sel"] == ""
    assert list(w5.columns[:3]) == ["Attack", "Dataset", "c_sel"]
    clash = build_table(summary, "table2")
    clash = pd.concat([clash, clash.iloc[[0]]], ignore_index=True)
    with pytest.raises(ValueError, match="several results"):
        pivot(clash, "table2")
    w4 = pivot(build_table(summary, "table4"), "table4")
    assert w4.loc[0, "Krum"] == "60.0 (n=1) [6.93]"  # the paper's extra decimals are kept
    assert format_cell(math.nan, math.nan, pd.NA, math.nan) == ""
    assert format_cell(0.5, math.nan, 1, math.nan, 3) == "0.500 (n=1)"


def test_write_table_all_formats(summary: pd.DataFrame, tmp_path: Path) -> None:
    long = build_table(summary, "table2")
    paths = write_table(long, tmp_path / "t" / "table2", caption="Table 2 (%)")
    assert [p.suffix for p in paths] == [".csv", ".md", ".tex"]
    assert all(p.stat().st_size > 0 for p in paths)
    back = pd.read_csv(paths[0])
    assert len(back) == len(long) and back["ours_mean"].isna().sum() == long["ours_mean"].isna().sum()
    md, tex = paths[1].read_text(), paths[2].read_text()
    assert "nan" not in md.lower() and "91.77" in md
    assert "\\begin{tabular}" in tex and "ours\\_mean" in tex and "\\%" in tex
    wpaths = write_table(pivot(long, "table2"), tmp_path / "t" / "table2_wide")
    assert "$\\pm$" in wpaths[2].read_text()


def test_every_table_builds_on_empty_summary() -> None:
    empty = summarise(fake_rounds([{"seed": 0, "test_acc": 0.5}]).iloc[0:0])
    for name in TABLES:
        long = build_table(empty, name)
        assert long["ours_mean"].isna().all()
        if SPECS[name].grid_csv is not None:  # the paper's grid is laid out even with no run
            assert len(long) > 0 and len(pivot(long, name)) > 0
        else:  # our cells only: nothing to show, but the layout holds
            assert long.empty and list(pivot(long, name).columns) == ["Attack", "Dataset", "aux_class"]
    assert (PAPER_DIR / "README.md").is_file()


def test_summary_csv_roundtrip_gives_same_table(summary: pd.DataFrame, tmp_path: Path) -> None:
    from robustfl.reporting.results import write_csv
    back = pd.read_csv(write_csv(summary, tmp_path / "summary.csv"))
    for name in ("table2", "table3", "table5"):
        a, b = build_table(summary, name), build_table(back, name)
        pd.testing.assert_series_equal(a["ours_mean"], b["ours_mean"])
        pd.testing.assert_series_equal(a["paper"], b["paper"])


def per_round(asr_by_seed: dict[int, list[float]], **cfg: object) -> pd.DataFrame:
    """Runs of one cell with the given per-round ASR (one run per seed), rounds 1..T."""
    rows = []
    for seed, asrs in asr_by_seed.items():
        for r, a in enumerate(asrs, start=1):
            rows.append({**BASE, "attack": "krum_backdoor", "backdoor": "semantic", "backdoor_mode": "single",
                         "n_attackers": 1, "defense": "flare", "cell_id": "bd", "seed": seed, "round": r,
                         "test_acc": 0.8, "test_loss": 0.3, "asr": a, "target_conf": a, "train_s": 1.0,
                         "attack_s": 0.0, "agg_s": 0.1, "n_excluded": 0, **cfg})
    return pd.DataFrame(rows)


def test_asr_is_the_round_average_by_default_and_final_on_request(tmp_path: Path) -> None:
    s = summarise(per_round({0: [0, 1, 1, 0, 1], 1: [0, 0, 0, 1, 0]}))
    rounds = cell(build_table(s, "table3"), attack="krum_backdoor", dataset="fmnist", defense="flare",
                  metric="asr")
    assert rounds["ours_mean"] == pytest.approx(100 * (0.6 + 0.2) / 2) and rounds["summary_metric"] == "asr_rounds"
    final = cell(build_table(s, "table3", asr="final"), attack="krum_backdoor", dataset="fmnist",
                 defense="flare", metric="asr")
    assert final["ours_mean"] == pytest.approx(100 * (1 + 0) / 2) and final["summary_metric"] == "asr"
    t5 = build_table(summarise(per_round({0: [0, 1, 1, 0, 1]}, partition="classes", c_sel=2.0)), "table5")
    assert cell(t5, attack="krum_backdoor", defense="flare")["ours_mean"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="asr='last'"):
        build_table(s, "table3", asr="last")
    # the captions say which ASR is shown
    assert "averaged over the run's rounds" in caption("table3") and "final global model" in caption("table3", "final")
    assert "ASR" not in caption("table2").split(":", 1)[1]
    md = {p.name: p.read_text() for p in write_paper_table(s, "table3", tmp_path) if p.suffix == ".md"}
    assert "averaged over the run's rounds" in md["table3.md"]
    assert "40.0 ± 28.3 (n=2)" in md["table3.md"]
    md_final = [p for p in write_paper_table(s, "table3", tmp_path / "f", asr="final") if p.name == "table3.md"]
    assert "final global model" in md_final[0].read_text() and "50.0 ± 70.7 (n=2)" in md_final[0].read_text()


def test_single_and_multiple_targets_go_to_their_own_tables() -> None:
    s = summarise(pd.concat([per_round({0: [1, 1]}, cell_id="single"),
                             per_round({0: [0, 0.5]}, cell_id="multi", backdoor_mode="multiple")]))
    one = cell(build_table(s, "table3"), attack="krum_backdoor", dataset="fmnist", defense="flare", metric="asr")
    many = cell(build_table(s, "table3_multiple"), attack="krum_backdoor", dataset="fmnist", defense="flare",
                metric="asr")
    assert (one["cell_id"], one["ours_mean"]) == ("single", pytest.approx(100.0))
    assert (many["cell_id"], many["ours_mean"]) == ("multi", pytest.approx(25.0))
    assert pd.isna(cell(build_table(s, "table3_trojan"), attack="krum_backdoor", dataset="fmnist",
                        defense="flare", metric="asr")["ours_mean"])


def test_aux_ablation_rows_per_aux_class() -> None:
    cells = [per_round({0: asr, 1: asr}, cell_id=f"aux{k}", aux_class=k, dataset="cifar10")
             for k, asr in ((4, [0, 0]), (3, [1, 0]), (1, [0, 0]))]
    other = per_round({0: [1, 1]}, cell_id="fedavg", defense="fedavg", dataset="cifar10")  # not FLARE
    s = summarise(pd.concat([*cells, other]))
    long = build_table(s, "aux_ablation")
    assert sorted(long["aux_class"].unique()) == [1, 3, 4] and long["paper"].isna().all()
    assert cell(long, aux_class=3, metric="asr")["ours_mean"] == pytest.approx(50.0)
    wide = pivot(long, "aux_ablation")
    assert list(wide.columns) == ["Attack", "Dataset", "aux_class", "FLARE Acc", "FLARE ASR"]
    assert list(wide["aux_class"]) == ["1", "3", "4"]
    assert wide.set_index("aux_class").loc["3", "FLARE ASR"] == "50.0 ± 0.0 (n=2)"
    with pytest.raises(ValueError, match="aux_class"):
        build_table(s.drop(columns="aux_class"), "aux_ablation")


def test_stand_in_rows_are_labelled_and_explained(summary: pd.DataFrame, tmp_path: Path) -> None:
    """Digits rows (a stand-in the paper does not use) are named so in the table and the caption says their
    neighbours' bracketed values are the paper's other datasets; a table without them says nothing."""
    wide = pivot(build_table(summary, "table2"), "table2").set_index("Dataset")
    assert wide.loc["Digits (stand-in)", "FedAvg"] == "95.00 (n=1)" and wide.loc["fMNIST", "Krum"] == "[88.68]"
    md = next(p for p in write_paper_table(summary, "table2", tmp_path) if p.name == "table2.md").read_text()
    assert "Digits (stand-in): scikit-learn's 8x8 digits, a dataset the paper does not use" in md.splitlines()[0]
    md3 = next(p for p in write_paper_table(summary, "table3", tmp_path) if p.name == "table3.md").read_text()
    assert "stand-in" not in md3.splitlines()[0]  # table 3's rows of ours are fMNIST only
