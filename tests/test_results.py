"""robustfl.reporting.results: loading run directories, flattening config, seed aggregation.

All run directories here are synthetic test fixtures written into tmp_path.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustfl.reporting.results import (
    CONFIG_COLUMNS, collect_runs, config_columns, final_metrics, find_run_dirs, load_run, restore_runs, summarise,
    summarise_runs,
)


def write_run(root: Path, name: str, *, acc: list[float], asr: list[float] | None = None,
              agg_s: list[float] | None = None, study: str = "fixture", cell_id: str = "c0",
              norms: list[float] | None = None, diag: bool = False, **cfg: object) -> Path:
    """Write a fake run directory (test fixture) with len(acc) rounds and 3 clients (client 2 malicious);
    ``norms`` (the 3 clients' update norms, every round) adds the optional ``update_norm`` column, ``diag``
    the attack diagnostics (the attacker at 3 benign spreads, Krum rank 1 in odd rounds, never selected)."""
    d = root / name
    d.mkdir(parents=True)
    T = len(acc)
    nan = [math.nan] * T
    rounds = pd.DataFrame({
        "round": range(1, T + 1), "test_acc": acc, "test_loss": [1.0 - a for a in acc],
        "asr": asr if asr is not None else nan, "target_conf": asr if asr is not None else nan,
        "train_s": [1.0] * T, "attack_s": [0.5] * T, "agg_s": agg_s or [0.1] * T, "n_excluded": [0] * T,
    })
    ranks = [1 + 2 * (t % 2 == 0) for t in range(1, T + 1)]  # the attacker's: 1, 3, 1, ...
    if diag:
        rounds = rounds.assign(mal_dist_ratio=3.0, mal_krum_rank=ranks, mal_selected=0.0)
    rounds.to_csv(d / "rounds.csv", index=False)
    clients = pd.DataFrame({
        "round": np.repeat(np.arange(1, T + 1), 3), "client": np.tile([0, 1, 2], T),
        "malicious": np.tile([0, 0, 1], T), "weight": np.tile([0.4, 0.4, 0.2], T),
        "detected": np.tile([0, 0, 1], T),
    })
    if norms is not None:
        clients["update_norm"] = np.tile(norms, T)
    if diag:
        clients = clients.assign(update_norm=np.nan, dist_ratio=np.tile([1.2, 0.7, 3.0], T),
                                 krum_rank=np.ravel([[3 - r, 2, r] for r in ranks]), selected=np.tile([1, 1, 0], T))
    clients.to_csv(d / "clients.csv", index=False)
    config = {"dataset": "fmnist", "n_clients": 10, "n_attackers": 1, "attack": "krum_backdoor",
              "defense": "flare", "defense_params": {}, "partition": "iid", "partition_params": {},
              "aux_size": 10, "backdoor": "semantic", "seed": 0, "rounds": T}
    config.update(cfg)
    meta = {"config": config, "cell": {"study": study, "cell_id": cell_id},
            "final": {"test_acc": acc[-1]}, "device": "cpu", "git_commit": "x", "wall_s": 1.0}
    (d / "run.json").write_text(json.dumps(meta))
    return d


@pytest.fixture
def two_seeds(tmp_path: Path) -> list[Path]:
    return [
        write_run(tmp_path, "s0", acc=[0.5, 0.7, 0.80], asr=[0.9, 0.5, 0.1], agg_s=[0.1, 0.2, 0.3], seed=0),
        write_run(tmp_path, "s1", acc=[0.6, 0.8, 0.90], asr=[0.8, 0.4, 0.3], agg_s=[0.3, 0.3, 0.3], seed=1),
        write_run(tmp_path, "u0", acc=[0.4, 0.6], attack="trimmedmean_untargeted", n_attackers=3,
                  defense="median", cell_id="c1", seed=0),
    ]


def test_load_run_reads_all_three_files(two_seeds: list[Path]) -> None:
    run = load_run(two_seeds[0])
    assert list(run.rounds["round"]) == [1, 2, 3]
    assert len(run.clients) == 9
    assert run.config["defense"] == "flare"
    assert run.keys["seed"] == 0


def test_update_norm_is_optional_and_survives_restore(tmp_path: Path) -> None:
    """Runs written before clients.csv had update_norm read as NaN; runs with it keep it through
    collect_runs -> restore_runs."""
    old = write_run(tmp_path, "old", acc=[0.5, 0.6])
    new = write_run(tmp_path, "new", acc=[0.5, 0.6], norms=[1.5, 2.0, 30.0], cell_id="c1")
    assert load_run(old).clients["update_norm"].isna().all()
    assert list(load_run(new).clients["update_norm"]) == [1.5, 2.0, 30.0] * 2
    rounds, clients = collect_runs([old, new])
    metas = {load_run(d).meta["cell"]["cell_id"]: load_run(d).meta for d in (old, new)}
    out = restore_runs(rounds, clients, metas, tmp_path / "restored")
    assert "update_norm" not in pd.read_csv(out[0] / "clients.csv")  # c0: the old run, nothing to keep
    _, c2 = collect_runs(out)
    pd.testing.assert_frame_equal(c2.drop(columns="run_dir"), clients.drop(columns="run_dir"), check_dtype=False)


def test_attack_diagnostics_are_optional_and_survive_restore(tmp_path: Path) -> None:
    """Runs written before rounds.csv / clients.csv had the attack diagnostics read as NaN there; runs with
    them keep them through collect_runs -> restore_runs (update_norm, all NaN here, is left out)."""
    from robustfl.reporting.results import CLIENT_OPTIONAL_COLUMNS, ROUND_OPTIONAL_COLUMNS

    old = write_run(tmp_path, "old", acc=[0.5, 0.6])
    new = write_run(tmp_path, "new", acc=[0.5, 0.6, 0.7], diag=True, cell_id="c1")
    run = load_run(old)
    assert run.rounds[list(ROUND_OPTIONAL_COLUMNS)].isna().all().all()
    assert run.clients[list(CLIENT_OPTIONAL_COLUMNS)].isna().all().all()
    assert list(load_run(new).rounds["mal_krum_rank"]) == [1, 3, 1]
    rounds, clients = collect_runs([old, new])
    assert set(ROUND_OPTIONAL_COLUMNS) <= set(rounds.columns)
    metas = {load_run(d).meta["cell"]["cell_id"]: load_run(d).meta for d in (old, new)}
    out = restore_runs(rounds, clients, metas, tmp_path / "restored")
    assert "mal_krum_rank" not in pd.read_csv(out[0] / "rounds.csv")  # c0: the old run
    assert "update_norm" not in pd.read_csv(out[1] / "clients.csv")
    r2, c2 = collect_runs(out)
    pd.testing.assert_frame_equal(r2.drop(columns="run_dir"), rounds.drop(columns="run_dir"), check_dtype=False)
    pd.testing.assert_frame_equal(c2.drop(columns="run_dir"), clients.drop(columns="run_dir"), check_dtype=False)
    empty_rounds, _ = collect_runs([])
    assert set(ROUND_OPTIONAL_COLUMNS) <= set(empty_rounds.columns)


def test_load_run_rejects_missing_column_and_missing_json(tmp_path: Path) -> None:
    d = write_run(tmp_path, "bad", acc=[0.5])
    pd.read_csv(d / "rounds.csv").drop(columns="asr").to_csv(d / "rounds.csv", index=False)
    with pytest.raises(ValueError, match="asr"):
        load_run(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="run.json"):
        load_run(tmp_path / "empty")


def test_config_columns_flattening() -> None:
    meta = {"config": {"dataset": "cifar10", "attack": "krum_untargeted", "backdoor": "trojan",
                       "defense": "flare", "defense_params": {"variant": "code"}, "partition": "classes",
                       "partition_params": {"c_sel": 2}, "n_clients": 10, "n_attackers": 3,
                       "aux_size": 7, "seed": 4},
            "cell": {"study": "noniid", "cell_id": "k"}}
    keys = config_columns(meta)
    assert set(keys) == set(CONFIG_COLUMNS)
    assert keys["backdoor"] == "none"  # untargeted attacks have no backdoor
    assert keys["defense_variant"] == "code"
    assert keys["c_sel"] == 2.0 and math.isnan(keys["alpha"])
    assert (keys["study"], keys["aux_size"], keys["seed"]) == ("noniid", 7, 4)
    dir_keys = config_columns({"config": {"partition": "dirichlet", "partition_params": {"alpha": 0.5},
                                          "attack": "median_backdoor", "backdoor": "trojan"}})
    assert dir_keys["alpha"] == 0.5 and math.isnan(dir_keys["c_sel"]) and dir_keys["backdoor"] == "trojan"
    assert dir_keys["defense_variant"] == "default"
    assert (keys["backdoor_mode"], keys["aux_class"]) == ("none", 1)  # no backdoor: the code's class 1


def test_config_columns_backdoor_mode_and_resolved_aux_class() -> None:
    def keys(**cfg: object) -> dict:
        return config_columns({"config": {"dataset": "cifar10", "attack": "krum_backdoor",
                                          "backdoor": "semantic", **cfg}})
    assert (keys()["backdoor_mode"], keys()["aux_class"]) == ("single", 1)  # RunConfig's default mode
    multi = keys(backdoor_mode="multiple", aux_class=None)  # green cars, automobile (1) -> bird (2)
    assert (multi["backdoor_mode"], multi["aux_class"]) == ("multiple", 0)
    assert keys(backdoor_mode="multiple", aux_class=1)["aux_class"] == 1  # explicit: as run
    assert keys(backdoor_mode="multiple", backdoor="trojan")["aux_class"] == 1


def test_backdoor_attacks_are_the_targeted_ones() -> None:
    """results.BACKDOOR_ATTACKS (config columns, aux class) agrees with the attack registry."""
    from robustfl.attacks import ATTACKS, is_targeted
    from robustfl.reporting.results import BACKDOOR_ATTACKS

    assert {a for a in ATTACKS.names() if is_targeted(a)} == set(BACKDOOR_ATTACKS)


def test_collect_runs_puts_config_on_every_row(two_seeds: list[Path]) -> None:
    rounds, clients = collect_runs([*two_seeds, two_seeds[0]])  # a run listed twice counts once
    assert len(rounds) == 3 + 3 + 2 and len(clients) == 3 * (3 + 3 + 2)
    for df in (rounds, clients):
        assert set(CONFIG_COLUMNS) <= set(df.columns)
        assert df[list(CONFIG_COLUMNS[:8])].notna().all().all()
    assert sorted(rounds.loc[rounds["defense"] == "flare", "seed"].unique()) == [0, 1]
    assert set(rounds.loc[rounds["attack"] == "trimmedmean_untargeted", "backdoor"]) == {"none"}
    empty_r, empty_c = collect_runs([])
    assert empty_r.empty and "test_acc" in empty_r.columns and "detected" in empty_c.columns


def test_summarise_mean_std_count_by_hand(two_seeds: list[Path]) -> None:
    rounds, _ = collect_runs(two_seeds)
    s = summarise(rounds)
    assert len(s) == 2  # the two seeds of the FLARE cell pool; the untargeted cell stays apart
    flare = s[s["defense"] == "flare"].iloc[0]
    assert flare["n_seeds"] == 2 and flare["seeds"] == "0 1"
    assert flare["test_acc_mean"] == pytest.approx(0.85)
    assert flare["test_acc_std"] == pytest.approx(math.sqrt((0.05 ** 2 + 0.05 ** 2) / 1))  # ddof = 1
    assert flare["asr_mean"] == pytest.approx(0.2)
    assert flare["asr_std"] == pytest.approx(math.sqrt(0.02))
    assert flare["asr_n"] == 2
    assert flare["agg_s_mean"] == pytest.approx((0.2 + 0.3) / 2)  # per-round mean of each run, then seeds
    med = s[s["defense"] == "median"].iloc[0]
    assert med["test_acc_mean"] == pytest.approx(0.6)
    assert math.isnan(med["test_acc_std"])  # one seed: no spread
    assert math.isnan(med["asr_mean"]) and med["asr_n"] == 0  # untargeted: NaN ASR survives
    assert "seed" not in s.columns


def test_asr_rounds_is_the_mean_over_rounds_with_an_asr(tmp_path: Path) -> None:
    """The paper's ASR: per-round ASR averaged over the run's rounds, NaN rounds skipped (the simulator
    measures ASR every round; NaN where a run has no targeted inputs), then the mean over seeds."""
    nan = math.nan
    dirs = [write_run(tmp_path, "s0", acc=[0.5] * 6, asr=[0, 1, 1, 0, 1, nan], seed=0),
            write_run(tmp_path, "s1", acc=[0.5, nan, 0.6, nan, 0.7], asr=[1, 1, nan, 1, 0], seed=1)]
    per_run = final_metrics(collect_runs(dirs)[0]).set_index("seed")
    assert per_run.loc[0, "asr_rounds"] == pytest.approx(0.6) and per_run.loc[1, "asr_rounds"] == pytest.approx(0.75)
    assert (per_run.loc[0, "asr"], per_run.loc[1, "asr"]) == (1.0, 0.0)  # the final round's, unchanged
    s = summarise(collect_runs(dirs)[0]).iloc[0]
    assert s["asr_rounds_mean"] == pytest.approx(0.675) and s["asr_rounds_n"] == 2
    assert s["asr_rounds_std"] == pytest.approx(math.sqrt(2 * 0.075 ** 2))
    untargeted = write_run(tmp_path, "u", acc=[0.5, 0.6], attack="krum_untargeted", cell_id="u")
    u = summarise(collect_runs([untargeted])[0]).iloc[0]
    assert math.isnan(u["asr_rounds_mean"]) and u["asr_rounds_n"] == 0


def test_summarise_uses_last_evaluated_round(tmp_path: Path) -> None:
    d = write_run(tmp_path, "r", acc=[0.5, 0.7, math.nan], asr=[0.2, 0.4, math.nan])
    s = summarise(collect_runs([d])[0])
    assert s.loc[0, "test_acc_mean"] == pytest.approx(0.7)
    assert s.loc[0, "asr_mean"] == pytest.approx(0.4)


def test_summarise_separates_variants_and_partitions(tmp_path: Path) -> None:
    dirs = [write_run(tmp_path, "a", acc=[0.8]),
            write_run(tmp_path, "b", acc=[0.6], defense_params={"variant": "code"}),
            write_run(tmp_path, "c", acc=[0.7], partition="classes", partition_params={"c_sel": 2}),
            write_run(tmp_path, "d", acc=[0.5], partition="classes", partition_params={"c_sel": 3})]
    s = summarise(collect_runs(dirs)[0])
    assert len(s) == 4
    got = dict(zip(zip(s["defense_variant"], s["c_sel"].fillna(-1)), s["test_acc_mean"]))
    assert got == pytest.approx({("default", -1): 0.8, ("code", -1): 0.6, ("default", 2): 0.7,
                                 ("default", 3): 0.5})


def test_summarise_runs_writes_csv_atomically(two_seeds: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out" / "summary.csv"
    s = summarise_runs(find_run_dirs(tmp_path), out)
    assert out.is_file() and not list(out.parent.glob(".*.tmp"))
    back = pd.read_csv(out)
    assert len(back) == len(s) == 2
    assert back["test_acc_mean"].tolist() == pytest.approx(s["test_acc_mean"].tolist())


def test_restore_runs_inverts_collect_runs(two_seeds: list[Path], tmp_path: Path) -> None:
    runs = [two_seeds[0], two_seeds[2]]  # cells c0 and c1, seed 0
    rounds, clients = collect_runs(runs)
    metas = {load_run(d).meta["cell"]["cell_id"]: load_run(d).meta for d in runs}
    out = restore_runs(rounds, clients, metas, tmp_path / "restored")
    assert [p.relative_to(tmp_path / "restored") for p in out] == [Path("runs/c0/seed0"), Path("runs/c1/seed0")]
    r2, c2 = collect_runs(out)
    drop = ["run_dir"]
    pd.testing.assert_frame_equal(r2.drop(columns=drop), rounds.drop(columns=drop), check_dtype=False)
    pd.testing.assert_frame_equal(c2.drop(columns=drop), clients.drop(columns=drop), check_dtype=False)
    assert summarise(r2).equals(summarise(rounds))
    with pytest.raises(FileExistsError, match="not overwritten"):
        restore_runs(rounds, clients, metas, tmp_path / "restored")
    with pytest.raises(ValueError, match="seed 0, the rows for seed 1"):
        restore_runs(rounds.assign(seed=1), clients, metas, tmp_path / "other")
    with pytest.raises(ValueError, match="no run.json given for cell 'c1'"):
        restore_runs(rounds, clients, {"c0": metas["c0"]}, tmp_path / "third")
