"""bench/bench_aggregators.py's CPU smoke path (``--d``: random updates of a small d instead of the fmnist model):
every rule is timed, and where ByzFL has the method its answer matches ours on the same updates."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ["geomed", "geomed_zero_start", "centered_clipping", "dnc", "signguard", "flame", "foolsgold",
         "norm_clipping", "weak_dp", "nnm_fedavg", "bucketing_fedavg", "multikrum"]


def _bench():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("bench_aggregators", ROOT / "bench" / "bench_aggregators.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_small_d_smoke_times_every_rule(tmp_path: Path) -> None:
    out = tmp_path / "agg.json"
    res = _bench().main(["--n", "10", "--d", "500", "--devices", "cpu", "--reps", "1", "--out", str(out)])
    rows = {r["rule"]: r for r in res["results"] if r["impl"] == "robustfl"}
    assert set(SUITE) | {"fedavg", "krum", "median", "trimmed_mean", "fltrust", "bulyan"} == set(rows)
    assert all("seconds" in r and r["d"] == 500 for r in rows.values()), [r for r in rows.values() if "error" in r]
    assert out.exists() and res["model"] == "random d=500"


def test_small_d_smoke_matches_byzfl_where_it_has_the_method() -> None:
    pytest.importorskip("byzfl")
    peers = ["geomed_zero_start", "centered_clipping", "nnm_fedavg", "bucketing_fedavg", "multikrum"]
    res = _bench().main(["--n", "10", "--d", "300", "--devices", "cpu", "--reps", "1", "--peers", "--rules", *peers])
    byz = {r["rule"]: r for r in res["results"] if r["impl"] == "byzfl"}
    assert set(byz) == set(peers)
    assert all(r["max_abs_diff_vs_robustfl"] < 1e-6 for r in byz.values()), byz
