"""robustfl.reporting.sweep: selection share, per-round ASR and accuracy cost, on hand-made runs."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from robustfl.reporting import sweep

KEYS = {"dataset": "cifar10", "backdoor": "semantic", "backdoor_mode": "single", "defense_options": "default",
        "partition": "iid", "n_clients": 3}


def _run(run_dir, seed, attack, defense, asr, acc, mal_weights, mal_norm=2.0, variant="default"):
    """A run of len(asr) rounds; client 2 is the attacker when attack != 'none'."""
    keys = {**KEYS, "attack": attack, "attack_variant": variant, "defense": defense, "seed": seed,
            "n_attackers": int(attack != "none"), "run_dir": run_dir}
    rounds = pd.DataFrame([{**keys, "round": r + 1, "asr": a, "test_acc": acc[r],
                            "mal_dist_ratio": 0.5 + r if attack != "none" else math.nan,
                            "mal_krum_rank": (1 if mal_weights[r] == 1 else 3) if attack != "none" else math.nan,
                            "mal_selected": float(mal_weights[r] > 0) if attack != "none" else math.nan}
                           for r, a in enumerate(asr)])
    clients = []
    for r, w in enumerate(mal_weights):
        for c in range(3):
            mal = int(attack != "none" and c == 2)
            clients.append({**keys, "round": r + 1, "client": c, "malicious": mal,
                            "weight": w if mal else (1 - w) / 2, "update_norm": mal_norm if mal else 1.0})
    return rounds, pd.DataFrame(clients)


def _frames(*runs):
    return pd.concat([r for r, _ in runs], ignore_index=True), pd.concat([c for _, c in runs], ignore_index=True)


def test_run_metrics_by_hand():
    rounds, clients = _frames(_run("a", 0, "krum_backdoor", "krum", [1, 0, 1, 1], [.5, .5, .5, .4], [1, 0, 1, 1]))
    m = sweep.run_metrics(rounds, clients).iloc[0]
    assert m["selected"] == pytest.approx(0.75) and m["asr_rounds"] == pytest.approx(0.75)
    assert m["asr"] == 1 and m["test_acc"] == pytest.approx(0.4) and m["norm_ratio"] == pytest.approx(2.0)
    assert m["dist_ratio"] == pytest.approx(2.0) and m["krum_first"] == pytest.approx(0.75)


def test_sweep_table_averages_seeds_and_compares_with_the_attack_free_rule():
    rounds, clients = _frames(
        _run("a0", 0, "krum_backdoor", "krum", [1, 1], [.5, .50], [1, 1]),
        _run("a1", 1, "krum_backdoor", "krum", [0, 1], [.5, .40], [0, 1]),
        _run("f0", 0, "none", "krum", [math.nan, math.nan], [.5, .55], [0, 0]),
        _run("f1", 1, "none", "krum", [math.nan, math.nan], [.5, .45], [0, 0]),
        _run("b0", 0, "krum_backdoor", "fedavg", [0, 0], [.6, .60], [.1, .1]),
    )
    t = sweep.sweep_table(rounds, clients).set_index(["attack", "defense"])
    row = t.loc[("krum_backdoor", "krum")]
    assert row["n_seeds"] == 2 and row["target_rule"]
    assert row["selected_mean"] == pytest.approx(0.75) and row["asr_rounds_mean"] == pytest.approx(0.75)
    assert row["selected_std"] == pytest.approx(math.sqrt(0.125))
    assert row["acc_free"] == pytest.approx(0.5) and row["acc_cost"] == pytest.approx(0.05)
    fed = t.loc[("krum_backdoor", "fedavg")]
    assert not fed["target_rule"] and math.isnan(fed["acc_cost"])  # no attack-free FedAvg cell here
    assert math.isnan(t.loc[("none", "krum")]["asr_rounds_mean"]) and math.isnan(t.loc[("none", "krum")]["krum_first_mean"])
    md = sweep.sweep_markdown(t.reset_index())
    assert "| krum_backdoor | `default` | single | **krum** | `default` | 75.0 ± 35.4 | 75.0 ± 35.4 |" in md
    assert "| 2.00 | 1.00 | 75.0 ± 35.4 | 2 |" in md  # norm ratio, distance / spread, Krum's first, seeds
