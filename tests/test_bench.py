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
