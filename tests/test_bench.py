"""The benchmark-side arithmetic that turns measurements into committed claims (bench/estimate_grid.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_grid_estimate_adds_the_measured_parts_per_round() -> None:
    """Two cells, hand-computed: per round = packed training + attack (scaled by the dataset's
    sequential round time relative to CIFAR-10's) + aggregation + the rest; times rounds and seeds."""
    eg = _load("estimate_grid")
    cells = pd.DataFrame([
        {"cell_id": "a", "seeds": "0 1 2", "overrides": json.dumps({"dataset": "fmnist", "attack": "krum_backdoor",
                                                                    "n_attackers": 1, "defense": "flare"})},
        {"cell_id": "b", "seeds": "0", "overrides": json.dumps({"dataset": "cifar10", "rounds": 5})},
    ])
    packed = {"fmnist_cnn": 2.0, "cifar10_cnn": 1.0, "kather_cnn": 1.5}
    seq = {"fmnist_cnn": 5.0, "cifar10_cnn": 10.0, "kather_cnn": 2.0}
    rounds = pd.DataFrame({"attack": ["krum_backdoor", "krum_backdoor", "none"], "defense": ["flare", "flare", "fedavg"],
                           "attack_s": [3.0, 5.0, 0.1], "agg_s": [0.2, 0.4, 0.05]})
    est, summary = eg.estimate(cells, packed, seq, rounds, other=0.25)
    a = (2.0 + 4.0 * 0.5 + 0.3 + 0.25) * 20  # attack median 4.0, scaled by 5/10; flare agg median 0.3
    b = (1.0 + 0.1 * 1.0 + 0.05 + 0.25) * 5
    assert est.set_index("cell_id")["s_per_run"].to_dict() == pytest.approx({"a": a, "b": b})
    assert summary["runs"] == 4
    assert summary["gpu_hours"] == pytest.approx((3 * a + b) / 3600)
    assert summary["gpu_hours_training_only"] == pytest.approx((3 * 2.0 * 20 + 1.0 * 5) / 3600)


def test_grid_estimate_divides_graphed_crafting_by_its_measured_speedup() -> None:
    eg = _load("estimate_grid")
    cells = pd.DataFrame([{"cell_id": "a", "seeds": "0", "overrides": json.dumps(
        {"dataset": "cifar10", "attack": "krum_backdoor", "n_attackers": 1})},
        {"cell_id": "b", "seeds": "0", "overrides": json.dumps(
            {"dataset": "cifar10", "attack": "median_backdoor", "n_attackers": 1})}])
    packed, seq = {"cifar10_cnn": 1.0}, {"cifar10_cnn": 10.0}
    rounds = pd.DataFrame({"attack": ["krum_backdoor", "median_backdoor", "none"], "defense": ["fedavg"] * 3,
                           "attack_s": [4.0, 0.5, 0.0], "agg_s": [0.1] * 3})
    est, summary = eg.estimate(cells, packed, seq, rounds, other=0.0, attack_speedup={"cifar10_cnn": 4.0})
    per = est.set_index("cell_id")["s_per_run"]
    assert per["a"] == pytest.approx((1.0 + 1.0 + 0.1) * 20)  # 4.0 s / 4
    assert per["b"] == pytest.approx((1.0 + 0.5 + 0.1) * 20)  # not graphed: unchanged
    assert summary["gpu_hours_attack_crafting"] == pytest.approx((1.0 + 0.5) * 20 / 3600)


def test_grid_estimate_takes_crafting_aggregation_and_other_from_bench_cells(tmp_path: Path) -> None:
    """With bench_cells.py's measurements (two shard files), each cell's round = packed training + its
    dataset's crafting for that attack and backdoor kind + its dataset's aggregation for that defense +
    its dataset's median other time; a combination never measured is an error naming it."""
    eg = _load("estimate_grid")
    head = {"device": "GPU X", "results": []}
    f1, f2 = tmp_path / "c0.json", tmp_path / "c1.json"
    f1.write_text(json.dumps({**head, "results": [
        {"dataset": "fmnist", "attack": "krum_backdoor", "n_attackers": 1, "attack_s_median": 0.4, "agg_s_median": 0.01,
         "other_s_per_round": 0.02},
        {"dataset": "fmnist", "attack": "krum_backdoor", "backdoor": "trojan", "n_attackers": 1,
         "attack_s_median": 0.6, "agg_s_median": 0.01, "other_s_per_round": 0.04}]}))
    f2.write_text(json.dumps({**head, "results": [
        {"dataset": "fmnist", "defense": "flare", "attack_s_median": 0.0, "agg_s_median": 0.05, "other_s_per_round": 0.03},
        {"dataset": "fmnist", "defense": "fedavg", "attack_s_median": 0.0, "agg_s_median": 0.002,
         "other_s_per_round": 0.01}]}))
    costs = eg.Costs([f1, f2])
    cells = pd.DataFrame([
        {"cell_id": "a", "seeds": "0 1", "overrides": json.dumps({"dataset": "fmnist", "attack": "krum_backdoor",
                                                                 "n_attackers": 1, "defense": "flare"})},
        {"cell_id": "b", "seeds": "0", "overrides": json.dumps({"dataset": "fmnist", "attack": "krum_backdoor",
                                                               "backdoor": "trojan", "n_attackers": 1})},
        {"cell_id": "c", "seeds": "0", "overrides": json.dumps({"dataset": "fmnist", "rounds": 4})}])
    est, summary = eg.estimate(cells, {"fmnist_cnn": 2.0}, {}, pd.DataFrame(), 0.0, costs=costs)
    other = 0.025  # median of 0.02, 0.04, 0.03, 0.01
    per = est.set_index("cell_id")["s_per_run"]
    assert per["a"] == pytest.approx((2.0 + 0.4 + 0.05 + other) * 20)
    assert per["b"] == pytest.approx((2.0 + 0.6 + 0.002 + other) * 20)
    assert per["c"] == pytest.approx((2.0 + 0.0 + 0.002 + other) * 4)
    assert summary["gpu_hours_attack_crafting"] == pytest.approx((2 * 0.4 + 0.6) * 20 / 3600)
    assert summary["inputs"]["cell_costs"]["devices"] == ["GPU X"]
    bad = pd.DataFrame([{"cell_id": "d", "seeds": "0", "overrides": json.dumps(
        {"dataset": "fmnist", "attack": "median_backdoor", "n_attackers": 1})}])
    with pytest.raises(KeyError, match="median_backdoor"):
        eg.estimate(bad, {"fmnist_cnn": 2.0}, {}, pd.DataFrame(), 0.0, costs=costs)


def test_grid_estimate_takes_crafting_for_the_cells_clients_and_attackers(tmp_path: Path) -> None:
    """Crafting is looked up for a cell's number of clients and attackers where bench_cells measured it
    (a later file's measurement replacing an earlier one's); a setting not measured scales the n = 10
    measurement by attackers / shard size and is listed as scaled."""
    eg = _load("estimate_grid")
    row = {"dataset": "fmnist", "attack": "krum_backdoor", "agg_s_median": 0.0, "other_s_per_round": 0.0}
    f1, f2 = tmp_path / "c0.json", tmp_path / "c1.json"
    f1.write_text(json.dumps({"device": "X", "results": [
        {**row, "n_attackers": 1, "attack_s_median": 0.4},
        {**row, "n_clients": 20, "n_attackers": 6, "attack_s_median": 9.0},
        {"dataset": "fmnist", "defense": "fedavg", "attack_s_median": 0.0, "agg_s_median": 0.0,
         "other_s_per_round": 0.0}]}))
    f2.write_text(json.dumps({"device": "X", "results": [{**row, "n_clients": 20, "n_attackers": 6,
                                                          "attack_s_median": 0.5}]}))
    cells = pd.DataFrame([{"cell_id": f"n{n}k{k}", "seeds": "0", "overrides": json.dumps(
        {"dataset": "fmnist", "attack": "krum_backdoor", "n_clients": n, "n_attackers": k})}
        for n, k in ((10, 1), (20, 6), (40, 4))])
    est, summary = eg.estimate(cells, {"fmnist_cnn": 0.0}, {}, pd.DataFrame(), 0.0, costs=eg.Costs([f1, f2]))
    per = est.set_index("cell_id")["attack_gpu_s"] / 20
    assert per["n10k1"] == pytest.approx(0.4)
    assert per["n20k6"] == pytest.approx(0.5)  # measured, the later file's
    assert per["n40k4"] == pytest.approx(0.4 * 4 * 10 / 40)  # scaled: 4 attackers of a quarter-size shard
    assert summary["inputs"]["cell_costs"]["attack_settings_scaled_not_measured"] == ["fmnist/krum_backdoor/semantic/40/4"]


def test_bench_cells_times_every_attack_and_defense_of_the_grid() -> None:
    """bench_cells.py's job list covers every attack (with its attacker count) and defense of the paper's
    grid for each dataset asked for, and shards split it without overlap."""
    bc = _load("bench_cells")
    jobs = bc.jobs(["fmnist", "kather"])
    scaling = [j for j in jobs if "n_clients" in j]  # fmnist's study of the number of clients and attackers
    assert {(j["n_clients"], j["n_attackers"]) for j in scaling} == {
        (20, 1), (20, 2), (20, 3), (20, 4), (20, 5), (20, 6), (30, 3), (40, 4), (50, 5)}
    assert all(j["dataset"] == "fmnist" and j["attack"] == "krum_backdoor" for j in scaling)
    jobs = [j for j in jobs if "n_clients" not in j]
    assert len(jobs) == 2 * (7 + 7)
    assert all("defense" not in j for j in bc.jobs(["kather"], attacks_only=True))
    assert {(j["attack"], j.get("backdoor", "semantic")) for j in jobs if "attack" in j} == {
        ("krum_backdoor", "semantic"), ("krum_backdoor", "trojan"), ("median_backdoor", "semantic"),
        ("median_backdoor", "trojan"),
        ("krum_untargeted", "semantic"), ("trimmedmean_untargeted", "semantic"), ("adaptive_plr", "semantic")}
    assert {j["defense"] for j in jobs if "defense" in j} == {"fedavg", "krum", "median", "trimmed_mean", "bulyan",
                                                             "fltrust", "flare"}
    assert all(j["n_attackers"] == (3 if "untargeted" in j["attack"] else 1) for j in jobs if "attack" in j)
    shards = [jobs[i::4] for i in range(4)]
    assert sum(len(s) for s in shards) == len(jobs)


def test_kernel_sets_set_their_options_and_restore_them() -> None:
    """bench_engine.KERNEL_SETS: each named set (but s6, which loads an older module from a file) sets the
    module options it names while entered, and every option is restored on exit; session 7's set is its
    dense and flatten choices."""
    be = _load("bench_engine")
    from robustfl.engine import stacked
    from robustfl.engine import train
    from robustfl.engine import triton_conv
    from robustfl.engine import triton_dense

    def state() -> tuple:
        return (stacked.FUSE_EPILOGUES, stacked.FUSE_FLATTEN, triton_dense.MIN_K, triton_dense.FP32_DOT,
                triton_conv.W_KMAJOR, triton_conv.IGEMM_CANDIDATES, stacked.FUSE_RELU_GRAD, train.GRAPH_CACHE_SIZE,
                triton_conv.SEPARABLE_GATHER, stacked.PAD_CONV_GRAD, triton_conv.WGRAD_KSUB,
                triton_conv.WGRAD_PROGRAMS, triton_conv.WGRAD_TILES_PADDED, triton_conv.DGRAD_TILES)

    before = state()
    for name in be.KERNEL_SETS:
        if name == "s6":
            continue
        with be.kernel_set(name):
            if name == "s7":
                assert (stacked.FUSE_FLATTEN, triton_dense.FP32_DOT, triton_dense.MIN_K, triton_conv.W_KMAJOR) == (
                    False, "ieee", 2048, False)
            if name == "nosplitk":
                assert triton_dense.MIN_K > 10**12
            if name in ("s7", "s8", "norelugrad"):
                assert stacked.FUSE_RELU_GRAD is False
            if name in ("s7", "s8", "nocache"):
                assert train.GRAPH_CACHE_SIZE == 0
            assert triton_conv.SEPARABLE_GATHER is (name not in ("s7", "s8", "s9", "nosep"))
            assert stacked.PAD_CONV_GRAD is (name not in ("s10", "nopad"))
            assert (triton_conv.WGRAD_KSUB == 1) is (name in ("s10", "noksub"))
            dg = {"s10": None, "dgigemm": None, "dg128": triton_conv.Tiles(128, 64, 32, 4, 3),
                  "dg256": triton_conv.Tiles(256, 64, 32, 8, 3)}
            assert triton_conv.DGRAD_TILES == dg.get(name, before[-1])
            if name in ("s10", "noksub"):
                assert (triton_conv.WGRAD_PROGRAMS, triton_conv.WGRAD_TILES_PADDED) == (1024, triton_conv.WGRAD_TILES)
        assert state() == before, name
