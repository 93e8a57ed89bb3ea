"""robustfl.fl.metrics' attack diagnostics, checked on updates worked by hand."""
from __future__ import annotations

import math

import pytest
import torch

from robustfl.aggregation import aggregators as agg
from robustfl.fl.metrics import attack_diagnostics, attacker_summary, detected

NAN = float("nan")

# Four benign updates around the origin and an attacker at their mean (Attack-Krum-Backdoor's aim):
# mu_B = (0, 0); squared distances to it 4, 4, 1, 1, so s^2 = 10 / 4 = 2.5.
# Pairwise squared distances: d01 = 16, d02 = d03 = d12 = d13 = 5, d04 = d14 = 4, d23 = 4, d24 = d34 = 1.
# Krum with f = 1 sums the n - f - 2 = 2 nearest: scores 9, 9, 5, 5, 2 (client 4 first); the ties 2/3 and
# 0/1 have equal total distances (15, 30), so Krum takes the lower index: order 4, 2, 3, 0, 1.
FIVE = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.0, 0.0]])


def test_dist_ratio_and_krum_rank_by_hand() -> None:
    out = attack_diagnostics(FIVE, [0, 1, 2, 3], f=1)
    r = math.sqrt(2.5)
    torch.testing.assert_close(out["dist_ratio"], torch.tensor([2 / r, 2 / r, 1 / r, 1 / r, 0.0], dtype=torch.float64))
    assert out["krum_rank"].tolist() == [4.0, 5.0, 2.0, 3.0, 1.0]
    assert out["dist_ratio"].dtype == out["krum_rank"].dtype == torch.float64


def test_four_updates_krum_undefined() -> None:
    """4 updates in 2-D, benign (2, 0), (-2, 0), (0, 1), attacker (0, -1): mu_B = (0, 1/3), squared
    distances 37/9, 37/9, 4/9 (s^2 = 26/9) and 16/9 for the attacker. Krum with f = 1 needs n > 4: NaN."""
    out = attack_diagnostics(FIVE[:4], [0, 1, 2], f=1)
    want = [math.sqrt(37 / 26), math.sqrt(37 / 26), math.sqrt(4 / 26), math.sqrt(16 / 26)]
    torch.testing.assert_close(out["dist_ratio"], torch.tensor(want, dtype=torch.float64))
    assert out["krum_rank"].isnan().all()
    # f = 0 is defined for n = 4 (2 nearest): d01 = 16, d02 = d03 = d12 = d13 = 5, d23 = 4 give scores 10, 10,
    # 9, 9; the ties have equal total distances (0, 1: 26; 2, 3: 14), so the lower index comes first
    assert attack_diagnostics(FIVE[:4], [0, 1, 2], f=0)["krum_rank"].tolist() == [3.0, 4.0, 1.0, 2.0]


def test_rank_one_is_what_krum_selects() -> None:
    """On random updates (ties included: two attackers send the same update) rank 1 is Krum's choice and
    the ranks follow the scores."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        u = torch.randn(9, 30, generator=g, dtype=torch.float64)
        u[7] = u[8] = u[:7].mean(0) + 0.01 * trial
        out = attack_diagnostics(u, range(7), f=2)
        chosen = int(agg.krum(u, 2).weights.argmax())
        assert out["krum_rank"][chosen] == 1.0
        assert sorted(out["krum_rank"].tolist()) == list(range(1, 10))
        scores = agg.krum_scores(u, 2)
        assert torch.all(scores[out["krum_rank"].argsort()].diff() >= 0)


def test_dist_ratio_matches_the_direct_formula() -> None:
    g = torch.Generator().manual_seed(1)
    u = 5.0 + torch.randn(12, 50, generator=g)  # an offset common to all, as real updates near theta
    u[10:] *= 3
    ben = list(range(10))
    mu = u[ben].double().mean(0)
    s = (u[ben].double() - mu).norm(dim=1).pow(2).mean().sqrt()
    torch.testing.assert_close(attack_diagnostics(u, ben, 2)["dist_ratio"], (u.double() - mu).norm(dim=1) / s)
    # the benign ratios' mean square is 1 by definition of s
    assert float(attack_diagnostics(u, ben, 2)["dist_ratio"][ben].pow(2).mean()) == pytest.approx(1.0)


def test_undefined_cases_are_nan() -> None:
    u = FIVE.clone()
    u[1, 0] = NAN  # a non-finite benign update: left out of mu_B and of Krum, NaN itself
    out = attack_diagnostics(u, [0, 1, 2, 3], f=0)
    assert math.isnan(out["dist_ratio"][1]) and math.isnan(out["krum_rank"][1])
    # benign (2, 0), (0, 1), (0, -1): mu_B = (2/3, 0), s^2 = (16/9 + 13/9 + 13/9) / 3 = 14/9
    assert float(out["dist_ratio"][4]) == pytest.approx(math.sqrt((4 / 9) / (14 / 9)))
    assert sorted(v for v in out["krum_rank"].tolist() if not math.isnan(v)) == [1, 2, 3, 4]
    assert attack_diagnostics(FIVE, [0], f=1)["dist_ratio"].isnan().all()  # one benign update
    same = torch.ones(5, 3)
    assert attack_diagnostics(same, [0, 1, 2], f=1)["dist_ratio"].isnan().all()  # s = 0
    assert attack_diagnostics(torch.full((5, 2), NAN), [0, 1], f=1)["krum_rank"].isnan().all()


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(5), [0], 1), "floating \\(n, d\\) tensor"),
    ((torch.zeros(5, 2, dtype=torch.int64), [0], 1), "floating \\(n, d\\) tensor"),
    ((FIVE, [0, 5], 1), "out of range"),
    ((FIVE, [0, 1], -1), "f must be an int >= 0"),
    ((FIVE, [0, 1], 1.0), "f must be an int >= 0"),
])
def test_bad_input_is_named(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attack_diagnostics(*args)


def test_attacker_summary() -> None:
    diag = {"dist_ratio": torch.tensor([1.0, 0.8, 0.2, NAN], dtype=torch.float64),
            "krum_rank": torch.tensor([2.0, 3.0, 4.0, NAN], dtype=torch.float64)}
    sel = torch.tensor([True, True, False, True])
    assert attacker_summary(diag, sel, [2, 3]) == {"mal_dist_ratio": 0.2, "mal_krum_rank": 4.0, "mal_selected": 0.5}
    assert attacker_summary(diag, sel, [1, 2]) == {"mal_dist_ratio": 0.5, "mal_krum_rank": 3.0, "mal_selected": 0.5}
    assert all(math.isnan(v) for v in attacker_summary(diag, sel, []).values())
    assert math.isnan(attacker_summary(diag, sel, [3])["mal_krum_rank"])


@pytest.mark.parametrize("n", [3, 10, 11, 20, 30, 100])
def test_equal_weights_detect_nobody(n: int) -> None:
    # float32 1/n averages to slightly more than 1/n for n = 10, 11, 20, 30: a plain `w < w.mean()` flags all
    assert not detected(torch.full((n,), 1.0 / n)).any()
    assert not detected(torch.softmax(torch.zeros(n), 0)).any()


def test_detected_by_hand() -> None:
    # mean 0.25: the two below it are detected, the one at it is not
    assert detected(torch.tensor([0.1, 0.25, 0.5, 0.15])).tolist() == [True, False, False, True]
    assert detected(torch.tensor([0.0, 0.0, 0.5, 0.5])).tolist() == [True, True, False, False]
