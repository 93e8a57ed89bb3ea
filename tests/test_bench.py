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


def test_benchmarks_build_engine_options_instead_of_patching_modules() -> None:
    """bench_engine.OPTION_SETS: each named set is a valid EngineOptions of the vectorised engine; the
    benchmark scripts import (they run on a GPU) and name no module-level switch of the engine."""
    import re

    from robustfl.engine import EngineOptions

    be = _load("bench_engine")
    for name in be.OPTION_SETS:
        opts = be.engine_options(name)
        assert isinstance(opts, EngineOptions) and opts.kind == "vectorised"
    assert be.engine_options("nocache").graph_cache == 0
    assert be.engine_options(conv="triton", cuda_graph=True).conv == "triton"
    for name in ("bench_conv", "bench_run", "bench_attack", "profile_step", "bench_cells", "bench_aggregators",
                 "bench_triton_conv", "bench_dense"):
        _load(name)
    for path in (ROOT / "bench").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"\b(stacked|triton_conv|triton_dense|train|backdoor|B)\.[A-Z_]{4,} = ", text), path


def test_summarise_renders_every_committed_result_file(tmp_path: Path) -> None:
    """bench/summarise.py's patterns match every result file in bench/results (a renamed or new kind of file
    would be listed as unrendered), each file under exactly the heading of its path, and the rendering runs."""
    sm = _load("summarise")
    assert sm.unrendered() == []
    text = sm.render()
    for f in sorted(sm.RES.rglob("*.json*")):
        rel = f.relative_to(sm.RES)
        if "runs" not in rel.parts:
            assert f"### `{rel}`" in text, rel
    assert "Files no section renders" not in text


def test_summarise_lists_a_file_no_section_renders(tmp_path: Path) -> None:
    """A result file matched by no pattern is named at the end of the summary, not dropped; one matched is
    rendered under its section (here a bench_engine.py round, by hand)."""
    sm = _load("summarise")
    head = {"date": "2026-01-01", "device": "GPU X", "versions": {"torch": "t", "python": "p"}, "git_commit": "abc"}
    (tmp_path / "round_x_h100.json").write_text(json.dumps({**head, "results": [
        {"model": "m", "n_clients": 10, "vectorised_s_per_round": 1.5}]}))
    (tmp_path / "mystery_h100.json").write_text(json.dumps({**head, "results": []}))
    assert [f.name for f in sm.unrendered(tmp_path)] == ["mystery_h100.json"]
    text = sm.render(tmp_path)
    section = text.split("### `round_x_h100.json`")[1].split("##")[0]
    assert "GPU X" in section and "abc" in section and "1.5" in section
    assert text.rstrip().endswith("- `mystery_h100.json`")
